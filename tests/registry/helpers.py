"""Test helpers: files written in each format's own layout, and float64 reference math.

Nothing here imports the loaders under test: the writers follow the formats' definitions (SAELens
cfg.json v5/v6 + state dict names, Gemma Scope params.npz, sparsify's nn.Linear encoder, GGUF v3),
and the reference formulas follow each project's forward pass.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

D_IN, D_SAE = 16, 64


def rand_state(arch: str, d_in: int = D_IN, d_sae: int = D_SAE, seed: int = 0) -> dict[str, torch.Tensor]:
    """A SAELens state dict for `arch` (standard | jumprelu | topk | gated), float32."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "W_enc": torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
        "W_dec": torch.randn(d_sae, d_in, generator=g) / d_sae**0.5,
        "b_dec": torch.randn(d_in, generator=g) * 0.1,
    }
    if arch == "gated":
        sd["b_gate"] = torch.randn(d_sae, generator=g) * 0.3
        sd["r_mag"] = torch.randn(d_sae, generator=g) * 0.3
        sd["b_mag"] = torch.randn(d_sae, generator=g) * 0.3
    else:
        sd["b_enc"] = torch.randn(d_sae, generator=g) * 0.3
    if arch == "jumprelu":
        sd["threshold"] = torch.rand(d_sae, generator=g) * 0.4
    return sd


def saelens_cfg(arch: str, version: int, hook: str = "blocks.2.hook_resid_post", k: int = 8, **extra) -> dict:
    """cfg.json as SAELens 5.x or 6.x writes it."""
    if version == 6:
        cfg = {
            "architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {
                "sae_lens_version": "6.5.1", "sae_lens_training_version": "6.5.1", "model_name": "toy-model",
                "hook_name": hook, "hook_head_index": None, "prepend_bos": True, "dataset_path": "toy/data",
                "context_size": 128, "neuronpedia_id": None,
            },
        }  # fmt: skip
        if arch == "topk":
            cfg.update(k=k, rescale_acts_by_decoder_norm=False)
    else:
        layer = int(hook.split(".")[1])
        topk = arch == "topk"
        cfg = {
            "architecture": "standard" if topk else arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
            "device": "cpu", "model_name": "toy-model", "hook_name": hook, "hook_layer": layer,
            "hook_head_index": None, "activation_fn_str": "topk" if topk else "relu",
            "activation_fn_kwargs": {"k": k} if topk else {}, "apply_b_dec_to_input": True,
            "finetuning_scaling_factor": False, "sae_lens_training_version": "5.3.0", "prepend_bos": True,
            "dataset_path": "toy/data", "context_size": 128, "normalize_activations": "none",
            "neuronpedia_id": None,
        }  # fmt: skip
    cfg.update(extra)
    return cfg


def write_saelens(folder: Path, cfg: dict, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "sae_weights.safetensors"))
    return folder


# ---- float64 reference math, from each project's forward pass ---------------------------------------


def _d(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def ref_saelens_encode(
    arch: str, sd: dict, x: torch.Tensor, k: int = 8, apply_b_dec: bool = True
) -> torch.Tensor:
    sd = {n: _d(t) for n, t in sd.items()}
    sae_in = _d(x) - sd["b_dec"] * apply_b_dec
    if arch == "gated":  # SAELens GatedSAE.encode
        active = (sae_in @ sd["W_enc"] + sd["b_gate"]) > 0
        mag = sae_in @ (sd["W_enc"] * torch.exp(sd["r_mag"])) + sd["b_mag"]
        return active * torch.relu(mag)
    pre = sae_in @ sd["W_enc"] + sd["b_enc"]
    if arch == "jumprelu":  # relu(pre) * (pre > threshold)
        return torch.relu(pre) * (pre > sd["threshold"])
    if arch == "topk":  # TopK: top k pre-activations, relu'd, others 0
        vals, idx = torch.topk(pre, k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    return torch.relu(pre)


def ref_decode(sd: dict, acts: torch.Tensor) -> torch.Tensor:
    return _d(acts) @ _d(sd["W_dec"]) + _d(sd["b_dec"])


# ---- other formats ----------------------------------------------------------------------------------


def write_gemmascope(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    """params.npz with Gemma Scope's keys: W_enc [d_model, d_sae], W_dec [d_sae, d_model], b_enc, b_dec, threshold."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k: v.numpy() for k, v in sd.items()})
    return path


def write_sparsify(
    folder: Path, d_in: int, d_sae: int, k: int, seed: int = 0, transposed: bool = False
) -> dict:
    """A sparsify Sae.save_to_disk folder: cfg.json (with d_in) + sae.safetensors. Returns the state."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "encoder.weight": torch.randn(d_sae, d_in, generator=g) / d_in**0.5,  # nn.Linear(d_in, d_sae)
        "encoder.bias": torch.randn(d_sae, generator=g) * 0.1,
        "W_dec": torch.randn(d_sae, d_in, generator=g) / d_sae**0.5,
        "b_dec": torch.randn(d_in, generator=g) * 0.1,
    }
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"expansion_factor": d_sae // d_in, "normalize_decoder": True, "num_latents": d_sae, "k": k,
           "multi_topk": False, "skip_connection": False, "d_in": d_in}  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(cfg))
    on_disk = dict(state)
    if transposed:
        on_disk = {
            **state,
            "encoder.weight": state["encoder.weight"].T.contiguous(),
            "W_dec": state["W_dec"].T.contiguous(),
        }
    save_file(on_disk, str(folder / "sae.safetensors"))
    return state


def ref_sparsify_encode(state: dict, x: torch.Tensor, k: int) -> torch.Tensor:
    """sparsify: relu(encoder(x - b_dec)), keep the top k."""
    s = {n: _d(t) for n, t in state.items()}
    pre = torch.relu((_d(x) - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
    vals, idx = torch.topk(pre, k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals)


def write_gguf(
    path: Path,
    tensors: dict[str, np.ndarray],
    kv: dict[str, str | int] | None = None,
    magic: bytes = b"GGUF",
    alignment: int = 32,
) -> Path:
    """A GGUF v3 file as llama.cpp's gguf writer lays it out (strings: u64 length + bytes;
    tensor dims innermost first; data section aligned; each tensor padded to the alignment)."""

    def gstr(s: str) -> bytes:
        b = s.encode()
        return struct.pack("<Q", len(b)) + b

    kv = kv if kv is not None else {"general.architecture": "controlvector", "controlvector.model_hint": "llama",
                                    "controlvector.layer_count": len(tensors)}  # fmt: skip
    out = bytearray(magic + struct.pack("<IQQ", 3, len(tensors), len(kv)))
    for key, value in kv.items():
        out += gstr(key)
        out += struct.pack("<I", 8) + gstr(value) if isinstance(value, str) else struct.pack("<II", 4, value)
    offset, blobs = 0, []
    for name, arr in tensors.items():
        ggml_type = {np.dtype("float32"): 0, np.dtype("float16"): 1}[arr.dtype]
        out += (
            gstr(name)
            + struct.pack("<I", arr.ndim)
            + b"".join(struct.pack("<Q", d) for d in reversed(arr.shape))
        )
        out += struct.pack("<IQ", ggml_type, offset)
        data = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        data += b"\0" * (-len(data) % alignment)
        blobs.append(data)
        offset += len(data)
    out += b"\0" * (-len(out) % alignment)
    path.write_bytes(bytes(out) + b"".join(blobs))
    return path
