"""Small helpers of the Triton launchers: block sizes and the allocator of outputs and scratch.

Launchers allocate through `empty` (looked up on this module at call time) so that tests can swap in an
allocator that poisons fresh buffers with NaN / -1 and prove the kernels write everything they return.
"""

from __future__ import annotations

import torch


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in for the CPU interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2
