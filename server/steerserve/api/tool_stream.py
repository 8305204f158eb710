"""Streaming a chat choice whose text may be a tool call: the text pieces -> OpenAI chunk deltas.

OpenAI streams a tool call as `delta.tool_calls` entries: the first names the call (`index`, `id`,
`type`, `function.name`, `function.arguments: ""`), the next ones append to `function.arguments`; the
last chunk's finish_reason is `tool_calls`. Per tool mode (api/structured_tools.py):
  - a named function: the text IS the arguments (grammar-constrained), so each piece is streamed as an
    arguments delta as it comes;
  - `required`: the text is a JSON array of calls; a call's name and arguments are only known once its
    JSON is complete, so the text is held and the calls are sent whole, when the choice finishes;
  - `auto`: text that starts (after blanks) with `{` or `[` may be a call: it is held to the end, then
    sent as tool_calls when it is one (parse_tool_calls, the non-streamed rule), else as content; any
    other text streams as content from its first piece.
A choice cut short (`length`) whose held text is no complete call is sent as content, as when not
streamed.
"""

from __future__ import annotations

from steerserve.api.protocol import ChatCompletionRequest, NamedToolChoice
from steerserve.api.structured_tools import new_call, parse_tool_calls, tool_mode


class ToolStream:
    """One choice's deltas; `feed` each new text piece, `finished` True on the choice's last output."""

    def __init__(self, body: ChatCompletionRequest):
        self.body = body
        self.mode = tool_mode(body)
        self.held = ""  # text not sent yet
        self.holding = self.mode in ("required", "auto")  # a named function streams at once (_named)
        self.named_started = False
        self.called = False  # the choice's text was sent as tool calls

    def feed(self, text: str, finished: bool) -> dict | None:
        """The delta for this piece (None: nothing to send yet)."""
        if isinstance(self.mode, NamedToolChoice):
            return self._named(text)
        if not self.holding:  # NOTE: an empty piece mid-stream still says content "", as before
            return {"content": text} if text or not finished else None
        self.held += text
        if self.mode == "auto" and self.held.strip() and self.held.lstrip()[0] not in "{[":
            self.holding = False  # plain text: stream it from here on
            out, self.held = self.held, ""
            return {"content": out}
        if not finished:
            return None
        calls = parse_tool_calls(self.body, self.held)
        out, self.held = self.held, ""
        if calls is None:
            return {"content": out} if out else None
        self.called = True
        return {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}

    def _named(self, text: str) -> dict | None:
        self.called = True
        if not self.named_started:
            self.named_started = True
            call = new_call(self.mode.function.name, text)
            return {"tool_calls": [{"index": 0, **call}]}
        return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else None

    def finish_reason(self, reason: str | None) -> str | None:
        """`tool_calls` for a call that finished normally, as the non-streamed message."""
        return "tool_calls" if self.called and reason == "stop" else reason
