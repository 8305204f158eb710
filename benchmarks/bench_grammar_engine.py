"""Why xgrammar (runner/grammar.py): the grammar engines measured on a GPT-2-sized vocabulary.

A byte-level BPE of 50,257 tokens is trained here on the Python standard library's sources (no
download), then for xgrammar and llguidance: the compile time of a nested JSON schema, and the time to
fill one row's token mask at each token of a valid document (the cost the engine thread pays every step).

    python benchmarks/bench_grammar_engine.py
"""

from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "bb", "ccc"]}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "geo": {
                    "type": "object",
                    "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                    "required": ["lat", "lon"],
                },
            },
            "required": ["street", "geo"],
        },
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "price": {"type": "number"},
                    "kind": {"enum": ["x", "y"]},
                },
                "required": ["id", "price", "kind"],
            },
        },
    },
    "required": ["name", "age", "tags", "address", "items"],
    "additionalProperties": False,
}
DOC = {
    "name": "Bob Smith",
    "age": 42,
    "tags": ["a", "ccc"],
    "address": {"street": "Main St 5", "geo": {"lat": 1.5, "lon": -2.25}},
    "items": [{"id": 1, "price": 3.5, "kind": "x"}, {"id": 22, "price": 10, "kind": "y"}],
}


def gpt2_sized_tokenizer(folder: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    files, total = [], 0
    for f in sorted(glob.glob(os.path.dirname(os.__file__) + "/**/*.py", recursive=True)):
        files.append(f)
        total += os.path.getsize(f)
        if total > 30e6:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=50257,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )

    def texts():  # NOTE: a few stdlib test files are not UTF-8 on purpose
        for f in files:
            with open(f, encoding="utf-8", errors="ignore") as fh:
                yield fh.read()

    tok.train_from_iterator(texts(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def _mask_stats(fill, accept, ids) -> tuple[float, float]:
    times = []
    for tid in ids:
        t = time.perf_counter()
        fill()
        times.append(time.perf_counter() - t)
        assert accept(tid), tid
    return sum(times) / len(times) * 1e6, max(times) * 1e6


def bench_xgrammar(tok, ids) -> dict:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok), stop_token_ids=[tok.eos_token_id])
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    compile_ms = (time.perf_counter() - t) * 1e3
    m, mask = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, len(tok))
    mean, worst = _mask_stats(lambda: m.fill_next_token_bitmask(mask), m.accept_token, ids)
    return {"compile_ms": compile_ms, "mask_mean_us": mean, "mask_max_us": worst}


def bench_llguidance(tok, ids) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lt = llguidance.hf.from_tokenizer(tok, n_vocab=len(tok), eos_token=tok.eos_token_id)
    t = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(SCHEMA), defaults={"whitespace_flexible": False}
    )
    m = llguidance.LLMatcher(lt, grammar)
    compile_ms = (time.perf_counter() - t) * 1e3
    mask = llguidance.torch.allocate_token_bitmask(1, len(tok))
    mean, worst = _mask_stats(
        lambda: llguidance.torch.fill_next_token_bitmask(m, mask, 0), m.consume_token, ids
    )
    return {"compile_ms": compile_ms, "mask_mean_us": mean, "mask_max_us": worst}


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        tok = gpt2_sized_tokenizer(folder)
    ids = tok.encode(json.dumps(DOC, separators=(",", ":"))) + [tok.eos_token_id]
    print(f"vocabulary {len(tok)} tokens, document {len(ids)} tokens", file=sys.stderr)
    for name, fn in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
        r = fn(tok, ids)
        print(
            f"{name:11s} compile {r['compile_ms']:6.1f} ms   mask mean {r['mask_mean_us']:6.0f} us"
            f"   max {r['mask_max_us']:6.0f} us"
        )


if __name__ == "__main__":
    main()
