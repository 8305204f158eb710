"""Feature labels from the corpus' ground truth: each SAE feature's best concept, max activation, density.

A feature is "active" on a token when its activation is > 0. For every feature f and concept c,
precision = P(c | f active) and recall = P(f active | c) over held-out tokens; a feature's label is the
concept with the best F1 when its precision for it reaches `MIN_PRECISION`, else the token it fires on
most. Features are narrow (each fires on some tokens of its concept: recall of a few percent), so a
concept is carried by several features with high precision, and the variants combine them. The result is
a Neuronpedia-style export (`index`, `description`, `explanations`, `maxActApprox`, `frac_nonzero`,
and our `mean_activation`)
that `registry.formats.neuronpedia.parse_features` reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steerserve.demo.sae_train import Activations, encode

MIN_PRECISION = 0.8


@dataclass(frozen=True)
class ConceptScore:
    feature: int
    concept: str
    precision: float
    recall: float
    f1: float


def concept_label(concept: str) -> str:
    """`weather:cold` -> `cold (weather)`."""
    kind, value = concept.split(":", 1)
    return f"{value} ({kind})"


@torch.no_grad()
def score_features(acts: Activations, weights: dict) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """(activations [n, d_sae], concept names, F1 [d_sae, n_concepts]) plus precision/recall via
    `concept_scores`."""
    a = encode(acts.acts, weights)  # [n, d_sae]
    names = sorted({c for cs in acts.concepts for c in cs})
    column = {c: i for i, c in enumerate(names)}
    truth = torch.zeros(len(acts.concepts), len(names))  # [n, n_concepts]
    for row, cs in enumerate(acts.concepts):
        for c in cs:
            truth[row, column[c]] = 1.0
    return a, names, truth


@torch.no_grad()
def concept_scores(a: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(precision, recall, F1), each [d_sae, n_concepts]."""
    active = (a > 0).float()  # [n, d_sae]
    hits = active.t() @ truth  # [d_sae, n_concepts]
    precision = hits / active.sum(0).clamp(min=1)[:, None]
    recall = hits / truth.sum(0).clamp(min=1)[None, :]
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-9)
    return precision, recall, f1


@torch.no_grad()
def label_features(acts: Activations, weights: dict, tokenizer) -> tuple[list[dict], dict[str, list]]:
    """(Neuronpedia-style feature entries, concept -> [ConceptScore] of its features with precision >=
    MIN_PRECISION, most recall first)."""
    a, names, truth = score_features(acts, weights)
    precision, recall, f1 = concept_scores(a, truth)
    active = a > 0
    density = active.float().mean(0)  # [d_sae]
    max_act = a.max(0).values  # [d_sae]
    mean_act = a.mean(0)  # [d_sae], zeros included: what `ablate` with "to": "mean" sets
    best = f1.argmax(dim=1)  # [d_sae]
    entries = []
    for f in range(a.shape[1]):
        entry = {
            "index": f,
            "maxActApprox": round(max_act[f].item(), 5),
            "frac_nonzero": density[f].item(),
            "mean_activation": round(mean_act[f].item(), 6),
        }
        if not active[:, f].any():
            entry["description"] = "dead (never fires on the demo corpus)"
        elif precision[f, best[f]] >= MIN_PRECISION:
            c = names[best[f]]
            entry["description"] = concept_label(c)
            entry["explanations"] = [
                {
                    "description": f"{concept_label(c)}: precision {precision[f, best[f]]:.2f}, "
                    f"recall {recall[f, best[f]]:.2f} against the corpus' {c} labels"
                }
            ]
        else:
            ids, counts = acts.token_ids[active[:, f]].unique(return_counts=True)
            token = tokenizer.decode([int(ids[counts.argmax()])])
            entry["description"] = f"the token {token.strip()!r}"
        entries.append(entry)
    by_concept = {}
    for j, c in enumerate(names):
        sharp = (precision[:, j] >= MIN_PRECISION).nonzero().flatten()
        order = sharp[recall[sharp, j].argsort(descending=True)].tolist()
        by_concept[c] = [
            ConceptScore(f, c, precision[f, j].item(), recall[f, j].item(), f1[f, j].item())
            for f in order
            if names[best[f]] == c  # the feature's own label
        ]
    return entries, by_concept
