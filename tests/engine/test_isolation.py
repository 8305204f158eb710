"""What one request brings never ends another or the engine: a request whose step fails ends alone with
the cause while its batch-mates produce their solo tokens; sampling fields beyond any sane range keep
their meaning instead of overflowing; non-finite logits end only the request they belong to; a request
keeps the SAE and vectors it was admitted with whatever the registry does meanwhile."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from steerserve.config import SteeringConfig
from steerserve.engine import faults
from steerserve.registry import SteeringVector
from steerserve.steering.compile import compile_steering
from steerserve.types.requests import FeatureCapture, GenerationRequest, SamplingParams
from steerserve.types.sites import Site
from steerserve.types.steering import LogitBiasTerm, Positions, SAERef, SteeringSpec, VectorAdd, VectorRef
from tests.conftest import ARCHS
from tests.engine.helpers import run_staggered, tiny_engine
from tests.steering.conftest import random_sae

POISON, BROKEN = 7001, 7002  # sampling seeds the armed faults key on
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def built(tiny_model_dir):
    return tiny_engine(tiny_model_dir("gpt2"), chunk=16, steering=SteeringConfig(max_steering_rows=8))


@pytest.fixture()
def armed():
    """`armed(spec)` arms STEERSERVE_INJECT_FAULTS-style faults in this process; disarmed afterwards."""
    yield faults.configure
    faults.configure("")


def run(core, requests, every=1, on_step=None) -> dict:
    """request id -> (tokens, finish reason, error message)."""
    errors: dict[str, str] = {}

    def collect(step, outputs):
        errors.update({o.request_id: o.error for o in outputs if o.error})
        if on_step is not None:
            on_step(step, outputs)

    got = run_staggered(core, requests, every=every, on_step=collect)
    return {rid: (toks, reason, errors.get(rid)) for rid, (toks, reason) in got.items()}


def solo(core, request) -> list[int]:
    tokens, reason, error = run(core, [request])[request.request_id]
    assert reason == "length" and error is None, error
    return tokens


def mixed_requests(poisoned: dict[int, int]) -> list[GenerationRequest]:
    """Greedy and seeded requests of several prompt lengths (one prefilled in chunks); request i carries
    seed `poisoned[i]` when given (a greedy request ignores its seed, so the seed only arms a fault)."""
    out = []
    for i, n in enumerate((5, 9, 40, 3, 12, 7)):
        prompt = tuple((17 * i + 5 * k) % 300 for k in range(n))
        if i % 2:
            sp = SamplingParams(max_tokens=10, temperature=0.9, seed=100 + i, ignore_eos=True)
        else:
            sp = GREEDY
        if i in poisoned:
            sp = dataclasses.replace(sp, seed=poisoned[i])
        out.append(GenerationRequest(f"r{i}", prompt, sp))
    return out


def assert_all_blocks_free(core):
    alloc = core.scheduler.allocator
    assert alloc.num_free_blocks == alloc.num_blocks and not core.has_work()


def test_a_request_whose_step_fails_ends_alone(built, armed):
    core = built.core
    clean = mixed_requests({})
    armed(f"forward:{POISON}")
    # requests 2 (greedy, prefilled in chunks) and 3 (sampled) fail in every step they are part of; they
    # arrive while the others prefill and decode
    got = run(core, mixed_requests({2: POISON, 3: POISON}), every=1)
    for i in (2, 3):
        tokens, reason, error = got[f"r{i}"]
        assert reason == "error" and tokens == [], got[f"r{i}"]
        assert "injected forward fault" in error and "InjectedFault" in error
    for i in (0, 1, 4, 5):
        tokens, reason, error = got[f"r{i}"]
        assert reason == "length" and error is None, error
        assert tokens == solo(core, clean[i]), f"request {i} changed because a batch-mate failed"
    assert_all_blocks_free(core)


def test_a_request_failing_alone_ends_and_the_engine_goes_on(built, armed):
    """No batch-mate to compare with: the engine's probe (a forward pass of no request) tells the
    request's failure from its own."""
    core = built.core
    armed(f"forward:{POISON}")
    poisoned = GenerationRequest("p", (1, 2, 3), dataclasses.replace(GREEDY, seed=POISON))
    tokens, reason, error = run(core, [poisoned])["p"]
    assert reason == "error" and "injected forward fault" in error
    after = GenerationRequest("after", (4, 5, 6), GREEDY)
    assert len(solo(core, after)) == GREEDY.max_tokens
    assert_all_blocks_free(core)


def test_the_engine_dies_only_for_its_own_failure(tiny_model_dir, armed):
    """Once every forward pass fails (the device broke), the probe fails too: the step raises, and
    AsyncEngine marks the engine dead (tests/production/test_faults.py sees that from outside)."""
    core = tiny_engine(tiny_model_dir("gpt2")).core
    armed(f"device:{BROKEN}")
    requests = mixed_requests({4: BROKEN})
    with pytest.raises(faults.InjectedFault, match="injected device fault"):
        run(core, requests, every=1)


def test_a_prompt_no_step_can_run_is_refused_at_add(built):
    core = built.core
    for ids in ((), (1, built.info.vocab_size), (-1, 2), (10**20,)):
        with pytest.raises(ValueError, match="prompt"):
            core.add(GenerationRequest("bad", ids, GREEDY))
    assert not core.has_work()


@pytest.mark.parametrize("arch", ARCHS)
def test_the_probe_runs_beside_live_requests(arch, tiny_model_dir):
    """The probe (run when every request of a failed step failed alone) works on each architecture and
    writes only its own cache block: requests it interrupts still produce their solo tokens."""
    core = tiny_engine(tiny_model_dir(arch)).core
    requests = mixed_requests({})[:3]

    def probe(step, outputs):
        if step in (1, 4):  # mid-prefill and mid-decode
            core.runner.probe()

    got = run(core, requests, every=1, on_step=probe)
    for r in requests:
        assert got[r.request_id][:2] == (solo(core, r), "length"), f"{arch}: {r.request_id}"


def test_sampling_fields_beyond_any_range_keep_their_meaning(built):
    """Values that overflow an int64 or a float32 inside the step, or exceed the vocabulary: each means
    what its in-range equivalent means, and a greedy batch-mate keeps its solo tokens."""
    core = built.core
    vocab = built.info.vocab_size
    sampled = {"max_tokens": 8, "temperature": 0.8, "seed": 9, "ignore_eos": True}
    greedy = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    cases = {  # name -> (extreme fields, equivalent fields)
        "top_k_huge": ({**sampled, "top_k": 10**20}, {**sampled, "top_k": 0}),
        "top_k_negative_huge": ({**sampled, "top_k": -(10**20)}, {**sampled, "top_k": 0}),
        "seed_beyond_64_bits": ({**sampled, "seed": 2**70 + 9}, {**sampled, "seed": 9}),
        "seed_negative": ({**sampled, "seed": -(2**80) + 9}, {**sampled, "seed": 9}),
        "top_p_zero": ({**sampled, "top_p": 0.0}, greedy),
        "min_p_above_one": ({**sampled, "min_p": 5.0}, greedy),
        "temperature_below_fp32": ({**sampled, "temperature": 1e-30}, greedy),
        "logit_bias_id_huge": ({**greedy, "logit_bias": ((10**20, 5.0), (-1, 5.0))}, greedy),
        "logprobs_huge": ({**greedy, "logprobs": 10**12}, greedy),
    }
    prompt = (11, 42, 7, 99)
    extreme = [GenerationRequest(name, prompt, SamplingParams(**f)) for name, (f, _) in cases.items()]
    mate = GenerationRequest("mate", (3, 1, 4, 1, 5), SamplingParams(**greedy))
    logprobs: list = []

    def keep_logprobs(step, outputs):
        logprobs.extend(lp for o in outputs if o.request_id == "logprobs_huge" for lp in o.logprobs)

    got = run(core, [mate, *extreme], on_step=keep_logprobs)
    for name, (_, equivalent) in cases.items():
        tokens, reason, error = got[name]
        assert reason == "length" and error is None, (name, error)
        assert tokens == solo(core, GenerationRequest("eq", prompt, SamplingParams(**equivalent))), name
    assert got["mate"][0] == solo(core, GenerationRequest("m", mate.prompt_token_ids, mate.sampling))
    assert len(logprobs) == 8 and all(len(lp.top) == vocab for lp in logprobs)
    assert all(math.isfinite(v) for lp in logprobs for v in (lp.logprob, *(x for _, x in lp.top)))
    assert_all_blocks_free(core)


def test_non_finite_logits_end_only_their_request(built):
    """Steering strong enough to overflow the activations (NaN logits) and a feature logit bias that
    overflows the logits (+-inf) each end their own request with the cause; the unsteered batch-mate,
    which asks for logprobs, keeps its solo tokens and gets finite logprobs. The specs are built by
    hand: the compiler refuses what it can tell overflows (steering/bounds.py), the engine must survive
    what it cannot (a model whose activations overflow sooner, a spec compiled before a bound existed)."""
    core, reg, info = built.core, built.registry, built.info
    site = Site(0, "resid_post")
    g = torch.Generator().manual_seed(5)
    vec = SteeringVector.of({site: torch.randn(info.d_model, generator=g)})
    v = reg.add_vector(vec, vector_id="boom", model=info.name)
    sae = reg.add_sae(random_sae(info.d_model, site, 3), sae_id="boom_sae", model=info.name, fit=info)
    ref = SAERef(sae.id, sae.uid)
    add = VectorAdd(site=site, positions=Positions.ALL, vector=VectorRef(v.id, v.uid), strength=1e30)
    overflow = GenerationRequest("overflow", (8, 6, 7, 5), GREEDY, steering=SteeringSpec.build([add], []))
    # the feature that writes the largest logit, repeated until its bias sums past fp32's max
    effects = core.runner.steering.resources.logit_effects([(ref, i) for i in range(16)])
    top = max(range(16), key=lambda i: float(effects[i].abs().max()))
    repeat = math.ceil(torch.finfo(torch.float32).max / (1e38 * float(effects[top].abs().max()))) + 1
    terms = [LogitBiasTerm(ref, top, 1e38)] * repeat
    bias = GenerationRequest("bias", (8, 6, 7, 5), GREEDY, steering=SteeringSpec.build([], terms))
    mate_sp = dataclasses.replace(GREEDY, logprobs=5)
    mate = GenerationRequest("mate", (2, 7, 1, 8, 2, 8), mate_sp)
    logprobs: list = []

    def keep_logprobs(step, outputs):
        logprobs.extend(lp for o in outputs if o.request_id == "mate" for lp in o.logprobs)

    got = run(core, [mate, overflow, bias], on_step=keep_logprobs)
    for rid in ("overflow", "bias"):
        tokens, reason, error = got[rid]
        assert reason == "error" and tokens == [], got[rid]
        assert "non-finite" in error and "output token 1" in error and "steering" in error, error
    assert got["mate"][:2] == (solo(core, GenerationRequest("m", mate.prompt_token_ids, mate_sp)), "length")
    assert len(logprobs) == GREEDY.max_tokens
    assert all(math.isfinite(v) for lp in logprobs for v in (lp.logprob, *(x for _, x in lp.top)))
    assert_all_blocks_free(core)


@pytest.mark.parametrize("change", ["delete", "replace"])
def test_a_request_keeps_what_it_was_admitted_with(built, change):
    """Deleting or replacing the captured SAE and the steering vector while a request runs changes
    nothing for it (features, tokens); a request admitted after sees the registry as it is now."""
    core, reg, info = built.core, built.registry, built.info
    site = Site(1, "resid_pre")
    g = torch.Generator().manual_seed(11)
    reg.add_sae(random_sae(info.d_model, site, 21), sae_id="held", model=info.name, fit=info)
    vec = SteeringVector.of({site: torch.randn(info.d_model, generator=g)})
    reg.add_vector(vec, vector_id="held_v", model=info.name)
    uid = reg.get_sae("held").uid
    spec = compile_steering(
        reg,
        info,
        core.runner.steering.cfg,
        [{"vector": "held_v", "mode": "add", "strength": 4.0}],
        None,
        None,
    )
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def request(rid):
        return GenerationRequest(
            rid, (5, 10, 15, 20, 25), sp, spec, capture=FeatureCapture("held", uid, 4, "all")
        )

    def features_of(rid, sink):
        return lambda step, outputs: sink.extend(
            f for o in outputs if o.request_id == rid for f in o.features
        )

    ref_features: list = []
    reference = run(core, [request("ref")], on_step=features_of("ref", ref_features))["ref"]
    assert reference[1] == "length" and len(ref_features) == 5 + 11  # every token fed through the site

    features: list = []

    def mutate(step, outputs):
        features_of("r", features)(step, outputs)
        if step == 3:
            reg.delete_sae("held")
            reg.delete_vector("held_v")
            if change == "replace":  # the same ids, other weights
                reg.add_sae(random_sae(info.d_model, site, 22), sae_id="held", model=info.name, fit=info)
                v = SteeringVector.of({site: torch.randn(info.d_model, generator=g)})
                reg.add_vector(v, vector_id="held_v", model=info.name)

    got = run(core, [request("r")], on_step=mutate)["r"]
    assert got == reference and features == ref_features
    late = run(core, [request("late")])["late"]
    assert late[1] == "error" and "held" in late[2], late
    if change == "replace":
        reg.delete_sae("held")
        reg.delete_vector("held_v")
    assert_all_blocks_free(core)
