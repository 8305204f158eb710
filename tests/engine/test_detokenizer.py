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


def _tokenizers():
    from transformers import AutoTokenizer

    from steerserve.demo.shipped import model_path

    yield "byte", byte_tokenizer()
    yield "demo", AutoTokenizer.from_pretrained(model_path())


def test_the_text_decoder_gives_what_the_tokenizers_decode_gives():
    """text_decoder takes the Rust backend's decode where that is what transformers' decode would do:
    random ids, special tokens among them, give the same text as tokenizer.decode for each tokenizer."""
    import random

    from steerserve.engine.tokenizer import text_decoder

    rng = random.Random(0)
    for name, tok in _tokenizers():
        decode = text_decoder(tok)
        assert getattr(decode.func, "__self__", None) is tok.backend_tokenizer, name  # the fast path
        specials = list(tok.all_special_ids)
        for _ in range(300):
            ids = [rng.randrange(len(tok)) for _ in range(rng.randint(0, 12))]
            ids += rng.sample(specials, k=min(len(specials), rng.randint(0, 2)))
            rng.shuffle(ids)
            assert decode(ids) == tok.decode(ids, skip_special_tokens=True), (name, ids)


def test_the_text_decoder_keeps_transformers_decode_where_it_would_differ():
    from steerserve.engine.tokenizer import text_decoder

    tok = byte_tokenizer()
    tok.clean_up_tokenization_spaces = True  # transformers' decode post-processes: no fast path
    decode = text_decoder(tok)
    assert decode.func == tok.decode
    ids = tok("a , b .", add_special_tokens=False)["input_ids"]
    assert decode(ids) == tok.decode(ids, skip_special_tokens=True)
