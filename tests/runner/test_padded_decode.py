"""The CUDA-graph decode step, run eagerly (`--step-mode padded`): every decode step goes through the
persistent, padded buffers and the paged attention kernel, steered and not, and gives the tokens the
packed step gives (today's path: per-request spans, the C++ attention kernels).

Requests arrive staggered and finish at different lengths, so the decode batch grows and shrinks through
the padded sizes (1, 2, 4, 8): a buffer left stale by a larger step, a padding row that writes the KV
cache or a steering row read from the wrong slot changes a token here."""

from __future__ import annotations

import pytest
import torch

from steerserve.config import SteeringConfig, StepMode
from steerserve.registry import SAEWeights, SteeringVector
from steerserve.runner.step_buffers import DecodeBuffers
from steerserve.types.requests import GenerationRequest, SamplingParams
from steerserve.types.sites import Site
from steerserve.types.steering import (
    FeatureAdd,
    FeatureClamp,
    LogitBiasTerm,
    Positions,
    SAERef,
    SteeringSpec,
    VectorAdd,
    VectorProject,
    VectorRef,
)
from steerserve.types.step import ScheduledRequest
from tests.engine.helpers import run_staggered, tiny_engine

S0, S1 = Site(0, "resid_post"), Site(1, "resid_pre")


def _sae(d: int, seed: int) -> SAEWeights:
    g = torch.Generator().manual_seed(seed)
    return SAEWeights(
        W_enc=torch.randn(d, 24, generator=g) * 0.3, b_enc=torch.randn(24, generator=g) * 0.1,
        W_dec=torch.randn(24, d, generator=g), b_dec=torch.randn(d, generator=g) * 0.1,
        architecture="jumprelu", threshold=torch.rand(24, generator=g) * 0.2, site=S0,
    )  # fmt: skip


def _specs(a: SAERef, v: VectorRef) -> list[SteeringSpec | None]:
    return [
        None,
        SteeringSpec.build([FeatureAdd(site=S0, positions=Positions.ALL, sae=a, index=3, strength=6.0)], []),
        SteeringSpec.build(
            [FeatureClamp(site=S0, positions=Positions.GENERATED, sae=a, index=5, value=4.0)], []
        ),
        None,
        SteeringSpec.build([VectorAdd(site=S1, positions=Positions.ALL, vector=v, strength=3.0)], []),
        SteeringSpec.build(
            [
                VectorProject(site=S0, positions=Positions.ALL, vector=v, lo=-0.5, hi=0.5),
                FeatureAdd(site=S0, positions=Positions.GENERATED, sae=a, index=7, strength=-4.0),
            ],
            [],
        ),
        SteeringSpec.build(
            [FeatureAdd(site=S0, positions=Positions.PROMPT, sae=a, index=1, strength=5.0)],
            [LogitBiasTerm(a, 2, 4.0)],
        ),
    ]


def _requests(a, v, vocab: int) -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(11)
    out = []
    for i, spec in enumerate(_specs(a, v)):
        prompt = tuple(torch.randint(0, vocab, (3 + 5 * i,), generator=g).tolist())
        sampling = SamplingParams(max_tokens=8 + 5 * (i % 4), temperature=0.0, ignore_eos=True)
        if i % 3 == 2:  # seeded sampling too: the generator state must advance exactly as packed
            sampling = SamplingParams(max_tokens=17, temperature=0.9, seed=100 + i, ignore_eos=True)
        out.append(GenerationRequest(f"r{i}", prompt, sampling, steering=spec))
    return out


def steered_engine(model_dir: str, mode: StepMode, data_dir, max_rows: int):
    """(engine, SAE "a" at S0, vector "v" at S0 and S1): a tiny engine in `mode` with its registry."""
    built = tiny_engine(
        model_dir, max_num_seqs=max_rows, data_dir=str(data_dir), step_mode=mode,
        steering=SteeringConfig(max_steering_rows=max_rows),
    )  # fmt: skip
    reg, d = built.registry, built.info.d_model
    sae = reg.add_sae(_sae(d, 1), sae_id="a")
    g = torch.Generator().manual_seed(2)
    vec = reg.add_vector(
        SteeringVector.of({S0: torch.randn(d, generator=g), S1: torch.randn(d, generator=g)}), vector_id="v"
    )
    return built, SAERef(sae.id, sae.uid), VectorRef(vec.id, vec.uid)


def _run(model_dir: str, mode: StepMode, data_dir) -> tuple[dict, int]:
    built, a, v = steered_engine(model_dir, mode, data_dir, 8)
    try:
        out = run_staggered(built.core, _requests(a, v, built.info.vocab_size), every=2)
        buffers = built.core.runner.decode_buffers
        return out, 0 if buffers is None else buffers.loads
    finally:
        built.close()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_padded_decode_equals_packed(arch, tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir(arch)
    packed, _ = _run(model_dir, StepMode.PACKED, tmp_path / "packed")
    padded, loads = _run(model_dir, StepMode.PADDED, tmp_path / "padded")
    assert loads >= 20  # the decode steps did go through the persistent buffers
    assert all(len(tokens) >= 4 for tokens, _ in packed.values())
    assert padded == packed


def _item(rid: str, start: int, blocks: tuple[int, ...], token: int, prompt_len: int) -> ScheduledRequest:
    return ScheduledRequest(
        request_id=rid, token_ids=(token,), start=start, block_ids=blocks, sample=True,
        num_prompt_tokens=prompt_len, prompt_token_ids=tuple(range(prompt_len)),
        sampling=SamplingParams(), steering=None,
    )  # fmt: skip


def test_a_smaller_step_leaves_nothing_of_a_larger_one_in_the_buffers():
    """Five requests, then three (padded to four): the fourth row is padding again, whatever it held."""
    buffers = DecodeBuffers(max_batch=8, max_blocks=6, block_size=4, device=torch.device("cpu"))
    five = tuple(_item(f"r{i}", 9 + i, (7 - i, 20 + i, 30 + i, 40 + i), 50 + i, 5) for i in range(5))
    buffers.load(five, [0, -1, 2, 1, 3], buffers.padded(5))
    three = (_item("a", 5, (3, 11), 60, 6), _item("b", 2, (1,), 61, 3), _item("c", 13, (2, 4, 6, 8), 62, 4))
    inputs = buffers.load(three, [-1, 4, -1], buffers.padded(3))
    meta = inputs.attn
    assert buffers.padded(3) == 4 and inputs.num_tokens == 4 and inputs.sample_ids == ["a", "b", "c"]
    assert inputs.input_ids.tolist() == [[60, 61, 62, 0]]
    assert inputs.position_ids.tolist() == [[5, 2, 13, 0]]
    assert meta.slot_mapping.tolist() == [11 * 4 + 1, 1 * 4 + 2, 8 * 4 + 1, -1]
    assert meta.seq_lens.tolist() == [6, 3, 14, 0]
    assert meta.token_seq.tolist() == [0, 1, 2, -1]
    assert meta.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert meta.block_table[0, :2].tolist() == [3, 11] and meta.block_table[2].tolist()[:4] == [2, 4, 6, 8]
    assert inputs.token_row.tolist() == [-1, 4, -1, -1]
    assert inputs.pos_class.tolist() == [0, 0, 1, 0]  # a's position 5 is its last prompt token
    assert inputs.logits_rows.tolist() == [0, 1, 2, 3]
    unsteered = buffers.load(three[:1], [-1], buffers.padded(1))
    assert unsteered.token_row is None and unsteered.num_tokens == 1
