"""Structured output on the runner side: compiled grammars (cached) and one matcher per request.

The grammar engine is xgrammar, picked over llguidance by measurement (benchmarks/bench_grammar_engine.py:
a 50,257-token byte-level BPE vocabulary, a nested JSON schema, CPU, two runs): filling one row's token
mask, which the engine thread does for every constrained row at every step, took 7-11 us mean and
~100 us at worst with xgrammar vs 57-64 us mean and 1.4 ms at worst with llguidance. Compiling the
schema took 16-18 ms vs 2 ms (llguidance builds most of its state lazily, in the masks); that cost is
paid once per schema, on the API's pool, and cached. One xgrammar compiler takes JSON schema, regex and
EBNF alike.

`GrammarCache.compile` is what the API calls while planning a request (api/structured.py, on
GENERATION_POOL), so the runner's admission finds the compiled grammar here and compiles again only
after an eviction. `GrammarRows` holds each request's matcher: created at admission, advanced with the
request's output tokens as the scheduler feeds them back (so a step run again, or a request recomputed
after preemption, skips what the matcher already took), and turned into one bitmask row per sampled row;
the sampler masks the other tokens to -inf (sampling/sampler.py). EOS is one of the matcher's stop
tokens: allowed only where the grammar accepts.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from steerserve.types.grammar import GrammarError, GrammarKind, GrammarSpec
from steerserve.types.step import ScheduledRequest

if TYPE_CHECKING:
    import xgrammar as xgr


def _xgr():
    """xgrammar, imported on first use: a process that never constrains an output never loads it."""
    import xgrammar

    return xgrammar


CACHE_SIZE = 256  # compiled grammars kept (a compiled JSON schema is tens of KB)


class GrammarCache:
    """Compiled grammars by (kind, source), LRU; thread-safe (API pool threads and the engine thread)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int], size: int = CACHE_SIZE):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._size = size
        self._compiled: OrderedDict[GrammarSpec, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._compiler: xgr.GrammarCompiler | None = None  # built on first use (~0.1 s for 50k tokens)
        self.hits = self.misses = 0
        self.json_allowed: torch.Tensor | None = None  # [W] int32: tokens valid JSON text can hold
        self.eos_only: torch.Tensor | None = None  # [W] int32: EOS alone

    def is_json(self, spec: GrammarSpec) -> bool:
        return spec.kind in (GrammarKind.JSON_OBJECT, GrammarKind.JSON_SCHEMA)

    def _get_compiler(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                info = _xgr().TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self.vocab_size, stop_token_ids=self._eos
                )
                self._compiler = _xgr().GrammarCompiler(info, cache_enabled=False)
                self.json_allowed = _without_control_bytes(info, self.vocab_size)
                self.eos_only = torch.zeros_like(self.json_allowed)
                for tid in self._eos:
                    self.eos_only[tid // 32] |= 1 << (tid % 32)
            return self._compiler

    def compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        with self._lock:
            hit = self._compiled.get(spec)
            if hit is not None:
                self._compiled.move_to_end(spec)
                self.hits += 1
                return hit
            self.misses += 1
        compiled = _compile(self._get_compiler(), spec)  # NOTE: outside the lock: other specs go on
        with self._lock:
            self._compiled[spec] = compiled
            while len(self._compiled) > self._size:
                self._compiled.popitem(last=False)
        return compiled


def _without_control_bytes(info: xgr.TokenizerInfo, vocab: int) -> torch.Tensor:
    """Bitmask row allowing the tokens with no byte below 0x20. NOTE: xgrammar's JSON strings take raw
    control characters, which JSON forbids (json.loads and pydantic refuse them); compact JSON holds
    none anywhere, so for JSON grammars these tokens are masked too. Special tokens (EOS) stay allowed."""
    mask = _xgr().allocate_token_bitmask(1, vocab)[0]
    special = set(info.special_token_ids) | set(info.stop_token_ids)
    for tid, piece in enumerate(info.decoded_vocab[:vocab]):
        if tid not in special and any(b < 0x20 for b in piece):
            mask[tid // 32] &= ~(1 << (tid % 32))
    return mask


# compact JSON: a random or weak model cannot loop on whitespace, and every output parses as it is
_SEPARATORS = (",", ":")


def _compile(compiler: xgr.GrammarCompiler, spec: GrammarSpec) -> xgr.CompiledGrammar:
    try:
        if spec.kind is GrammarKind.JSON_OBJECT:
            return compiler.compile_json_schema(
                '{"type": "object"}', any_whitespace=False, separators=_SEPARATORS
            )
        if spec.kind is GrammarKind.JSON_SCHEMA:
            json.loads(spec.source)  # a clear message for text that is not JSON
            return compiler.compile_json_schema(spec.source, any_whitespace=False, separators=_SEPARATORS)
        if spec.kind is GrammarKind.REGEX:
            return compiler.compile_regex(spec.source)
        return compiler.compile_grammar(spec.source)
    except Exception as exc:  # xgrammar raises RuntimeError / ValueError / its own errors
        lines = str(exc).strip().splitlines()
        # NOTE: drop xgrammar's "[time] file.cc:line: " prefix: the client gets the reason only
        raise GrammarError(
            re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", lines[0]) if lines else type(exc).__name__
        ) from None


@dataclass(slots=True)
class _Matcher:
    matcher: xgr.GrammarMatcher
    json: bool  # a JSON grammar: control bytes masked as well
    accepted: int = 0  # output tokens the matcher has taken


class GrammarRows:
    """Each constrained request's matcher, and the step's bitmask of the sampled rows."""

    def __init__(self, cache: GrammarCache):
        self.cache = cache
        self._matchers: dict[str, _Matcher] = {}

    def admit(self, request_id: str, spec: GrammarSpec) -> None:
        compiled = self.cache.compile(spec)
        self._matchers[request_id] = _Matcher(_xgr().GrammarMatcher(compiled), self.cache.is_json(spec))

    def forget(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._matchers

    def bitmask(
        self, scheduled: Sequence[ScheduledRequest], sample_ids: Sequence[str], device
    ) -> torch.Tensor | None:
        """[R, ceil(V/32)] int32 bitmask of the sampled rows (all ones for unconstrained rows), or None
        when no sampled row is constrained. Advances each constrained request's matcher first."""
        if not self._matchers or not any(rid in self._matchers for rid in sample_ids):
            return None
        items = {item.request_id: item for item in scheduled}
        mask = _xgr().allocate_token_bitmask(len(sample_ids), self.cache.vocab_size)  # -1: all allowed
        for row, rid in enumerate(sample_ids):
            m = self._matchers.get(rid)
            if m is not None:
                self._advance(m, items[rid])
                if m.matcher.is_terminated():  # EOS taken and ignored (ignore_eos): only EOS again
                    mask[row] = self.cache.eos_only
                    continue
                m.matcher.fill_next_token_bitmask(mask, row)
                if m.json:
                    mask[row] &= self.cache.json_allowed
        return mask.to(device, non_blocking=True)

    @staticmethod
    def _advance(m: _Matcher, item: ScheduledRequest) -> None:
        """Feed the matcher the output tokens of this chunk it has not taken yet."""
        first = item.start - item.num_prompt_tokens  # output index of token_ids[0] (negative: prompt)
        for i, tok in enumerate(item.token_ids):
            if first + i < m.accepted:
                continue
            if m.matcher.is_terminated():
                return  # past EOS (ignore_eos): nothing more to take
            if not m.matcher.accept_token(tok):
                raise GrammarError(f"output token {first + i} ({tok}) is outside the request's grammar")
            m.accepted += 1
