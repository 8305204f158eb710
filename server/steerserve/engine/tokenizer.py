"""Text in and out: prompt encoding, chat templates, incremental detokenization and stop strings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

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


def text_decoder(tokenizer) -> Callable[[list[int]], str]:
    """`tokenizer.decode(ids, skip_special_tokens=True)` as one callable. For a fast tokenizer that keeps
    transformers' own `decode` and cleans up no spaces, that is its Rust backend's decode: the same text
    without the per-call conversion of the ids (6.2 against 0.6 us for 8 ids; a request decodes twice a
    token)."""
    cls = type(tokenizer)
    if (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and cls.decode is PreTrainedTokenizerBase.decode
        and cls._decode is PreTrainedTokenizerFast._decode
        and not tokenizer.clean_up_tokenization_spaces
    ):
        return partial(tokenizer.backend_tokenizer.decode, skip_special_tokens=True)
    return partial(tokenizer.decode, skip_special_tokens=True)


@dataclass(slots=True)
class Detokenizer:
    """Turns one request's output tokens into text deltas, holding back what might begin a stop string."""

    decode: Callable[[list[int]], str]  # text_decoder(tokenizer)
    stop: tuple[str, ...]
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""
    emitted: int = 0  # characters of `text` already handed out

    @classmethod
    def for_prompt(cls, tokenizer, prompt_ids, stop: tuple[str, ...]) -> Detokenizer:
        ctx = list(prompt_ids[-_CONTEXT_TOKENS:])
        return cls(text_decoder(tokenizer), stop, ids=ctx, prefix_offset=0, read_offset=len(ctx))

    def add(self, token_id: int) -> bool:
        """Add a token; True when a stop string appeared (the text is then cut before it)."""
        self.ids.append(token_id)
        prefix = self.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return self._append(delta)
        return False

    def flush(self) -> None:
        """At the finish: decode what is still held (an incomplete character, say)."""
        if self.read_offset < len(self.ids):
            prefix = self.decode(self.ids[self.prefix_offset : self.read_offset])
            full = self.decode(self.ids[self.prefix_offset :])
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
