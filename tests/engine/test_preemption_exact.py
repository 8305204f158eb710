"""Recompute after preemption is exact: every output of a run under a tiny, fragmented KV cache equals
the same request run alone, token for token (issue #18).

The randomized run: calls arrive at random steps (greedy and seeded-sampled, steered and not, with
`return_unsteered` twins, `n > 1` and `return_features` captures), some are aborted, prefill chunks are
small, and a 256-token cache is shared by far more than it holds, so requests are preempted (also after
they generated tokens), recomputed from prompt + generated tokens, often into scattered blocks. The
reference is the shipped demo model in a second engine with a roomy cache, one request at a time. Both
CPU attention paths run: the C++ kernels, and PyTorch SDPA (a view of the cache for requests whose
blocks form one run, `index_select` for the others).
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from steerserve.api.convert import child_seed
from steerserve.api.plan import feature_capture
from steerserve.config import SteeringConfig
from steerserve.demo.shipped import DEMO_SAE_ID, model_path, register_demo
from steerserve.engine.kv_cache import BlockAllocator, BlockTable
from steerserve.registry import FeatureInfo, SteeringVector
from steerserve.runner import cpu_attention, cpu_sgemm
from steerserve.steering.compile import compile_steering
from steerserve.types.requests import GenerationRequest, SamplingParams
from steerserve.types.sites import Site
from steerserve.types.step import is_run
from tests.engine.helpers import tiny_engine

# NOTE: each seed's run has 28-167 preemptions, recomputes with generated tokens, scattered blocks and
# captures; while a table whose first and last blocks spanned its length was attended as a view of the
# cache (test_is_run_needs_every_block_in_order), 2 requests of each differed on both attention paths
SEEDS = (7, 8, 14)
CHUNKS = (4, 8, 16)  # long_prefill_token_threshold
BUDGETS = (16, 32, 48)  # max_num_batched_tokens
CACHE_TOKENS = 256  # the least plan_kv_cache accepts; the demo model's max_model_len
KV_BYTES_PER_TOKEN = 2 * 4 * 4 * 32 * 4  # k and v x 4 layers x 4 heads x head_dim 32 x fp32
VECTOR_ID = "preempt-v2"


def _feature(index: int) -> dict:
    return {"sae": DEMO_SAE_ID, "index": index}


STEERING = (  # (steering, variant, stop_when) as a request carries them
    ([{"feature": _feature(54), "mode": "add", "strength": 2.0, "scale": "max_activation"}], None, None),
    ([{"feature": _feature(82), "mode": "clamp", "value": 3.0}], None, None),
    (
        [
            {
                "vector": VECTOR_ID,
                "mode": "add",
                "strength": 4.0,
                "when": {"feature": _feature(976), "above": 0.3, "latch": True},
            },
            {"feature": _feature(28), "mode": "add", "strength": 1.5, "positions": "generated"},
        ],
        None,
        None,
    ),
    (None, "hot", None),
    (  # resample ablation (#27): draws keyed by the token's position, so a recompute draws the same
        [
            {"feature": _feature(82), "mode": "ablate", "to": "resample"},
            {"vector": VECTOR_ID, "mode": "project_out", "to": "resample", "positions": "generated"},
        ],
        None,
        None,
    ),
    (
        [{"vector": VECTOR_ID, "mode": "add", "strength": -2.0}],
        None,
        [{"feature": _feature(976), "above": 0.6}],
    ),
)


@dataclasses.dataclass
class Outcome:
    tokens: list[int] = dataclasses.field(default_factory=list)
    reason: str | None = None
    features: list = dataclasses.field(default_factory=list)  # TokenFeatures, in the order reported

    def add(self, out) -> None:
        self.tokens.extend(out.token_ids)
        self.features.extend(out.features)
        if out.finish_reason is not None:
            self.reason = out.finish_reason.value


class Engines:
    """A stress engine per block size (tiny cache) and one reference engine (roomy cache), one registry."""

    def __init__(self, tmp_dir: str):
        self.tmp_dir = tmp_dir
        steering = SteeringConfig(max_steering_rows=4)
        self.ref = tiny_engine(
            str(model_path()), max_num_seqs=1, budget_tokens=512, chunk=512, block_size=16, kv_gb=0.01,
            data_dir=tmp_dir, steering=steering,
        )  # fmt: skip
        reg, info = self.ref.registry, self.ref.info
        register_demo(reg, info)
        g = torch.Generator().manual_seed(5)
        vec = torch.randn(info.d_model, generator=g) * 0.5
        reg.add_vector(SteeringVector.of({Site(2, "resid_post"): vec}), vector_id=VECTOR_ID, model=info.name)
        reg.put_features(
            DEMO_SAE_ID, [FeatureInfo(index=82, density=0.35, active_sample=(0.4, 1.2, 2.5, 5.0))]
        )
        reg.put_vector_stats(VECTOR_ID, {Site(2, "resid_post"): (-2.0, -0.5, 0.3, 1.1, 3.0)})
        self.specs = [compile_steering(reg, info, steering, s, None, v, stop) for s, v, stop in STEERING]
        self.capture = feature_capture(reg, info, DEMO_SAE_ID, 4, "generated")
        self._stress: dict[int, object] = {}

    def stress(self, block_size: int):
        if block_size not in self._stress:
            self._stress[block_size] = tiny_engine(
                str(model_path()), max_num_seqs=24, block_size=block_size,
                kv_gb=CACHE_TOKENS * KV_BYTES_PER_TOKEN / 2**30, max_model_len=CACHE_TOKENS,
                data_dir=self.tmp_dir, steering=SteeringConfig(max_steering_rows=4),
                prefix_caching=False,  # NOTE: sharing saves blocks, and this run must preempt a lot
            )  # fmt: skip
        return self._stress[block_size]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    # NOTE: one thread: on a model this small more threads only add synchronisation (10x slower on a
    # busy 2-core machine); no output depends on it (each kernel work item is computed by one thread).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            # the fp32 linear layers on our own GEMM kernel (runner/cpu_sgemm.py) on any CPU that builds it,
            # not only where it is the default (AVX2 without AVX-512)
            mp.setenv("STEERSERVE_CPU_SGEMM", "1")
            built = Engines(str(tmp_path_factory.mktemp("preempt")))
            engines = [built.ref, built.stress(4), built.stress(2)]  # every block size the seeds use
        assert not cpu_sgemm.load() or all(
            isinstance(m._ss_packed, cpu_sgemm.PackedWeight)
            for e in engines
            for m in e.core.runner.model.modules()
            if hasattr(m, "_ss_packed")
        )
        yield built
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(params=["kernel", "sdpa"])
def attention_path(request, monkeypatch):
    if request.param == "kernel":
        if not cpu_attention.available():
            pytest.skip("the C++ CPU attention cannot be built here")
    else:
        monkeypatch.setattr(cpu_attention, "load", lambda: None)
    return request.param


def _calls(rng: random.Random, engines: Engines) -> list[list[GenerationRequest]]:
    """Calls as the API fans them out (api/plan.py): n choices (a seed per choice), then the twins."""
    calls = []
    for c in range(rng.randrange(12, 18)):
        prompt = tuple(rng.randrange(3, 1024) for _ in range(rng.randrange(1, 48)))
        max_tokens = rng.randrange(4, 36)
        spec = rng.choice(engines.specs) if rng.random() < 0.6 else None
        capture = engines.capture if rng.random() < 0.25 else None
        n = rng.choice((1, 1, 1, 2, 3))
        twins = spec is not None and rng.random() < 0.5
        seed = rng.getrandbits(63)
        sampled = rng.random() < 0.35
        out = []
        for i in range(n):
            sp = SamplingParams(
                max_tokens=max_tokens, temperature=0.8 if sampled else 0.0, top_k=rng.choice((0, 40)),
                seed=child_seed(seed, i) if n > 1 else seed, ignore_eos=rng.random() < 0.7,
                repetition_penalty=1.3 if rng.random() < 0.2 else 1.0,
            )  # fmt: skip
            out.append(GenerationRequest(f"c{c}-{i}", prompt, sp, spec, capture=capture))
            if twins:
                out.append(GenerationRequest(f"c{c}-u{i}", prompt, sp, None, capture=capture))
        calls.append(out)
    return calls


def _run_stress(core, calls, rng: random.Random) -> tuple[dict[str, Outcome], dict]:
    """Random arrivals and aborts, to the end; each request's outcome, and what the run went through."""
    arrive = {c: rng.randrange(0, 24) for c in range(len(calls))}
    abort_at = {r.request_id: arrive[c] + rng.randrange(1, 30)
                for c, call in enumerate(calls) for r in call if rng.random() < 0.12}  # fmt: skip
    got = {r.request_id: Outcome() for call in calls for r in call}
    seen = {"preempted_with_output": 0, "fragmented": 0}
    sched = core.scheduler
    step = 0
    while step <= max(arrive.values()) or core.has_work():
        for c, call in enumerate(calls):
            if arrive[c] == step:
                for r in call:
                    core.add(r)
        for rid, at in abort_at.items():
            if at == step and got[rid].reason is None and (out := core.abort(rid)) is not None:
                got[rid].add(out)
        before = {rid: s.num_preemptions for rid, s in sched.requests.items()}
        for out in core.step():
            got[out.request_id].add(out)
        seen["preempted_with_output"] += sum(
            1
            for rid, s in sched.requests.items()
            if s.num_preemptions > before.get(rid, 0) and s.output_token_ids
        )
        seen["fragmented"] += sum(1 for s in sched.running if not s.blocks.is_contiguous())
        step += 1
        assert step < 5000, "the engine did not finish"
    return got, seen


def _resamples(spec) -> bool:
    return spec is not None and any(str(iv.kind).endswith("_resample") for iv in spec.interventions)


def _run_alone(core, request: GenerationRequest, memo: dict) -> Outcome:
    sp = request.sampling
    key = (
        request.prompt_token_ids,
        # greedy n > 1 choices are one run, unless they resample (each choice's seed is its draws' key)
        dataclasses.replace(sp, seed=None) if sp.greedy and not _resamples(request.steering) else sp,
        None if request.steering is None else request.steering.fingerprint,
        request.capture,
    )
    if key not in memo:
        core.add(dataclasses.replace(request, request_id=f"solo-{len(memo)}"))
        memo[key] = outcome = Outcome()
        while core.has_work():
            for out in core.step():
                outcome.add(out)
    return memo[key]


def _difference(got: Outcome, solo: Outcome) -> str | None:
    """Why `got` is not `solo` (an aborted request: not a prefix of it), or None."""
    aborted = got.reason == "abort"
    n = len(got.tokens)
    if got.tokens != (solo.tokens[:n] if aborted else solo.tokens):
        first = next(
            (i for i, (a, b) in enumerate(zip(got.tokens, solo.tokens, strict=False)) if a != b),
            min(n, len(solo.tokens)),
        )
        return f"tokens differ from position {first}"
    if not aborted and got.reason != solo.reason:
        return f"finished {got.reason}, alone {solo.reason}"
    positions = [f.position for f in got.features]
    if positions != [f.position for f in solo.features][: len(positions) if aborted else None]:
        return f"features captured at positions {positions}, alone at {[f.position for f in solo.features]}"
    for f, s in zip(got.features, solo.features, strict=False):
        if f.indices != s.indices or not torch.allclose(
            torch.tensor(f.values), torch.tensor(s.values), atol=1e-4
        ):
            return f"features at position {f.position} differ: {f} vs {s}"
    return None


@pytest.mark.parametrize("seed", SEEDS)
def test_every_output_equals_its_solo_run(engines, attention_path, seed):
    rng = random.Random(seed)
    core = engines.stress((4, 2)[seed % 2]).core  # block size
    core.scheduler.config = dataclasses.replace(
        core.scheduler.config,
        long_prefill_token_threshold=rng.choice(CHUNKS),
        max_num_batched_tokens=rng.choice(BUDGETS),
    )
    preempted_before = core.scheduler.num_preemptions
    calls = _calls(rng, engines)
    got, seen = _run_stress(core, calls, rng)

    preemptions = core.scheduler.num_preemptions - preempted_before
    assert preemptions >= 10, f"only {preemptions} preemptions: the cache was meant to be far too small"
    assert seen["preempted_with_output"] > 0, "no request was recomputed with generated tokens"
    assert seen["fragmented"] > 0, "no request ran in scattered blocks"
    alloc = core.scheduler.allocator
    assert alloc.num_free_blocks == alloc.num_blocks, "blocks leaked"

    requests = [r for call in calls for r in call]
    assert any(got[r.request_id].features for r in requests), "no capture ran"
    differences, memo = [], {}
    for r in requests:
        why = _difference(got[r.request_id], _run_alone(engines.ref.core, r, memo))
        if why is not None:
            differences.append(f"{r.request_id}: {why}")
    assert not differences, f"{len(differences)} of {len(requests)} differ from their solo run: {differences}"
    assert engines.ref.core.scheduler.num_preemptions == 0


def test_is_run_needs_every_block_in_order():
    """A table can own [1, 0, 3] (growth takes any free block): its first and last blocks span three,
    but cache rows of blocks 1..3 hold someone else's block 2. Not a run: it must be gathered."""
    assert is_run([]) and is_run([7]) and is_run([3, 4, 5])
    assert not is_run([1, 0, 3]) and not is_run([1, 3, 2, 4]) and not is_run([5, 4]) and not is_run([0, 2])


def test_freed_blocks_return_to_the_reservation_they_were_taken_from():
    """A block taken from A's reservation as a last resort goes back to A when freed: new requests are
    placed elsewhere, so A still grows into one run."""
    alloc = BlockAllocator(num_blocks=16, block_size=1)
    a = BlockTable()
    assert alloc.allocate(a, 1, expected_tokens=8)  # A reserves blocks 0..7
    fill = BlockTable()
    assert alloc.allocate(fill, 8, expected_tokens=8)  # 8..15
    hog = BlockTable()
    assert alloc.allocate(hog, 1)  # nothing unreserved is free: a block of A's reservation
    assert hog.block_ids[0] in range(1, 8)
    alloc.free(hog)
    alloc.free(fill)
    c = BlockTable()
    assert alloc.allocate(c, 1, expected_tokens=1)
    assert c.block_ids[0] >= 8, c.block_ids
    assert alloc.allocate(a, 8) and is_run(a.block_ids)
