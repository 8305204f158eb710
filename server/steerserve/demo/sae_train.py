"""The demo SAE: a ReLU sparse autoencoder on one residual-stream site of the demo model.

Steps:
1. `collect`: run the model over generated documents (one per row, BOS first, as the server sees a
   prompt) and keep the site's activation of every token but BOS, with the token's ground-truth
   concepts (from the document's character spans);
2. `train_sae`: SAELens' standard architecture (x - b_dec -> W_enc, b_enc -> ReLU -> W_dec, b_dec),
   loss = MSE + l1 * sum_f a_f * |W_dec[f]|, trained on activations scaled to mean norm sqrt(d_in);
   the scale is folded back into the weights, so the saved SAE reads raw activations;
3. `sae_metrics`: fraction of variance explained and L0 on held-out activations;
4. `save_saelens`: cfg.json + sae_weights.safetensors as SAELens 6 writes them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from steerserve.demo.corpus import Document

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SAEConfig:
    layer: int = 1  # resid_post of this decoder layer
    d_sae: int = 1024
    l1: float = 3.0
    steps: int = 2000
    batch: int = 2048
    lr: float = 1e-3
    train_docs: int = 6000
    eval_docs: int = 1000


@dataclass
class Activations:
    acts: torch.Tensor  # [num_tokens, d_model] float32
    token_ids: torch.Tensor  # [num_tokens]
    concepts: list[frozenset[str]]  # per token


@torch.no_grad()
def collect(model, tokenizer, docs: list[Document], layer: int, batch: int = 64) -> Activations:
    """Activations of resid_post of `layer` for every non-BOS token of `docs`, with token concepts."""
    acts, ids_out, concepts = [], [], []
    for start in range(0, len(docs), batch):
        chunk = docs[start : start + batch]
        enc = tokenizer(
            [d.text for d in chunk], add_special_tokens=True, return_offsets_mapping=True, padding=True,
            return_tensors="pt",
        )  # fmt: skip
        out = model(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True
        )
        hidden = out.hidden_states[layer + 1]  # [rows, T, d_model]: output of decoder layer `layer`
        for row, doc in enumerate(chunk):
            n = int(enc["attention_mask"][row].sum())
            acts.append(hidden[row, 1:n].float())
            ids_out.append(enc["input_ids"][row, 1:n])
            for s, e in enc["offset_mapping"][row, 1:n].tolist():
                mid = max(s, e - 1)  # a token belongs to a span when its last character does
                concepts.append(frozenset(c for a, b, c in doc.spans if a <= mid < b))
    return Activations(torch.cat(acts), torch.cat(ids_out), concepts)


def encode(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.relu((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"])  # [n, d_sae]


def train_sae(acts: torch.Tensor, cfg: SAEConfig, seed: int, log_every: float = 15.0) -> dict:
    """SAELens-named weights (float32) that read raw activations `acts` [n, d_in]."""
    g = torch.Generator().manual_seed(seed)
    d_in = acts.shape[1]
    scale = d_in**0.5 / acts.norm(dim=-1).mean()  # inputs to mean norm sqrt(d_in)
    x_all = acts * scale
    W_dec = torch.randn(cfg.d_sae, d_in, generator=g)
    W_dec = 0.1 * W_dec / W_dec.norm(dim=-1, keepdim=True)
    p = {
        "W_enc": W_dec.t().clone(),
        "b_enc": torch.zeros(cfg.d_sae),
        "W_dec": W_dec,
        "b_dec": x_all.mean(0),
    }
    for t in p.values():
        t.requires_grad_(True)
    opt = torch.optim.Adam(p.values(), lr=cfg.lr, betas=(0.9, 0.999))
    start = last = time.monotonic()
    for step in range(cfg.steps):
        x = x_all[torch.randint(len(x_all), (cfg.batch,), generator=g)]  # [batch, d_in]
        a = encode(x, p)
        recon = a @ p["W_dec"] + p["b_dec"]
        mse = (recon - x).pow(2).sum(-1).mean()
        l1_weight = cfg.l1 * min(1.0, (step + 1) / (0.05 * cfg.steps))  # warm the penalty up
        sparsity = (a * p["W_dec"].norm(dim=-1)).sum(-1).mean()
        loss = mse + l1_weight * sparsity
        lr = cfg.lr * min(1.0, 5 * (cfg.steps - step) / cfg.steps)  # decay over the last fifth
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(p.values(), 1.0)
        opt.step()
        if time.monotonic() - last > log_every or step == cfg.steps - 1:
            last = time.monotonic()
            with torch.no_grad():
                fvu = mse.item() / (x - x.mean(0)).pow(2).sum(-1).mean().item()
                l0 = (a > 0).float().sum(-1).mean().item()
            logger.info(
                "sae step %d/%d mse %.3f fvu %.4f l0 %.1f (%.0f s)",
                step + 1, cfg.steps, mse.item(), fvu, l0, last - start,
            )  # fmt: skip
    with torch.no_grad():  # fold the input scale: the saved SAE reads raw activations
        return {
            "W_enc": (p["W_enc"] * scale).contiguous(),
            "b_enc": p["b_enc"].clone(),
            "W_dec": (p["W_dec"] / scale).contiguous(),
            "b_dec": (p["b_dec"] / scale).contiguous(),
        }


@torch.no_grad()
def sae_metrics(weights: dict, acts: torch.Tensor) -> dict:
    """Fraction of variance explained, mean L0, and the number of features that never fire."""
    a = encode(acts, weights)  # [n, d_sae]
    recon = a @ weights["W_dec"] + weights["b_dec"]
    fvu = (recon - acts).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum()
    return {
        "fve": round(1 - fvu.item(), 5),
        "l0": round((a > 0).float().sum(-1).mean().item(), 3),
        "dead_features": int(((a > 0).sum(0) == 0).sum()),
        "num_tokens": len(acts),
    }


def saelens_cfg(d_in: int, d_sae: int, layer: int, model_name: str, context: int) -> dict:
    return {
        "architecture": "standard", "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {
            "model_name": model_name, "hook_name": f"blocks.{layer}.hook_resid_post",
            "hook_head_index": None, "prepend_bos": True, "dataset_path": "steerserve.demo.corpus",
            "context_size": context, "sae_lens_version": "6.5.1", "neuronpedia_id": None,
        },
    }  # fmt: skip


def save_saelens(weights: dict, cfg: dict, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(
        {k: v.float().contiguous() for k, v in weights.items()}, str(folder / "sae_weights.safetensors")
    )
