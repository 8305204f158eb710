"""Scheduler rules, without a model: budgets, chunking, slot limits, stop rules, preemption order."""

from __future__ import annotations

from steerserve.config import SchedulerConfig
from steerserve.engine.kv_cache import BlockAllocator
from steerserve.engine.scheduler import Scheduler
from steerserve.types.requests import FinishReason, GenerationRequest, SamplingParams


def make(max_num_seqs=4, budget=32, chunk=16, blocks=64, bs=4, max_len=256):
    cfg = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, long_prefill_token_threshold=chunk
    )
    return Scheduler(cfg, BlockAllocator(blocks, bs), max_len, eos_ids=(99,))


def req(rid, n_prompt, max_tokens=8, **kw):
    return GenerationRequest(
        rid, tuple(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)
    )


def step(s, token=7):
    out = s.schedule()
    sampled = {item.request_id: token for item in out.scheduled if item.sample}
    return out, s.update(out, sampled)


def test_long_prompt_is_chunked_and_decode_mixes_with_prefill():
    s = make(budget=20, chunk=16)
    s.add(req("short", 3))
    out, _ = step(s)
    assert [(i.request_id, len(i.token_ids), i.sample) for i in out.scheduled] == [("short", 3, True)]
    s.add(req("long", 40))
    out, _ = step(s)
    # the decode token of "short" and a chunk of "long" share the step, within the budget
    assert [(i.request_id, len(i.token_ids), i.sample) for i in out.scheduled] == [
        ("short", 1, True),
        ("long", 16, False),
    ]
    out, _ = step(s)
    assert [(i.request_id, len(i.token_ids)) for i in out.scheduled] == [("short", 1), ("long", 16)]
    out, _ = step(s)
    assert [(i.request_id, len(i.token_ids), i.sample) for i in out.scheduled] == [
        ("short", 1, True),
        ("long", 8, True),
    ]
    assert out.scheduled[1].start == 32


def test_max_num_seqs_limits_the_running_batch():
    s = make(max_num_seqs=2, budget=100)
    for i in range(5):
        s.add(req(str(i), 2))
    out, _ = step(s)
    assert len(out.scheduled) == 2 and len(s.waiting) == 3


def test_stop_rules_and_finished_ids_reach_the_runner():
    s = make()
    s.add(req("eos", 2, max_tokens=5))
    s.add(req("len", 2, max_tokens=2, ignore_eos=True))
    s.add(req("stop_id", 2, max_tokens=9, ignore_eos=True, stop_token_ids=(7,)))
    _, advanced = step(s, token=99)
    finished = {st.request_id: st.finish_reason for st in advanced if st.finish_reason}
    assert finished == {"eos": FinishReason.STOP}
    _, advanced = step(s, token=7)
    finished = {st.request_id: st.finish_reason for st in advanced if st.finish_reason}
    assert finished == {"len": FinishReason.LENGTH, "stop_id": FinishReason.STOP}
    out = s.schedule()
    assert set(out.finished_ids) == {"len", "stop_id"} and not s.has_work()
    assert s.allocator.num_free_blocks == s.allocator.num_blocks


def test_out_of_blocks_preempts_the_newest_and_resumes_it_first():
    s = make(max_num_seqs=4, budget=64, chunk=64, blocks=6, bs=4, max_len=24)
    s.add(req("old", 8, max_tokens=12))
    s.add(req("new", 8, max_tokens=12))
    step(s)  # both prefilled: 2 + 2 blocks (+ growth room)
    for _ in range(6):
        step(s)
    assert s.num_preemptions >= 1
    assert s.requests["new"].num_preemptions >= 1 and s.requests["old"].num_preemptions == 0
    while s.has_work():
        step(s)
    assert s.allocator.num_free_blocks == 6


def test_abort_frees_blocks_at_once():
    s = make()
    s.add(req("a", 10))
    step(s)
    used = s.allocator.num_blocks - s.allocator.num_free_blocks
    assert used > 0
    s.finish("a", FinishReason.ABORT)
    assert s.allocator.num_free_blocks == s.allocator.num_blocks and not s.has_work()
    assert s.schedule().finished_ids == ("a",)
