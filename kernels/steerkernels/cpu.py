"""The CPU backend: steer_add, project_clamp, sae_edit, apply_logit_bias, argmax_rows, resample_draw in C++
(csrc/).

Same signatures and math as `reference` (the spec), for CPU tensors. Hidden states in fp32 or bf16;
weights, banks and values are read as fp32 (other dtypes are converted, an extra copy per call) and
index tensors as int64. fp16 hidden states, and the ops this backend lacks (`sae_feature_acts`,
`sae_encode_topk`), run the reference. The library is compiled on first use (about 1 s, cached per
machine by `_cbuild`); `available()` is False when that cannot happen (no compiler, not Linux,
STEERKERNELS_CPU=0), and `auto` then picks the reference.

NOTE: why C++ and not torch ops: a decode step's edit is ~64 tokens x 768 floats, so the dozen torch
ops of the reference cost ~0.5 ms in dispatch alone per site; one fused pass costs ~20 us.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import torch

from steerkernels import _cbuild, _util, reference

SOURCE = Path(__file__).parent / "csrc" / "cpu_steer.cpp"
ABI_VERSION = 6  # NOTE: 6: sampling_logits (bf16 source and argmax in the logit pass)
OPS = (
    "steer_add", "project_clamp", "sae_edit", "apply_logit_bias", "sampling_logits", "argmax_rows", "resample_draw",
)  # fmt: skip
_H_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library, or None once it failed

_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p


class TokenArgs(ctypes.Structure):
    _fields_ = [
        ("h", _ptr), ("h_row", _i64), ("h_dtype", ctypes.c_int32), ("T", _i64), ("d", _i64), ("S", _i64),
        ("slot", _ptr), ("slot_s", _i64), ("n_threads", ctypes.c_int32),
    ]  # fmt: skip


class AddArgs(ctypes.Structure):
    _fields_ = [("vec", _ptr), ("vec_s0", _i64), ("vec_s1", _i64)]


class ClampArgs(ctypes.Structure):
    _fields_ = [
        ("dirs", _ptr), ("dirs_s0", _i64), ("dirs_s1", _i64), ("dirs_s2", _i64),
        ("lo", _ptr), ("lo_s0", _i64), ("lo_s1", _i64), ("hi", _ptr), ("hi_s0", _i64), ("hi_s1", _i64),
        ("count", _ptr), ("count_s", _i64), ("K", _i64), ("tv", _ptr), ("tv_s0", _i64), ("tv_s1", _i64),
    ]  # fmt: skip


class EditArgs(ctypes.Structure):
    _fields_ = [
        ("feat", _ptr), ("feat_s0", _i64), ("feat_s1", _i64), ("F", _i64), ("d_sae", _i64),
        ("W_enc", _ptr), ("enc_s0", _i64), ("enc_s1", _i64), ("b_enc", _ptr), ("b_enc_s", _i64),
        ("W_dec", _ptr), ("dec_s0", _i64), ("dec_s1", _i64), ("b_dec", _ptr), ("b_dec_s", _i64),
        ("threshold", _ptr), ("thr_s", _i64), ("apply_b_dec", ctypes.c_int32),
        ("mode", _ptr), ("mode_s0", _i64), ("mode_s1", _i64),
        ("value", _ptr), ("value_s0", _i64), ("value_s1", _i64), ("tok_thr", _ptr), ("tok_thr_s", _i64),
        ("tv", _ptr), ("tv_s0", _i64), ("tv_s1", _i64),
    ]  # fmt: skip


class ResampleArgs(ctypes.Structure):
    _fields_ = [
        ("out", _ptr), ("out_row", _i64), ("T", _i64), ("S", _i64), ("F", _i64), ("N", _i64),
        ("slot", _ptr), ("slot_s", _i64), ("key", _ptr), ("key_s", _i64), ("pos", _ptr), ("pos_s", _i64),
        ("stream", _ptr), ("stream_s0", _i64), ("stream_s1", _i64),
        ("density", _ptr), ("dens_s0", _i64), ("dens_s1", _i64),
        ("count", _ptr), ("count_s0", _i64), ("count_s1", _i64),
        ("samples", _ptr), ("smp_s0", _i64), ("smp_s1", _i64), ("smp_s2", _i64),
    ]  # fmt: skip


class LogitArgs(ctypes.Structure):
    _fields_ = [
        ("logits", _ptr), ("logits_row", _i64), ("R", _i64), ("V", _i64), ("temperature", _ptr),
        ("sparse_ids", _ptr), ("sparse_bias", _ptr), ("Sp", _i64),
        ("bank", _ptr), ("bank_row", _i64), ("B", _i64), ("dense_idx", _ptr), ("D", _i64), ("penalty_ids", _ptr), ("penalty_counts", _ptr), ("P", _i64),
        ("repetition", _ptr), ("presence", _ptr), ("frequency", _ptr), ("n_threads", ctypes.c_int32),
        ("src", _ptr), ("src_row", _i64), ("argmax", _ptr), ("process", ctypes.c_int32),
    ]  # fmt: skip


def load():
    """The library (built on first use), or None when it cannot be had on this machine."""
    return _cbuild.load_once(_state, _lock, _try_load)


def available() -> bool:
    return load() is not None


def _try_load():
    if os.environ.get("STEERKERNELS_CPU", "1") == "0":
        return None
    return _cbuild.open_library(
        "cpu_steer", (SOURCE,), abi=("ss_steer_abi_version", ABI_VERSION), setup=_setup,
        what="steerkernels CPU backend", fallback="the torch reference",
    )  # fmt: skip


def _setup(lib) -> None:
    for name, args in (
        ("ss_steer_add", (TokenArgs, AddArgs)),
        ("ss_project_clamp", (TokenArgs, ClampArgs)),
        ("ss_sae_edit", (TokenArgs, EditArgs)),
        ("ss_apply_logit_bias", (LogitArgs,)),
        ("ss_resample_draw", (ResampleArgs,)),
    ):
        getattr(lib, name).argtypes = [ctypes.POINTER(a) for a in args]
    lib.ss_argmax_rows.argtypes = [_ptr, _i64, _i64, _i64, _ptr, ctypes.c_int32]


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _long(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int64 else t.long()


def _tokens(h, slot_of_token, num_slots, keep: list) -> TokenArgs:
    """The token block of a call; `keep` holds the converted tensors until the call returns."""
    slot = _long(slot_of_token)
    keep.append(slot)
    a = TokenArgs(h.data_ptr(), h.stride(0), _H_DTYPES[h.dtype], h.shape[0], h.shape[1], num_slots)
    a.slot, a.slot_s = slot.data_ptr(), slot.stride(0)
    a.n_threads = torch.get_num_threads()
    return a


def _token_value(tv) -> tuple:
    """(pointer or None, stride 0, stride 1) of an optional [T, width] fp32 target tensor."""
    return (None, 0, 0) if tv is None else (tv.data_ptr(), *tv.stride())


def _run(fn, *args) -> None:
    if fn(*(ctypes.byref(a) for a in args)) != 0:
        raise RuntimeError(f"{fn.__name__}: unsupported arguments")


def steer_add(h, slot_of_token, slot_vectors):
    """See `steerkernels.steer_add`."""
    lib = load()
    if lib is None or h.dtype not in _H_DTYPES or h.shape[0] == 0:
        return reference.steer_add(h, slot_of_token, slot_vectors)
    return bind_steer_add(_f32(slot_vectors))(h, slot_of_token)


def bind_steer_add(slot_vectors):
    """steer_add with `slot_vectors` (fp32, checked by steerkernels.prepared) bound: add(h, slot) -> h."""
    lib = load()
    if lib is None:
        return None
    args = AddArgs(slot_vectors.data_ptr(), *slot_vectors.stride())
    S = slot_vectors.shape[0]

    def add(h, slot_of_token):
        if h.dtype not in _H_DTYPES:
            return reference.steer_add(h, slot_of_token, slot_vectors)
        keep: list = []  # NOTE: the closure holds the bound tensors
        _run(lib.ss_steer_add, _tokens(h, slot_of_token, S, keep), args)
        return h

    return add


def bind_sae_edit(feat_idx, W_enc, b_enc, W_dec, b_dec, threshold, apply_b_dec_to_input, mode, value):
    """sae_edit with all but the step's tokens bound: edit(h, slot, token_threshold, token_value) -> h;
    None where a bound tensor is not already in the kernel's dtype (a converted copy would not see later
    writes into the original)."""
    lib = load()
    floats = (W_enc, b_enc, W_dec, b_dec, value) + (() if threshold is None else (threshold,))
    as_is = all(t.dtype == torch.float32 for t in floats) and feat_idx.dtype == mode.dtype == torch.int64
    if lib is None or not as_is:
        return None
    thr = threshold
    e = EditArgs(
        feat_idx.data_ptr(), *feat_idx.stride(), feat_idx.shape[1], W_enc.shape[1],
        W_enc.data_ptr(), *W_enc.stride(), b_enc.data_ptr(), b_enc.stride(0),
        W_dec.data_ptr(), *W_dec.stride(), b_dec.data_ptr(), b_dec.stride(0),
        None if thr is None else thr.data_ptr(), 0 if thr is None else thr.stride(0),
        int(bool(apply_b_dec_to_input)), mode.data_ptr(), *mode.stride(), value.data_ptr(), *value.stride(),
        None, 0, None, 0, 0,
    )  # fmt: skip
    S = feat_idx.shape[0]

    def edit(h, slot_of_token, token_threshold=None, token_value=None):
        if h.dtype not in _H_DTYPES:
            return reference.sae_edit(
                h, slot_of_token, feat_idx, W_enc, b_enc, W_dec, b_dec, threshold, apply_b_dec_to_input,
                mode, value, token_threshold, token_value,
            )  # fmt: skip
        keep: list = []  # NOTE: the closure holds the bound tensors, the caller the per-call ones
        # NOTE: one argument block per prepared op, filled per call: one thread (the engine's) calls it
        e.tok_thr = None if token_threshold is None else token_threshold.data_ptr()
        e.tok_thr_s = 0 if token_threshold is None else token_threshold.stride(0)
        e.tv, e.tv_s0, e.tv_s1 = _token_value(token_value)
        _run(lib.ss_sae_edit, _tokens(h, slot_of_token, S, keep), e)
        return h

    return edit


def project_clamp(h, slot_of_token, slot_dirs, lo, hi, dir_count, token_value=None):
    """See `steerkernels.project_clamp`."""
    lib = load()
    if lib is None or h.dtype not in _H_DTYPES or h.shape[0] == 0:
        return reference.project_clamp(h, slot_of_token, slot_dirs, lo, hi, dir_count, token_value)
    keep = [dirs := _f32(slot_dirs), lo := _f32(lo), hi := _f32(hi), count := _long(dir_count)]
    tokens = _tokens(h, slot_of_token, dirs.shape[0], keep)
    args = ClampArgs(
        dirs.data_ptr(), *dirs.stride(), lo.data_ptr(), *lo.stride(), hi.data_ptr(), *hi.stride(),
        count.data_ptr(), count.stride(0), dirs.shape[1], *_token_value(token_value),
    )  # fmt: skip
    _run(lib.ss_project_clamp, tokens, args)
    return h


def sae_edit(
    h, slot_of_token, feat_idx, W_enc, b_enc, W_dec, b_dec, threshold, apply_b_dec_to_input, mode, value,
    token_threshold=None, token_value=None,
):  # fmt: skip
    """See `steerkernels.sae_edit`."""
    lib = load()
    if lib is None or h.dtype not in _H_DTYPES or h.shape[0] == 0:
        return reference.sae_edit(
            h, slot_of_token, feat_idx, W_enc, b_enc, W_dec, b_dec, threshold, apply_b_dec_to_input,
            mode, value, token_threshold, token_value,
        )  # fmt: skip
    thr = None if threshold is None else _f32(threshold)
    edit = bind_sae_edit(
        _long(feat_idx), _f32(W_enc), _f32(b_enc), _f32(W_dec), _f32(b_dec), thr, apply_b_dec_to_input,
        _long(mode), _f32(value),
    )  # fmt: skip
    return edit(h, slot_of_token, token_threshold, token_value)


def apply_logit_bias(
    logits, temperature, sparse_ids, sparse_bias, dense_bank, dense_idx, penalty_ids, penalty_counts,
    repetition_penalty, presence_penalty, frequency_penalty,
):  # fmt: skip
    """See `steerkernels.apply_logit_bias`."""
    lib = load()
    if lib is None:
        return reference.apply_logit_bias(
            logits, temperature, sparse_ids, sparse_bias, dense_bank, dense_idx,
            penalty_ids, penalty_counts, repetition_penalty, presence_penalty, frequency_penalty,
        )  # fmt: skip
    keep: list = []
    args = _logit_args(
        logits, temperature, sparse_ids, sparse_bias, dense_bank, dense_idx, penalty_ids, penalty_counts,
        repetition_penalty, presence_penalty, frequency_penalty, keep,
    )  # fmt: skip
    _run(lib.ss_apply_logit_bias, args)
    return logits


def sampling_logits(logits, *terms, process: bool, argmax: bool):
    """See `steerkernels.sampling_logits` (`terms`: apply_logit_bias's, after the logits); None where the one
    pass cannot run (no library, fp16 logits): the public op then runs the three ops one after another."""
    lib = load()
    if lib is None or logits.dtype not in _H_DTYPES:
        return None
    R, V = logits.shape
    bf16 = logits.dtype == torch.bfloat16
    x = _util.empty((R, V), torch.float32, logits.device) if bf16 else logits
    keep: list = []
    args = _logit_args(x, *terms, keep)
    tokens = _util.empty((R,), torch.int64, logits.device) if argmax else None
    if bf16:
        args.src, args.src_row = logits.data_ptr(), logits.stride(0)
    args.argmax = None if tokens is None else tokens.data_ptr()
    args.process = int(process)
    _run(lib.ss_apply_logit_bias, args)
    return x, tokens


def _logit_args(
    logits, temperature, sparse_ids, sparse_bias, dense_bank, dense_idx, penalty_ids, penalty_counts,
    repetition_penalty, presence_penalty, frequency_penalty, keep: list,
) -> LogitArgs:  # fmt: skip
    """The logit pass's argument block over fp32 `logits`, processing on; `keep` holds the converted
    tensors until the call returns."""
    rows = [
        _f32(t).contiguous() for t in (temperature, repetition_penalty, presence_penalty, frequency_penalty)
    ]
    sids, sbias = _long(sparse_ids).contiguous(), _f32(sparse_bias).contiguous()
    didx = _long(dense_idx).contiguous()
    pids, pcounts = _long(penalty_ids).contiguous(), _long(penalty_counts).contiguous()
    bank = _f32(dense_bank)
    if bank.shape[0] and bank.stride(1) != 1:
        bank = bank.contiguous()
    keep += [*rows, sids, sbias, didx, pids, pcounts, bank]
    R, V = logits.shape
    return LogitArgs(
        logits.data_ptr(), logits.stride(0), R, V, rows[0].data_ptr(),
        sids.data_ptr(), sbias.data_ptr(), sids.shape[1],
        bank.data_ptr(), bank.stride(0), bank.shape[0], didx.data_ptr(), didx.shape[1],
        pids.data_ptr(), pcounts.data_ptr(), pids.shape[1],
        rows[1].data_ptr(), rows[2].data_ptr(), rows[3].data_ptr(), torch.get_num_threads(),
        None, 0, None, 1,
    )  # fmt: skip


def resample_draw(slot_of_token, token_key, token_pos, stream, density, samples, sample_count):
    """See `steerkernels.resample_draw`."""
    lib = load()
    if lib is None:
        return reference.resample_draw(
            slot_of_token, token_key, token_pos, stream, density, samples, sample_count
        )  # fmt: skip
    T = slot_of_token.shape[0]
    S, F, N = samples.shape
    out = _util.empty((T, F), torch.float32, samples.device)
    slot, count = _long(slot_of_token), _long(sample_count)
    keep = [slot, count]  # noqa: F841 (alive during the call)
    args = ResampleArgs(
        out.data_ptr(), out.stride(0), T, S, F, N, slot.data_ptr(), slot.stride(0),
        token_key.data_ptr(), token_key.stride(0), token_pos.data_ptr(), token_pos.stride(0),
        stream.data_ptr(), *stream.stride(), density.data_ptr(), *density.stride(),
        count.data_ptr(), *count.stride(), samples.data_ptr(), *samples.stride(),
    )  # fmt: skip
    _run(lib.ss_resample_draw, args)
    return out


def argmax_rows(logits):
    """See `steerkernels.argmax_rows`."""
    lib = load()
    if lib is None or logits.dtype != torch.float32:
        return reference.argmax_rows(logits)
    R, V = logits.shape
    out = torch.empty(R, dtype=torch.int64)
    lib.ss_argmax_rows(logits.data_ptr(), logits.stride(0), R, V, out.data_ptr(), torch.get_num_threads())
    return out
