"""The CUDA-graph decode step with the Triton kernels (interpreted on CPU): what a graph would record.

`--step-mode padded` runs a decode step's graph body eagerly: the steering's per-token slots from the
persistent buffers, the transformers forward with the steering hooks, and the Triton paged attention.
Here, with every kernel on its Triton path:
  - the tokens equal the packed step's (per-request spans, the C++ attention kernels), steered and not;
  - the body never waits for the device, never reads a device value on the host and never builds a
    tensor from host data, so nothing in it is frozen into a captured graph: every aten op it dispatches
    is recorded and none of the host-syncing ones may appear.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from steerserve.config import StepMode
from steerserve.runner import cpu_sgemm
from steerserve.runner.attention import paged_kernels_work
from steerserve.types.requests import GenerationRequest, SamplingParams
from steerserve.types.steering import (
    FeatureAdd,
    FeatureClamp,
    Positions,
    SAERef,
    SteeringSpec,
    VectorAdd,
    VectorProject,
    VectorRef,
)
from tests.engine.helpers import run_staggered
from tests.kernels.conftest import INTERPRET
from tests.runner.test_padded_decode import S0, S1, steered_engine

pytestmark = pytest.mark.skipif(not INTERPRET, reason="runs the Triton kernels through the interpreter")

# ops that make the host wait for the device or bake host data into the graph
HOST_SYNC_OPS = {
    "aten._local_scalar_dense",  # .item(), bool(t), int(t)
    "aten.nonzero",
    "aten.masked_select",
    "aten.unique",
    "aten._unique2",
    "aten.unique_consecutive",
    "aten.equal",
    "aten.is_nonzero",
    "aten.lift_fresh",  # torch.tensor(host data)
    "aten.lift_fresh_copy",
}


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        if func.overloadpacket is torch.ops.aten.repeat_interleave and "output_size" not in (kwargs or {}):
            self.ops.add("aten.repeat_interleave without output_size")
        return func(*args, **(kwargs or {}))


def _requests(a: SAERef, v: VectorRef, vocab: int) -> list[GenerationRequest]:
    specs = [
        SteeringSpec.build([FeatureAdd(site=S0, positions=Positions.ALL, sae=a, index=3, strength=6.0)], []),
        None,
        SteeringSpec.build(
            [
                FeatureClamp(site=S0, positions=Positions.GENERATED, sae=a, index=5, value=4.0),
                VectorProject(site=S0, positions=Positions.ALL, vector=v, lo=-0.5, hi=0.5),
                VectorAdd(site=S1, positions=Positions.GENERATED, vector=v, strength=3.0),
            ],
            [],
        ),
    ]
    g = torch.Generator().manual_seed(5)
    return [
        GenerationRequest(
            f"r{i}",
            tuple(torch.randint(0, vocab, (4 + 3 * i,), generator=g).tolist()),
            SamplingParams(max_tokens=5 + 2 * i, temperature=0.0, ignore_eos=True),
            steering=spec,
        )
        for i, spec in enumerate(specs)
    ]


def _run(model_dir: str, mode: StepMode, data_dir, recorder: OpRecorder | None = None):
    built, a, v = steered_engine(model_dir, mode, data_dir, 4)
    try:
        runner = built.core.runner
        if recorder is not None:  # NOTE: observes the graph body; the step runs exactly as it would
            body = runner._graph_body

            def recorded(inputs):
                with recorder:
                    return body(inputs)

            runner._graph_body = recorded
        return run_staggered(built.core, _requests(a, v, built.info.vocab_size), every=1), runner
    finally:
        built.close()


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_graph_step_with_triton_kernels_equals_packed_and_never_syncs(arch, tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir(arch)
    packed, _ = _run(model_dir, StepMode.PACKED, tmp_path / "packed")
    recorder = OpRecorder()
    padded, runner = _run(model_dir, StepMode.PADDED, tmp_path / "padded", recorder)
    assert runner.decode_buffers.loads >= 6
    # the recorder saw the forward (on CPU the linear layers run oneDNN's packed weights, runner/cpu_weights,
    # or fp32 ones our own kernel through ctypes, runner/cpu_sgemm, which no dispatcher op shows)
    assert "aten.embedding" in recorder.ops
    assert cpu_sgemm.preferred() or recorder.ops & {"aten.linear", "mkldnn._linear_pointwise"}
    assert "aten.where" in recorder.ops  # and the steering's per-token slots
    assert recorder.ops.isdisjoint(HOST_SYNC_OPS | {"aten.repeat_interleave without output_size"}), sorted(
        recorder.ops & HOST_SYNC_OPS
    )
    assert padded == packed


def test_the_start_up_check_of_the_paged_kernels():
    """What a CUDA server runs before relying on the kernels: Triton against the reference."""
    cpu = torch.device("cpu")
    assert paged_kernels_work(cpu, torch.float32) and paged_kernels_work(cpu, torch.bfloat16)
    assert not paged_kernels_work(cpu, torch.float64)  # a dtype the kernels refuse: the check says no
