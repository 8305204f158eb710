"""Incremental detokenization: deltas add up to the full decode; stop strings cut and are never streamed."""

from __future__ import annotations

from steerserve.engine.tokenizer import Detokenizer
from steerserve.runner.model_loader import byte_tokenizer


def run(text: str, stop=(), prompt="Q: "):
    tok = byte_tokenizer()
    d = Detokenizer.for_prompt(tok, tok(prompt)["input_ids"], tuple(stop))
    streamed, stopped = "", False
    for t in tok(text, add_special_tokens=False)["input_ids"]:
        stopped = d.add(t)
        streamed += d.take(final=stopped)
        if stopped:
            break
    if not stopped:
        d.flush()
        streamed += d.take(final=True)
    return streamed, stopped


def test_deltas_add_up_including_multibyte_characters():
    text = "héllo wörld ✓ 猫"
    assert run(text) == (text, False)


def test_stop_string_cuts_the_text_and_is_never_emitted():
    out, stopped = run("the cat sat. The END is near", stop=["END"])
    assert stopped and out == "the cat sat. The "


def test_partial_stop_prefix_is_held_back_then_released():
    tok = byte_tokenizer()
    d = Detokenizer.for_prompt(tok, [], ("STOP",))
    emitted = ""
    for t in tok("xxST", add_special_tokens=False)["input_ids"]:
        assert not d.add(t)
        emitted += d.take(final=False)
    assert "S" not in emitted  # "ST" could begin "STOP": held back
    for t in tok("AR", add_special_tokens=False)["input_ids"]:
        assert not d.add(t)
        emitted += d.take(final=False)
    d.flush()
    emitted += d.take(final=True)
    assert emitted == "xxSTAR"
