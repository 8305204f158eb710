"""Engine jobs (engine/jobs.py): `AsyncEngine.run_job` runs work on the engine thread between two steps,
on a real engine over a tiny model.

Everything is queued before the engine thread starts, so its first inbox sweep takes it all and the run is
deterministic: one job before each step, so job k sees exactly the tokens of k steps. Readouts through the
real `FeatureReadout` return what the same call returns alone; a job that raises fails its own future,
and the requests generating meanwhile produce exactly the tokens they produce alone. Once the engine died
or stopped, every queued and later job fails with EngineDeadError, and a later one at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest
import torch

from steerserve.engine import faults
from steerserve.engine.engine import AsyncEngine, EngineDeadError
from steerserve.interp.readout import FeatureReadout
from steerserve.types.requests import GenerationRequest, SamplingParams
from steerserve.types.sites import Site
from steerserve.types.steering import SAERef
from tests.engine.helpers import run_staggered, tiny_engine
from tests.steering.conftest import random_sae

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = ((5, 17, 300, 2, 9), (40, 41, 42, 43, 44, 45, 46, 47, 48), (7, 7, 7), (250, 3, 99, 120, 8, 61, 14))
BROKEN = 7002  # the sampling seed the armed device fault keys on
WAIT_S = 60  # a job or output later than this hangs: the test fails instead of waiting forever


class JobFailed(RuntimeError):
    pass


def _explode(k: int) -> None:
    raise JobFailed(f"job {k} failed on purpose")


@pytest.fixture(scope="module")
def built(tiny_model_dir):
    b = tiny_engine(tiny_model_dir("gpt2"))
    sae = random_sae(b.info.d_model, Site(0, "resid_post"), seed=11)
    b.registry.add_sae(sae, sae_id="jobs-sae", model=b.info.name, fit=b.info)
    return b


def _requests(tag: str) -> list[GenerationRequest]:
    return [GenerationRequest(f"{tag}{i}", p, GREEDY) for i, p in enumerate(PROMPTS)]


async def _wait(future):
    return await asyncio.wait_for(asyncio.wrap_future(future), WAIT_S)


def test_jobs_run_between_steps_and_a_failing_job_harms_nothing(built):
    core = built.core
    alone = [run_staggered(core, [r])[r.request_id][0] for r in _requests("alone")]
    assert all(len(tokens) == GREEDY.max_tokens for tokens in alone)
    readout = FeatureReadout(built.steering.resources)
    ref = SAERef("jobs-sae", built.registry.get_sae("jobs-sae").uid)

    def live_tokens() -> tuple[int, str]:
        generated = sum(len(s.output_token_ids) for s in core.scheduler.requests.values())
        return generated, threading.current_thread().name

    async def main():
        engine = AsyncEngine(core)
        requests = _requests("r")
        stream = engine.submit(requests)
        n_steps = GREEDY.max_tokens  # the prompts prefill together in the first step
        jobs = []
        for k in range(n_steps):
            if k % 4 == 1:
                jobs.append(("fails", engine.run_job(_explode, k)))
            elif k == 2:
                jobs.append(("effect", engine.run_job(readout.logit_effect, ref, 3)))
            elif k == 6:
                jobs.append(("promotion", engine.run_job(readout.promotion_scores, ref, 17)))
            else:
                jobs.append(("progress", engine.run_job(live_tokens)))
        engine.start()
        try:
            tokens = {r.request_id: [] for r in requests}
            reasons = {}
            while len(reasons) < len(requests):
                out = await asyncio.wait_for(stream.get(), WAIT_S)
                assert out.error is None, out.error
                tokens[out.request_id].extend(out.token_ids)
                if out.finish_reason is not None:
                    reasons[out.request_id] = out.finish_reason.value
            results = []
            for k, (kind, future) in enumerate(jobs):
                if kind == "fails":
                    with pytest.raises(JobFailed, match=f"job {k} failed on purpose"):
                        await _wait(future)
                    results.append((kind, None))
                else:
                    results.append((kind, await _wait(future)))
            after = await _wait(engine.run_job(live_tokens))  # the engine still takes jobs
            return tokens, reasons, results, after
        finally:
            engine.shutdown()

    tokens, reasons, results, after = asyncio.run(main())
    assert reasons == dict.fromkeys(tokens, "length")
    assert [tokens[f"r{i}"] for i in range(len(PROMPTS))] == alone, "a job changed what requests generate"
    for k, (kind, value) in enumerate(results):
        if kind == "progress":  # job k ran after step k and before step k + 1: never during one
            assert value == (len(PROMPTS) * k, "steerserve-engine"), (k, value)
    effect = dict(results)["effect"]
    ln, unembed = built.model.transformer.ln_f, built.model.lm_head.weight
    with torch.no_grad():  # GPT-2's readout (runner/steering/resources.py): U (N(W_dec[f]) - N(0))
        w = built.registry.load_sae("jobs-sae")[1].W_dec[3]
        expected = unembed @ (ln(w) - ln(torch.zeros_like(w)))
    assert effect.shape == (built.info.vocab_size,) and expected.abs().max() > 0.1
    torch.testing.assert_close(effect, expected, rtol=1e-4, atol=1e-4)
    scores = dict(results)["promotion"]
    assert scores.shape == (built.registry.get_sae("jobs-sae").d_sae,) and scores.abs().max() > 0
    assert torch.equal(scores, readout.promotion_scores(ref, 17))
    assert after == (0, "steerserve-engine")


def test_jobs_fail_once_the_engine_died(tiny_model_dir):
    """A job queued before the fatal step runs; one still queued fails with the cause; one asked for later
    fails at once (its future is done when run_job returns)."""
    core = tiny_engine(tiny_model_dir("gpt2")).core
    ran = []

    async def main():
        engine = AsyncEngine(core)
        broken = GenerationRequest("broken", (1, 2, 3), dataclasses.replace(GREEDY, seed=BROKEN))
        stream = engine.submit([broken])
        first = engine.run_job(ran.append, "first")
        queued = engine.run_job(ran.append, "queued")
        faults.configure(f"device:{BROKEN}")
        engine.start()
        try:
            out = await asyncio.wait_for(stream.get(), WAIT_S)
            assert out.finish_reason.value == "error" and "injected device fault" in out.error
            assert await _wait(first) is None
            with pytest.raises(EngineDeadError, match="injected device fault"):
                await _wait(queued)
            late = engine.run_job(ran.append, "late")
            assert late.done() and engine.dead is not None
            with pytest.raises(EngineDeadError, match="injected device fault"):
                late.result(timeout=0)
        finally:
            faults.configure("")
            engine.shutdown()

    asyncio.run(main())
    assert ran == ["first"]


def test_jobs_fail_once_the_engine_stopped(built):
    ran = []

    async def main():
        engine = AsyncEngine(built.core)
        never_started = AsyncEngine(built.core)
        stranded = never_started.run_job(ran.append, "stranded")
        never_started.shutdown()
        with pytest.raises(EngineDeadError, match="the engine stopped"):
            stranded.result(timeout=0)
        engine.start()
        assert await _wait(engine.run_job(ran.append, "ran")) is None
        engine.shutdown()
        late = engine.run_job(ran.append, "late")
        with pytest.raises(EngineDeadError, match="the engine stopped"):
            late.result(timeout=0)

    asyncio.run(main())
    assert ran == ["ran"]
