"""resample_draw (per-token random draws for resample ablation) and the check of sae_edit's /
project_clamp's per-token targets it feeds. Public as `steerkernels.resample_draw`; the math (and the
counter-based stream `resample_bits`) is specified in `reference`."""

from __future__ import annotations

import torch

from steerkernels import _checks as C
from steerkernels import reference


def _impl(backend: str | None, device: torch.device):
    choice = C.resolve_backend(backend, device)
    if choice == "cpu":
        from steerkernels import cpu as mod
    elif choice == "triton":
        from steerkernels import triton_resample as mod
    else:
        mod = reference
    return mod


def check_token_value(token_value, T: int, width: int, dims: str, device, validate: bool) -> None:
    """sae_edit's / project_clamp's optional per-token targets: [T, width] fp32, finite or NaN."""
    if token_value is None:
        return
    C.tensor("token_value", token_value, (T, width), C.FP32, device, dims)
    if validate:
        C.values_ok("token_value", token_value, ~token_value.isinf(), "must be finite or NaN (no target)")


def resample_draw(
    slot_of_token: torch.Tensor,
    token_key: torch.Tensor,
    token_pos: torch.Tensor,
    stream: torch.Tensor,
    density: torch.Tensor,
    samples: torch.Tensor,
    sample_count: torch.Tensor,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Per-token random draws for resample ablation: what sae_edit's / project_clamp's token_value takes.

    slot_of_token  [T] int32/int64, -1 = none; token_key [T] int64 (the request's seed-derived key, any
                   int64), token_pos [T] int64 (the token's position in its sequence).
    stream         [S, F] int64: column j of slot s draws from stream id stream[s, j]; < 0 = not resampled.
    density        [S, F] fp32 in [0, 1]: the fraction of nonzero activations.
    samples        [S, F, N] fp32: the nonzero values to draw from, the first sample_count[s, j] used.
    sample_count   [S, F] int in [0, N].
    Returns out [T, F] fp32 (a new tensor): NaN where the token's slot is invalid or stream[s, j] < 0; else
    with (h1, h2) = reference.resample_bits(token_key[t], token_pos[t], stream[s, j]):
      u = (h1 >> 8) * 2**-24 (exact fp32 in [0, 1));  active = u < density[s, j] and sample_count[s, j] > 0
      out = samples[s, j, (h2 * sample_count[s, j]) >> 32] if active else 0.0    (integer index math)
    i.e. a draw from (1 - density) * delta_0 + density * Uniform(samples[:count]); vectors use density 1.
    A draw depends only on (key, pos, stream), so it is the same whatever shares the batch, and when a
    token is recomputed. Every backend gives the same bits.
    """
    dev = getattr(samples, "device", None)
    C.tensor("samples", samples, (None, None, None), C.FP32, dev, "S, F, N")
    S, F, N = samples.shape
    C.tensor("slot_of_token", slot_of_token, (None,), C.INDEX_DTYPES, dev, "T")
    T = slot_of_token.shape[0]
    C.tensor("token_key", token_key, (T,), (torch.int64,), dev, "T")
    C.tensor("token_pos", token_pos, (T,), (torch.int64,), dev, "T")
    C.tensor("stream", stream, (S, F), (torch.int64,), dev, "S, F")
    C.tensor("density", density, (S, F), C.FP32, dev, "S, F")
    C.tensor("sample_count", sample_count, (S, F), C.INT_DTYPES, dev, "S, F")
    if validate:
        C.ids_in("slot_of_token", slot_of_token, -1, S, f"-1 = none, S={S} slots")
        C.values_ok("density", density, (density >= 0) & (density <= 1), "must lie in [0, 1]")
        C.ids_in("sample_count", sample_count, 0, N + 1, f"N={N} samples per column")
    return _impl(backend, dev).resample_draw(
        slot_of_token, token_key, token_pos, stream, density, samples, sample_count
    )
