"""steerkernels: the per-step ops of steered decoding, independent of the server.

Public ops (this module owns their signatures, argument checks and backend dispatch):
  steer_add        h[t] += slot vector                     (in place on h [T, d])
  project_clamp    clip h[t] . u to [lo, hi] per direction (in place on h [T, d])
  sae_edit         clamp/scale/ablate SAE features          (in place on h [T, d])
  apply_logit_bias sparse + dense bias, penalties, temperature (in place on logits [R, V])
  sae_encode_topk  top-k SAE activations per token          (new [T, k] tensors)
  sae_feature_acts activations of each token's slot features (new [T, F] tensor; gates)
  sae_topk_threshold per-token rank threshold of a TopK SAE   (new [T] tensor; for the two above;
                   in topk_threshold.py with the SAE-encoder argument checks, re-exported here)
  argmax_rows      greedy token of each row                 (new [R] int64 tensor)
  resample_draw    per-token random draws of resampled columns (new [T, F] tensor; sae_edit's /
                   project_clamp's token_value), from the counter-based stream `reference.resample_bits`
                   (in resample.py with the token_value check, re-exported here)
  write_kv         each new token's key/value into its paged-cache row (in place on k/v caches)
  prepare_steer_add, prepare_sae_edit
                   those two ops with their per-slot banks checked and bound once, for a caller that
                   edits a few dozen tokens a step with the same banks (prepared.py)
  paged_attention  causal varlen attention of a packed step over the paged KV cache: decode and
                   chunked-prefill rows, GQA, sliding window, softcap (new or given [T, H, hd]; both in
                   paged_attention.py with their checks, dispatch and reference, re-exported here;
                   Triton or the reference: "cpu" runs the reference)

Index convention shared by the residual-stream ops:
  slot_of_token [T] int32/int64: per token its row in the per-slot banks; -1 = not steered (untouched).
  A token is steered when its slot is valid. (Which positions a slot acts on is the caller's choice of
  slot per token: the server gives each steering row a prompt and a generated slot.)

Backends: `reference` (pure torch, the spec; runs on any device), Triton (`triton_*` modules,
imported lazily so this package imports without triton) and `cpu` (C++ for CPU tensors, `cpu.py`:
the residual ops, apply_logit_bias, argmax_rows and resample_draw; the rest run the reference). Each op
takes `backend=None|"auto"|"torch"|"triton"|"cpu"`; None reads env STEERKERNELS_BACKEND (default auto:
Triton on CUDA tensors or under TRITON_INTERPRET=1, else `cpu` when its library builds here, else the
reference). `validate=True` also range-checks index/value tensors (one device sync each); with False the
kernels still mask bad ids, so nothing is written out of bounds.
"""

from __future__ import annotations

import torch

from steerkernels import _checks as C
from steerkernels import reference
from steerkernels.paged_attention import paged_attention, write_kv
from steerkernels.prepared import prepare_sae_edit, prepare_steer_add
from steerkernels.resample import check_token_value as _check_token_value
from steerkernels.resample import resample_draw
from steerkernels.topk_threshold import check_k as _check_k
from steerkernels.topk_threshold import encoder_args as _encoder_args
from steerkernels.topk_threshold import encoder_input as _encoder_input
from steerkernels.topk_threshold import sae_topk_threshold

__all__ = [
    "apply_logit_bias",
    "argmax_rows",
    "paged_attention",
    "prepare_sae_edit",
    "prepare_steer_add",
    "project_clamp",
    "reference",
    "resample_draw",
    "sae_edit",
    "sae_encode_topk",
    "sae_feature_acts",
    "sae_topk_threshold",
    "sampling_logits",
    "steer_add",
    "write_kv",
]

# NOTE: the largest k of the Triton top-k (its merge keeps next_pow2(k) candidates in registers).
TRITON_MAX_TOPK = 256


def _impl(name: str, backend: str | None, device: torch.device):
    """The backend module that implements op `name` for this call."""
    choice = C.resolve_backend(backend, device)
    if choice == "torch":
        return reference
    if choice == "cpu":
        from steerkernels import cpu

        return cpu if name in cpu.OPS else reference
    if name == "argmax_rows":  # NOTE: no Triton kernel: torch's CUDA argmax is fast
        return reference
    if name in ("steer_add", "project_clamp", "sae_edit", "sae_feature_acts"):
        from steerkernels import triton_residual as mod
    elif name == "apply_logit_bias":
        from steerkernels import triton_logits as mod
    else:
        from steerkernels import triton_encode as mod
    return mod


def _hidden(name: str, h: object) -> torch.Tensor:
    h = C.tensor(name, h, (None, None), C.FLOAT_DTYPES, h.device if isinstance(h, torch.Tensor) else None)
    C.row_major(name, h)
    return h


def steer_add(
    h: torch.Tensor,
    slot_of_token: torch.Tensor,
    slot_vectors: torch.Tensor,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Add each steered token's slot vector to its hidden state, in place.

    h              [T, d] fp32/bf16/fp16, last dim contiguous; edited in place and returned.
    slot_of_token  [T] int32/int64, -1 = not steered.
    slot_vectors   [S, d] fp32: per slot the summed additive steering at this site.
    h[t] = (h[t] as fp32 + slot_vectors[slot]) rounded to h's dtype; other rows are not written.
    """
    h = _hidden("h", h)
    T, d = h.shape
    C.tensor("slot_vectors", slot_vectors, (None, d), C.FP32, h.device, "S, d")
    C.token_args(h, slot_of_token, slot_vectors.shape[0], validate)
    impl = _impl("steer_add", backend, h.device)
    return impl.steer_add(h, slot_of_token, slot_vectors)


def project_clamp(
    h: torch.Tensor,
    slot_of_token: torch.Tensor,
    slot_dirs: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    dir_count: torch.Tensor,
    *,
    token_value: torch.Tensor | None = None,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Clip the component of each steered token along its slot's unit directions, in place.

    h              [T, d] fp32/bf16/fp16, edited in place and returned.
    slot_of_token  [T] int, -1 = not steered.
    slot_dirs      [S, K, d] fp32 unit vectors u.
    lo, hi         [S, K] fp32, lo <= hi, may be -inf/+inf; lo = hi = 0 removes the direction (project_out).
    dir_count      [S] int in [0, K]: directions k < dir_count[slot] apply, sequentially in k order:
                   c = h . u_k;  h += (clamp(c, lo, hi) - c) * u_k   (fp32, rounded to h's dtype at the end).
    token_value    [T, K] fp32 or None: a per-token target; where token_value[t, k] is not NaN, direction
                   k of token t is set to it (lo = hi = token_value[t, k]); NaN keeps the slot's lo/hi.
                   (Resampled projections: `resample_draw`'s output.) Finite or NaN.
    """
    h = _hidden("h", h)
    T, d = h.shape
    C.tensor("slot_dirs", slot_dirs, (None, None, d), C.FP32, h.device, "S, K, d")
    S, K, _ = slot_dirs.shape
    C.tensor("lo", lo, (S, K), C.FP32, h.device, "S, K")
    C.tensor("hi", hi, (S, K), C.FP32, h.device, "S, K")
    C.tensor("dir_count", dir_count, (S,), C.INT_DTYPES, h.device, "S")
    C.token_args(h, slot_of_token, S, validate)
    if validate:
        C.ids_in("dir_count", dir_count, 0, K + 1, f"K={K} directions per slot")
        C.values_ok("lo", lo, ~torch.isnan(lo), "must not be NaN")
        C.values_ok("hi", hi, lo <= hi, "must be >= lo (and not NaN)")
    _check_token_value(token_value, T, K, "T, K", h.device, validate)
    impl = _impl("project_clamp", backend, h.device)
    return impl.project_clamp(h, slot_of_token, slot_dirs, lo, hi, dir_count, token_value)


def sae_edit(
    h: torch.Tensor,
    slot_of_token: torch.Tensor,
    feat_idx: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    threshold: torch.Tensor | None,
    apply_b_dec_to_input: bool,
    mode: torch.Tensor,
    value: torch.Tensor,
    *,
    token_threshold: torch.Tensor | None = None,
    token_value: torch.Tensor | None = None,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Clamp / scale / ablate / resample the SAE features each steered token's slot touches, in place.

    h              [T, d] fp32/bf16/fp16, edited in place and returned.
    slot_of_token  [T] int, -1 = not steered.
    feat_idx       [S, F] int feature ids in [0, d_sae), -1 = padding (a slot of only -1 costs nothing).
    W_enc [d, d_sae], b_enc [d_sae], W_dec [d_sae, d], b_dec [d], threshold [d_sae] or None: the SAE
                   (any float dtype; strided views welcome: pass W_enc as `W_enc_t.t()` of a row-major
                   [d_sae, d] copy for coalesced column reads on GPU).
    mode           [S, F] int: 0 = clamp to value, 1 = scale by value, 2 = ablate to value (0 or the mean).
    value          [S, F] fp32.
    token_threshold [T] fp32 or None: TopK SAEs, from `sae_topk_threshold` on the same h (NaN: no
                   feature of that token is active).
    token_value    [T, F] fp32 or None: per-token targets (resampling: `resample_draw`'s output); where
                   token_value[t, j] is not NaN it is column j's new activation whatever mode[s, j] says;
                   NaN keeps the slot's mode/value. Finite or NaN.

    For every touched feature f of token t, from the UNEDITED h[t] (SAELens' encode()):
      pre = (h[t] - b_dec * apply_b_dec_to_input) . W_enc[:, f] + b_enc[f]
      a   = relu(pre) * (pre > threshold[f]) * (pre > token_threshold[t])   (each factor when given)
      new = token_value[t, j] if given and not NaN, else value (modes 0, 2) or a * value (mode 1)
    then h[t] += sum_f (new - a) * W_dec[f] (fp32). Duplicate ids in a row apply twice. A TopK feature
    outside the token's top k has a = 0: clamp to v adds v * W_dec[f], scale changes nothing.
    NOTE: the rank test needs every pre-activation of the token (the full encoder), which a slot-local
    SAE (runner/steering/banks.py) does not hold, so the caller computes it once per call as token_threshold.
    """
    h = _hidden("h", h)
    T, d = h.shape
    S, F, d_sae = C.edit_bank(feat_idx, W_enc, b_enc, W_dec, b_dec, threshold, mode, value, d, h.device)
    C.token_args(h, slot_of_token, S, validate)
    if token_threshold is not None:
        C.tensor("token_threshold", token_threshold, (T,), C.FP32, h.device, "T")
    if validate:
        C.ids_in("feat_idx", feat_idx, -1, d_sae, f"-1 = padding, d_sae={d_sae} features")
        C.ids_in("mode", mode, 0, 3, "0=clamp, 1=scale, 2=ablate")
    _check_token_value(token_value, T, F, "T, F", h.device, validate)
    impl = _impl("sae_edit", backend, h.device)
    return impl.sae_edit(
        h, slot_of_token, feat_idx, W_enc, b_enc, W_dec, b_dec, threshold,
        bool(apply_b_dec_to_input), mode, value, token_threshold, token_value,
    )  # fmt: skip


def _check_logit_terms(
    logits, temperature, sparse_ids, sparse_bias, dense_bank, dense_idx, penalty_ids, penalty_counts,
    repetition_penalty, presence_penalty, frequency_penalty, validate: bool,
) -> None:  # fmt: skip
    """apply_logit_bias' argument checks, after the logits' dtype."""
    C.row_major("logits", logits)
    dev = logits.device
    R, V = logits.shape
    for name, t in (("temperature", temperature), ("repetition_penalty", repetition_penalty)):
        C.tensor(name, t, (R,), C.FP32, dev, "R")
    C.tensor("presence_penalty", presence_penalty, (R,), C.FP32, dev, "R")
    C.tensor("frequency_penalty", frequency_penalty, (R,), C.FP32, dev, "R")
    C.tensor("sparse_ids", sparse_ids, (R, None), C.INDEX_DTYPES, dev, "R, S")
    C.tensor("sparse_bias", sparse_bias, (R, sparse_ids.shape[1]), C.FP32, dev, "R, S")
    C.tensor("dense_bank", dense_bank, (None, V), C.FP32, dev, "B, V")
    C.tensor("dense_idx", dense_idx, (R, None), C.INDEX_DTYPES, dev, "R, D")
    C.tensor("penalty_ids", penalty_ids, (R, None), C.INDEX_DTYPES, dev, "R, P")
    C.tensor("penalty_counts", penalty_counts, (R, penalty_ids.shape[1]), C.INDEX_DTYPES, dev, "R, P")
    if validate:
        C.values_ok("temperature", temperature, (temperature > 0) & temperature.isfinite(), "must be > 0")
        C.values_ok("repetition_penalty", repetition_penalty, repetition_penalty > 0, "must be > 0")
        C.ids_in("sparse_ids", sparse_ids, -1, V, f"-1 = padding, vocab V={V}")
        C.ids_in(
            "dense_idx",
            dense_idx,
            -1,
            dense_bank.shape[0],
            f"-1 = padding, B={dense_bank.shape[0]} bank rows",
        )
        C.ids_in("penalty_ids", penalty_ids, -1, V, f"-1 = padding, vocab V={V}")
        C.ids_in("penalty_counts", penalty_counts, 0, 2**31 - 1, "occurrences in the output")
        if penalty_ids.shape[1] > 1:
            ids = penalty_ids.sort(dim=1).values
            dup = (ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] >= 0)
            C.values_ok("penalty_ids", ids[:, 1:], ~dup, "ids must be unique per row (apart from -1)")


def apply_logit_bias(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    sparse_ids: torch.Tensor,
    sparse_bias: torch.Tensor,
    dense_bank: torch.Tensor,
    dense_idx: torch.Tensor,
    penalty_ids: torch.Tensor,
    penalty_counts: torch.Tensor,
    repetition_penalty: torch.Tensor,
    presence_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Logit biases, sampling penalties and temperature in one pass, in place on fp32 logits.

    logits             [R, V] fp32, last dim contiguous; edited in place and returned.
    temperature        [R] fp32 > 0 (greedy rows pass 1.0).
    sparse_ids         [R, S] int token ids, -1 = padding; sparse_bias [R, S] fp32 (duplicates add up).
    dense_bank         [B, V] fp32 vocab vectors (B may be 0); dense_idx [R, D] int rows of the bank,
                       -1 = padding.
    penalty_ids        [R, P] int, -1 = padding, unique per row (prompt and output tokens so far);
    penalty_counts     [R, P] int32 occurrences in the output (0 = prompt only).
    repetition_penalty, presence_penalty, frequency_penalty  [R] fp32.
    Any of S, D, P may be 0. Per row, in order:
      1. logits[id] += sparse bias;  logits += sum_j dense_bank[dense_idx[j]]
      2. for each penalty id: x = x / rp if x > 0 else x * rp;  x -= presence if count > 0;
         x -= frequency * count
      3. logits /= temperature
    A row with no ids, no dense bias and temperature 1.0 is not written.
    """
    C.tensor("logits", logits, (None, None), C.FP32, getattr(logits, "device", None), "R, V")
    _check_logit_terms(
        logits, temperature, sparse_ids, sparse_bias, dense_bank, dense_idx, penalty_ids, penalty_counts,
        repetition_penalty, presence_penalty, frequency_penalty, validate,
    )  # fmt: skip
    dev = logits.device
    impl = _impl("apply_logit_bias", backend, dev)
    return impl.apply_logit_bias(
        logits, temperature, sparse_ids, sparse_bias, dense_bank, dense_idx,
        penalty_ids, penalty_counts, repetition_penalty, presence_penalty, frequency_penalty,
    )  # fmt: skip


def sampling_logits(
    logits: torch.Tensor,
    *terms: torch.Tensor,
    process: bool = True,
    argmax: bool = True,
    backend: str | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sampler's first pass: (x, tokens) with x = `logits` [R, V] as fp32 (fp32 logits: themselves,
    edited in place; bf16 / fp16: a new tensor), then `apply_logit_bias(x, *terms)` when `process`, and
    tokens = `argmax_rows(x)` when `argmax` (else None). `terms`: apply_logit_bias's ten arguments after
    the logits, in its order (temperature ... frequency_penalty). The same values as those three ops one
    after another; the CPU backend converts, biases and scans each row while it sits in L2, one trip
    through memory for the [R, V] logits where the three ops make five.
    """
    C.tensor("logits", logits, (None, None), C.FLOAT_DTYPES, getattr(logits, "device", None), "R, V")
    if logits.shape[1] == 0:
        raise ValueError("logits: expected V >= 1 columns, got 0")
    if len(terms) != 10:
        raise TypeError(
            f"sampling_logits: expected apply_logit_bias' 10 terms after the logits, got {len(terms)}"
        )
    _check_logit_terms(logits, *terms, validate and process)
    fused = getattr(_impl("sampling_logits", backend, logits.device), "sampling_logits", None)
    done = None if fused is None else fused(logits, *terms, process=process, argmax=argmax)
    if done is not None:
        return done
    x = logits.float()
    if process:
        apply_logit_bias(x, *terms, backend=backend, validate=False)
    return x, (argmax_rows(x, backend=backend) if argmax else None)


def sae_feature_acts(
    h: torch.Tensor,
    slot_of_token: torch.Tensor,
    feat_idx: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    threshold: torch.Tensor | None,
    apply_b_dec_to_input: bool,
    *,
    token_threshold: torch.Tensor | None = None,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Activations of the SAE features each token's slot names: what gates compare with thresholds.

    h [T, d] float (read only); slot_of_token [T] int, -1 = none; feat_idx [S, F] int ids in [0, d_sae),
    -1 = padding; the SAE and token_threshold as in `sae_edit`. Returns acts [T, F] fp32 with
      acts[t, j] = a of `sae_edit` (SAELens' encode()) for f = feat_idx[slot_of_token[t], j],
    NaN where the token has no slot or the id is padding (so every comparison with NaN is false: no
    slot, no gate).
    """
    h = _hidden("h", h)
    T, d = h.shape
    C.tensor("feat_idx", feat_idx, (None, None), C.INT_DTYPES, h.device, "S, F")
    S = feat_idx.shape[0]
    d_sae = _encoder_args(W_enc, b_enc, b_dec, threshold, d, h.device)
    C.token_args(h, slot_of_token, S, validate)
    if token_threshold is not None:
        C.tensor("token_threshold", token_threshold, (T,), C.FP32, h.device, "T")
    if validate:
        C.ids_in("feat_idx", feat_idx, -1, d_sae, f"-1 = padding, d_sae={d_sae} features")
    impl = _impl("sae_feature_acts", backend, h.device)
    return impl.sae_feature_acts(
        h, slot_of_token, feat_idx, W_enc, b_enc, b_dec, threshold, bool(apply_b_dec_to_input),
        token_threshold,
    )  # fmt: skip


def argmax_rows(logits: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Greedy decoding: per row the index of the largest logit, as `logits.argmax(-1)` (the first of
    ties; a NaN counts as the largest, so a broken row shows). logits [R, V] float, V >= 1, last dim
    contiguous; returns [R] int64 on logits' device. Triton has no kernel for it (torch's CUDA argmax is
    fine); the CPU backend's is ~10x faster than torch's at GPT-2's vocabulary (64 rows).
    """
    C.tensor("logits", logits, (None, None), C.FLOAT_DTYPES, getattr(logits, "device", None), "R, V")
    C.row_major("logits", logits)
    if logits.shape[1] == 0:
        raise ValueError("logits: expected V >= 1 columns, got 0")
    return _impl("argmax_rows", backend, logits.device).argmax_rows(logits)


def sae_encode_topk(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    threshold: torch.Tensor | None,
    apply_b_dec_to_input: bool,
    k: int,
    *,
    sae_k: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest SAE activations of each token, descending.

    x [T, d] float; W_enc [d, d_sae], b_enc [d_sae], b_dec [d], threshold [d_sae] or None (any float dtype);
    sae_k: the k of a TopK SAE (None for the others; then threshold must be None).
    pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc, computed in fp32 (fp32 weights use TF32 on
    GPU only when torch.get_float32_matmul_precision() is not "highest"); the activations are SAELens'
    encode(): relu(pre) * (pre > threshold); TopK: relu(pre) on the token's sae_k largest pre, 0 elsewhere,
    so with k > sae_k the values past sae_k are 0 (at the next-ranked features).
    Returns (values [T, k] fp32, indices [T, k] int64), distinct indices. Ties (e.g. many zeros) break
    arbitrarily. The Triton backend never holds more than one [block_T, block_N] tile of activations;
    k <= 256 there.
    """
    x = _encoder_input(x)
    d_sae = _encoder_args(W_enc, b_enc, b_dec, threshold, x.shape[1], x.device)
    _check_k("k", k, d_sae)
    if sae_k is not None:
        _check_k("sae_k", sae_k, d_sae)
        if threshold is not None:
            raise ValueError("threshold: a TopK SAE (sae_k given) has no per-feature threshold")
    impl = _impl("sae_encode_topk", backend, x.device)
    if impl is not reference and k > TRITON_MAX_TOPK:
        raise ValueError(
            f"k: the triton backend supports k <= {TRITON_MAX_TOPK}, got {k} (use backend='torch')"
        )
    apply = bool(apply_b_dec_to_input)
    if sae_k is None:
        return impl.sae_encode_topk(x, W_enc, b_enc, b_dec, threshold, apply, k)
    # NOTE: TopK's encode() ranks PRE-activations: the k largest, relu'd, then zero past the SAE's own k
    values, indices = impl.sae_encode_topk(x, W_enc, b_enc, b_dec, None, apply, k, rank_pre=True)
    values = values.relu_()
    values[:, sae_k:] = 0.0
    return values, indices
