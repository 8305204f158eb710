"""The command channel between tensor-parallel ranks (engine/wire.py, engine/distributed.py): a step's
SchedulerOutput, steering and grammars included, arrives whole on the other rank; every rank's refusals
are merged identically; and the receiving side builds only steerserve's plain types (a forged payload
naming anything else is refused, never run)."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import pickle

import pytest

from steerserve.engine.distributed import CommandChannel, forward_share
from steerserve.engine.wire import Command, WireError, decode, encode
from steerserve.types.grammar import GrammarKind, GrammarSpec
from steerserve.types.requests import FeatureCapture, SamplingParams
from steerserve.types.sites import Site
from steerserve.types.steering import (
    FeatureAdd,
    FeatureClamp,
    Gate,
    LogitBiasTerm,
    Positions,
    SAERef,
    SteeringSpec,
    VectorAdd,
    VectorProject,
    VectorRef,
)
from steerserve.types.step import ScheduledRequest, SchedulerOutput
from tests.server_process import free_port


def a_step(n: int = 7) -> SchedulerOutput:
    a, v = SAERef("a", "uid-a"), VectorRef("v", "uid-v")
    s0, s1 = Site(0, "resid_post"), Site(1, "resid_pre")
    spec = SteeringSpec.build(
        [
            FeatureAdd(site=s0, positions=Positions.ALL, sae=a, index=3, strength=4.5),
            FeatureClamp(site=s0, positions=Positions.GENERATED, sae=a, index=5, value=-2.25),
            VectorAdd(
                site=s0, positions=Positions.ALL, vector=v, strength=3.0, gate=Gate(a, 1, s0, above=0.5)
            ),
            VectorProject(site=s1, positions=Positions.PROMPT, vector=v, lo=-0.5, hi=0.5),
        ],
        [LogitBiasTerm(a, 7, 5.0)],
    )
    items = []
    for i in range(n):
        prompt = tuple(range(i, i + 5 + i))
        sampling = SamplingParams(
            max_tokens=9, temperature=0.7, stop=("\n\n", "é✓"), seed=i,
            grammar=GrammarSpec(GrammarKind.JSON_SCHEMA, '{"type": "object"}') if i % 3 == 0 else None,
        )  # fmt: skip
        items.append(
            ScheduledRequest(
                request_id=f"req-{i}",
                token_ids=prompt[-1:],
                start=len(prompt) - 1,
                block_ids=(i, i + 1),
                sample=True,
                num_prompt_tokens=len(prompt),
                prompt_token_ids=prompt,
                sampling=sampling,
                steering=spec if i % 2 else None,
                capture=FeatureCapture("a", "uid-a", 4, "all") if i == 1 else None,
            )  # fmt: skip
        )
    return SchedulerOutput(tuple(items), ("gone-1", "gone-2"), sum(len(x.token_ids) for x in items))


def same(a, b) -> bool:
    """Equal, and of the same types all the way down (a StrEnum equals its string: == alone misses it)."""
    if type(a) is not type(b):
        return False
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b or (a != a and b != b)  # NaN


def test_a_step_round_trips_whole():
    step = a_step()
    got = decode(encode((Command.STEP, step)))
    assert got == (Command.STEP, step) and same(got, (Command.STEP, step))
    assert type(got[1].scheduled[1].steering.interventions[0].site.hook).__name__ == "Hook"


def test_the_other_ranks_step_drops_only_captures_and_grammars():
    step = a_step()
    shared = forward_share(step)
    assert all(x.capture is None and x.sampling.grammar is None for x in shared.scheduled)
    assert any(x.capture is not None for x in step.scheduled)
    for full, share in zip(step.scheduled, shared.scheduled, strict=True):
        assert (share.token_ids, share.start, share.block_ids, share.steering, share.sampling.seed) == (
            full.token_ids, full.start, full.block_ids, full.steering, full.sampling.seed,
        )  # fmt: skip


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(Boom()),  # not JSON at all
        b'{"d": "os.system", "f": ["echo pwned"]}',
        b'{"d": "subprocess.Popen", "f": [["echo", "pwned"]]}',
        b'{"e": "builtins.type", "v": 1}',
        b'{"d": "steerserve.types.sites.Site", "f": [1]}',  # a plain type with a field missing
        b'{"d": "steerserve.types.step.is_run", "f": []}',  # a function of a plain types module
        b'{"x": 1}',
        b'{"t": [1], "s": [2], "m": []}',
    ],
)
def test_forged_payloads_are_refused(payload):
    with pytest.raises(WireError):
        decode(payload)


def test_values_arrive_exactly():
    values = [float("nan"), float("inf"), -0.0, 1e-310, 2**70, "\udc80 lone", frozenset({1, 2}),
              {(1, 2): "tuple key", 3: None}, (Command.NOOP, [1, (2,)])]  # fmt: skip
    got = decode(encode(values))
    assert repr(got) == repr(values) and same(got, values)
    with pytest.raises(WireError):
        encode(object())


def _rank(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        ch = CommandChannel()
        step = a_step()
        if rank == 0:
            ch.send((Command.STEP, step))
            ch.send((Command.NOOP, None))
        else:
            assert ch.recv() == (Command.STEP, step)
            assert ch.recv() == (Command.NOOP, None)
        refused = {"req-1": "NotFound: sae a"} if rank == 0 else {"req-1": "other", "req-4": "gone"}
        merged = ch.union(refused)
        blocks = ch.agree_min(100 + rank * 7, 2048 - rank)
        out.put((rank, merged, blocks))
        dist.destroy_process_group()
    except BaseException as exc:
        out.put((rank, f"{type(exc).__name__}: {exc}", None))


def test_two_ranks_send_receive_merge_and_agree():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict((r, (m, b)) for r, m, b in (out.get(timeout=60) for _ in procs))
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    expected = {"req-1": "NotFound: sae a", "req-4": "rank 1: gone"}
    assert results[0] == (expected, (100, 2047)), results
    assert results[1] == (expected, (100, 2047)), results


def test_prompts_travel_once_and_are_put_back():
    """Rank 0 sends a request's prompt, sampling and steering with its first step only; the other ranks
    put them back in every later one (captures stay rank 0's), and forget them when it finishes."""
    from steerserve.engine.distributed import with_known_prompts, without_known_prompts

    step = a_step()
    sent, held = set(), {}
    first = without_known_prompts(step, sent)
    assert first == step  # all new: everything goes
    assert with_known_prompts(decode(encode(first)), held) == step
    later = without_known_prompts(step, sent)
    assert all(x.prompt_token_ids == () and x.steering is None for x in later.scheduled)
    assert len(encode(later)) < len(encode(step)) / 2
    restored = with_known_prompts(decode(encode(later)), held)
    assert forward_share(restored) == forward_share(step)
    done = SchedulerOutput(step.scheduled[1:], ("req-0",), 1)
    assert forward_share(with_known_prompts(without_known_prompts(done, sent), held)) == forward_share(done)
    assert "req-0" not in sent and "req-0" not in held
