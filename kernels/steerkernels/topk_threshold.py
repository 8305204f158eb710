"""sae_topk_threshold (a TopK SAE's per-token rank threshold) and the SAE-encoder argument checks it
shares with sae_encode_topk and sae_feature_acts. Public as `steerkernels.sae_topk_threshold`."""

from __future__ import annotations

import torch

from steerkernels import _checks as C
from steerkernels import reference


def encoder_args(
    W_enc: object, b_enc: object, b_dec: object, threshold: object, d: int, device: torch.device
) -> int:
    """Check an SAE encoder for inputs of width d on `device` (threshold None: none); returns d_sae."""
    C.tensor("W_enc", W_enc, (d, None), C.FLOAT_DTYPES, device, "d, d_sae")
    d_sae = W_enc.shape[1]
    C.tensor("b_enc", b_enc, (d_sae,), C.FLOAT_DTYPES, device, "d_sae")
    C.tensor("b_dec", b_dec, (d,), C.FLOAT_DTYPES, device, "d")
    if threshold is not None:
        C.tensor("threshold", threshold, (d_sae,), C.FLOAT_DTYPES, device, "d_sae")
    return d_sae


def encoder_input(x: object) -> torch.Tensor:
    """Check the input x [T, d] of an encoder op (any float dtype, any layout)."""
    return C.tensor("x", x, (None, None), C.FLOAT_DTYPES, getattr(x, "device", None), "T, d")


def check_k(name: str, k: object, d_sae: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_sae:
        raise ValueError(f"{name}: must be an int in [1, d_sae={d_sae}], got {k!r}")


def sae_topk_threshold(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    apply_b_dec_to_input: bool,
    k: int,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The `token_threshold` of a TopK SAE with this k for `sae_edit` / `sae_feature_acts`.

    x [T, d] float; the SAE's FULL encoder (W_enc [d, d_sae], b_enc, b_dec); rows [n] int64 token ids
    or None (all). Returns [T] fp32: for each token of rows the midpoint of its k-th and (k+1)-th largest
    pre-activation (-inf when k = d_sae: every feature is in the top k), NaN for the other tokens.
    `pre > threshold` then holds exactly for the token's top k, also where a kernel's own dot product
    rounds differently from this GEMM (only features within rounding of the k-th place could flip).
    Every backend runs this in torch: one fp32 GEMM + topk per chunk of rows (on CUDA: cuBLAS).
    """
    x = encoder_input(x)
    d_sae = encoder_args(W_enc, b_enc, b_dec, None, x.shape[1], x.device)
    if rows is not None:
        C.tensor("rows", rows, (None,), C.INDEX_DTYPES, x.device, "n")
    check_k("k", k, d_sae)
    return reference.sae_topk_threshold(x, W_enc, b_enc, b_dec, bool(apply_b_dec_to_input), k, rows)
