"""Compile-time checks of a SteeringSpec against what the device banks hold and what float32 can carry.

Every cap the banks (steering/banks.py, steering/gates.py) enforce while a row is written is checked
here first, with the same grouping, so a request over a cap is a 400 naming the steering item instead of
a failure inside the engine. And steering whose arithmetic provably leaves float32 is refused: the
summed additive vector of a bank slot, computed exactly as the bank computes it, or a clamp / ablate
target times its decoder row (what the edit writes while the feature is inactive), with a component
that is not finite or a norm past sqrt(max float32) (the next normalization's sum of squares overflows:
NaN). What depends on the activations (a `scale` factor, an overflow several layers later) cannot be
proved here: the engine ends such a request when its logits become non-finite.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import torch

from steerserve.api.errors import APIError
from steerserve.config import SteeringConfig
from steerserve.registry import NotFound, Registry, RegistryError, SAEWeights, TooLarge
from steerserve.steering.banks import slots_for
from steerserve.steering.resources import SteeringResourceError
from steerserve.steering.rows import _feature_add_coeff
from steerserve.steering.spec import Intervention, SAERef, SteeringSpec

logger = logging.getLogger(__name__)
_EDITS = ("feature_clamp", "feature_scale", "feature_ablate")
_POS_NAMES = ("prompt", "generated")  # position class 0 / 1: a slot's offset from 2 * row (banks.slots_for)

SAEWeightsOf = Callable[[SAERef], SAEWeights]


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_steering")


def _bank_keys(iv: Intervention) -> list[tuple]:
    """The bank slots `iv` writes: one per position class (the bank's own slots of row 0), in the bank of
    its site and gate."""
    return [(iv.site, iv.gate, pc) for pc in slots_for(0, iv.positions)]


def check_caps(spec: SteeringSpec, limits: SteeringConfig) -> None:
    """400 on the first item past a bank cap: `max_feature_edits` per SAE, site, gate and position;
    `max_project_dirs` per site, gate and position. (`max_gates` is checked by compile_steering.)"""
    edits: Counter = Counter()
    dirs: Counter = Counter()
    for iv in spec.interventions:
        for site, gate, pc in _bank_keys(iv):
            if iv.kind in _EDITS:
                key = (site, gate, iv.sae.uid, pc)
                edits[key] += 1
                if edits[key] > limits.max_feature_edits:
                    raise _bad(
                        iv.source,
                        f"more than {limits.max_feature_edits} clamp / scale / ablate edits of SAE "
                        f"{iv.sae.id!r} at {site.hook_name} on {_POS_NAMES[pc]} tokens{_gated(gate)} (max_feature_edits)",
                    )
            elif iv.kind == "vector_project":
                key = (site, gate, pc)
                dirs[key] += 1
                if dirs[key] > limits.max_project_dirs:
                    raise _bad(
                        iv.source,
                        f"more than {limits.max_project_dirs} project_out / clamp directions at "
                        f"{site.hook_name} on {_POS_NAMES[pc]} tokens{_gated(gate)} (max_project_dirs)",
                    )


def _gated(gate) -> str:
    return "" if gate is None else " under one `when` gate"


class _Lookups:
    """SAE weights and vector directions, each read once per check. An item deleted meanwhile is a 404,
    an SAE past the device cache budget a 400; one whose tensors cannot be read (a vanished blob, replaced
    meanwhile) is None: its checks are skipped and the engine fails that request at admission."""

    def __init__(self, registry: Registry, sae_weights: SAEWeightsOf | None):
        self.registry = registry
        self.sae_weights = sae_weights or (lambda ref: registry.load_sae(ref.id)[1])
        self._saes: dict[str, SAEWeights | None] = {}
        self._vectors: dict[str, object] = {}

    def decoder_row(self, iv: Intervention) -> torch.Tensor | None:
        if iv.sae.uid not in self._saes:
            self._saes[iv.sae.uid] = self._get(lambda: self.sae_weights(iv.sae), f"{iv.source}.feature.sae")
        weights = self._saes[iv.sae.uid]
        return None if weights is None else weights.W_dec[iv.index].float()

    def vector(self, iv: Intervention) -> torch.Tensor | None:
        if iv.vector_id not in self._vectors:
            loaded = self._get(lambda: self.registry.load_vector(iv.vector_id), f"{iv.source}.vector")
            self._vectors[iv.vector_id] = None if loaded is None else loaded[1]
        vec = self._vectors[iv.vector_id]
        return None if vec is None else vec.directions[iv.site].float()

    @staticmethod
    def _get(load, param: str):
        try:
            return load()
        except NotFound as exc:
            raise APIError(404, f"{param}: {exc.message}", param, "not_found") from None
        except TooLarge as exc:  # past the device cache budget (sae_cache_mb): it can never run here
            raise _bad(param, exc.message) from None
        except (RegistryError, SteeringResourceError, RuntimeError, OSError) as exc:
            logger.warning("%s: cannot read its tensors to check them (%s); the engine will", param, exc)
            return None


def _needed(look: _Lookups, iv: Intervention) -> torch.Tensor | None:
    """The tensor `iv`'s check reads (its decoder row or vector direction); None: nothing to check."""
    if iv.kind == "feature_add" or (iv.kind in ("feature_clamp", "feature_ablate") and iv.value != 0.0):
        return look.decoder_row(iv)
    if iv.kind in ("vector_add", "vector_project"):
        return look.vector(iv)
    return None  # a scale (its effect depends on the activation), an ablation to zero


def check_finite(spec: SteeringSpec, registry: Registry, sae_weights: SAEWeightsOf | None = None) -> None:
    """400 on the item whose vector (or whose addition to its bank slot's sum) is not finite in float32,
    and on `scale: "unit"` of a zero decoder row (it has no direction)."""
    look = _Lookups(registry, sae_weights)
    sums: dict[tuple, torch.Tensor] = {}
    for iv in spec.interventions:
        data = _needed(look, iv)
        if data is None:
            continue
        if iv.kind in ("feature_clamp", "feature_ablate"):  # what it adds while the feature is inactive
            param = f"{iv.source}.{'value' if iv.kind == 'feature_clamp' else 'to'}"
            _finite(iv.value * data, param, "the target times the feature's decoder row")
            continue
        if iv.kind == "vector_project":
            _finite(data / data.norm(), f"{iv.source}.vector", "the vector's unit direction")
            continue
        if iv.kind == "feature_add" and iv.scale == "unit" and float(data.norm()) == 0.0:
            raise _bad(f"{iv.source}.scale", "the feature's decoder row is zero: it has no direction")
        coeff = _feature_add_coeff(iv, data) if iv.kind == "feature_add" else iv.value
        vec, param = coeff * data, f"{iv.source}.strength"
        _finite(vec, param, "the added vector")
        keys = _bank_keys(iv)
        if iv.kind == "feature_add":  # a transcoder's `add` is in the bank where it writes (steering/rows.py)
            keys = [(look._saes[iv.sae.uid].write_site, *key[1:]) for key in keys]
        for key in keys:  # NOTE: summed per slot in float32, in this order, as the bank sums
            total = sums[key] = vec if key not in sums else sums[key] + vec
            _finite(total, param, f"the sum of the vectors added at {key[0].hook_name}")


# NOTE: every normalization (LayerNorm, RMSNorm) sums squares in float32 (bf16 shares its range): a
# residual whose norm passes sqrt(max float32) makes that sum inf, and the layer's output NaN
_MAX_NORM = float(torch.finfo(torch.float32).max) ** 0.5


def _finite(t: torch.Tensor, param: str, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise _bad(param, f"{what} overflows float32: lower it")
    norm = float(t.double().norm())
    if norm >= _MAX_NORM:
        raise _bad(
            param,
            f"{what} has norm {norm:.3g}: the model's next normalization squares it past float32's "
            f"range (norm < {_MAX_NORM:.3g}); lower it",
        )
