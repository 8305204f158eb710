"""Text in and out: prompt encoding, chat templates, incremental detokenization and stop strings."""

from __future__ import annotations

from dataclasses import dataclass, field

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the output so leading spaces come out right


class ChatTemplateError(ValueError):
    pass


def encode_prompt(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def apply_chat_template(
    tokenizer, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            "this model's tokenizer has no chat template: use /v1/completions, or serve a model with one"
        )
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools
    )  # NOTE: a template that does not use `tools` ignores them
    # NOTE: templates already write BOS; encoding without special tokens avoids a double BOS.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(slots=True)
class Detokenizer:
    """Turns one request's output tokens into text deltas, holding back what might begin a stop string."""

    tokenizer: object
    stop: tuple[str, ...]
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""
    emitted: int = 0  # characters of `text` already handed out

    @classmethod
    def for_prompt(cls, tokenizer, prompt_ids, stop: tuple[str, ...]) -> Detokenizer:
        ctx = list(prompt_ids[-_CONTEXT_TOKENS:])
        return cls(tokenizer, stop, ids=ctx, prefix_offset=0, read_offset=len(ctx))

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> bool:
        """Add a token; True when a stop string appeared (the text is then cut before it)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return self._append(delta)
        return False

    def flush(self) -> None:
        """At the finish: decode what is still held (an incomplete character, say)."""
        if self.read_offset < len(self.ids):
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            full = self._decode(self.ids[self.prefix_offset :])
            self.read_offset = len(self.ids)
            if len(full) > len(prefix):
                self._append(full[len(prefix) :])

    def _append(self, delta: str) -> bool:
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += delta
        for s in self.stop:
            at = self.text.find(s, start)
            if at >= 0:
                self.text = self.text[:at]
                return True
        return False

    def take(self, final: bool) -> str:
        """The text not yet handed out; while running, keep back a possible stop-string prefix."""
        end = len(self.text)
        if not final and self.stop:
            end = max(self.emitted, end - max(len(s) for s in self.stop) + 1)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
