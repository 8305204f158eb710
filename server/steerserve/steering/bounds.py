"""Compile-time checks of a SteeringSpec against what the device banks hold and what float32 can carry.

Every cap the banks (runner/steering/banks.py, runner/steering/gates.py) enforce while a row is written is checked
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
import math
from collections import Counter
from collections.abc import Callable

import torch

from steerserve.config import SteeringConfig
from steerserve.registry import NotFound, Registry, RegistryError, SAEWeights, TooLarge
from steerserve.steering.errors import SteeringError, invalid
from steerserve.types.steering import (
    AddScale,
    FeatureAblate,
    FeatureAdd,
    FeatureClamp,
    FeatureEdit,
    FeatureResample,
    FeatureScale,
    Intervention,
    Positions,
    SAERef,
    SteeringSpec,
    VectorAdd,
    VectorProject,
    VectorResample,
)

logger = logging.getLogger(__name__)
_POS_NAMES = ("prompt", "generated")  # position class 0 / 1: a slot's offset from 2 * row (Positions.classes)

SAEWeightsOf = Callable[[SAERef], SAEWeights]


def _bank_keys(iv: Intervention) -> list[tuple]:
    """The bank slots `iv` writes: one per position class, in the bank of its site and gate."""
    return [(iv.site, iv.gate, pc) for pc in Positions(iv.positions).classes]


def check_caps(spec: SteeringSpec, limits: SteeringConfig) -> None:
    """400 on the first item past a bank cap: `max_feature_edits` per SAE, site, gate and position;
    `max_project_dirs` per site, gate and position. (`max_gates` is checked by compile_steering.)"""
    edits: Counter = Counter()
    dirs: Counter = Counter()
    for iv in spec.interventions:
        for site, gate, pc in _bank_keys(iv):
            if isinstance(iv, FeatureEdit):
                key = (site, gate, iv.sae.uid, pc)
                edits[key] += 1
                if edits[key] > limits.max_feature_edits:
                    raise invalid(
                        iv.source,
                        f"more than {limits.max_feature_edits} clamp / scale / ablate edits of SAE "
                        f"{iv.sae.id!r} at {site.hook_name} on {_POS_NAMES[pc]} tokens{_gated(gate)} (max_feature_edits)",
                    )
            elif isinstance(iv, VectorProject):
                key = (site, gate, pc)
                dirs[key] += 1
                if dirs[key] > limits.max_project_dirs:
                    raise invalid(
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
        self.saes: dict[str, SAEWeights | None] = {}
        self._vectors: dict[str, object] = {}

    def decoder_row(self, iv: FeatureAdd | FeatureEdit) -> torch.Tensor | None:
        if iv.sae.uid not in self.saes:
            self.saes[iv.sae.uid] = self._get(lambda: self.sae_weights(iv.sae), f"{iv.source}.feature.sae")
        weights = self.saes[iv.sae.uid]
        return None if weights is None else weights.W_dec[iv.index].float()

    def vector(self, iv: VectorAdd | VectorProject) -> torch.Tensor | None:
        vid = iv.vector.id
        if vid not in self._vectors:
            loaded = self._get(lambda: self.registry.load_vector(vid), f"{iv.source}.vector")
            self._vectors[vid] = None if loaded is None else loaded[1]
        vec = self._vectors[vid]
        return None if vec is None else vec.directions[iv.site].float()

    @staticmethod
    def _get(load, param: str):
        try:
            return load()
        except NotFound as exc:
            raise SteeringError(404, f"{param}: {exc.message}", param, "not_found") from None
        except TooLarge as exc:  # past the device cache budget (sae_cache_mb): it can never run here
            raise invalid(param, exc.message) from None
        # NOTE: RuntimeError covers the engine's SteeringResourceError (an item replaced meanwhile)
        except (RegistryError, RuntimeError, OSError) as exc:
            logger.warning("%s: cannot read its tensors to check them (%s); the engine will", param, exc)
            return None


class _FiniteCheck:
    """check_finite's state: the lookups, and each bank slot's running sum of added vectors."""

    def __init__(self, look: _Lookups):
        self.look = look
        self.sums: dict[tuple, torch.Tensor] = {}

    def feature_add(self, iv: FeatureAdd) -> None:
        row = self.look.decoder_row(iv)
        if row is None:
            return
        norm = float(row.norm())
        if iv.scale == AddScale.UNIT and norm == 0.0:
            raise invalid(f"{iv.source}.scale", "the feature's decoder row is zero: it has no direction")
        write_site = self.look.saes[iv.sae.uid].write_site  # a transcoder's `add` is where it writes
        keys = [(write_site, *key[1:]) for key in _bank_keys(iv)]
        self._add(iv.coefficient(norm) * row, keys, f"{iv.source}.strength")

    def feature_target(self, iv: FeatureClamp | FeatureAblate) -> None:
        """What a clamp / ablate adds while the feature is inactive: the target times its decoder row."""
        if iv.value == 0.0:
            return
        row = self.look.decoder_row(iv)
        if row is not None:
            param = f"{iv.source}.{'value' if isinstance(iv, FeatureClamp) else 'to'}"
            _finite(iv.value * row, param, "the target times the feature's decoder row")

    def feature_resample(self, iv: FeatureResample) -> None:
        """What a resample adds at most while the feature is inactive: its largest draw times its row."""
        largest = max(iv.sample, key=abs, default=0.0)
        row = self.look.decoder_row(iv) if largest else None
        if row is not None:
            _finite(
                largest * row,
                f"{iv.source}.to",
                "the largest resampled value times the feature's decoder row",
            )

    def feature_scale(self, iv: FeatureScale) -> None:
        """Nothing to prove: a scale's effect depends on the activation."""

    def vector_add(self, iv: VectorAdd) -> None:
        vec = self.look.vector(iv)
        if vec is not None:
            self._add(iv.strength * vec, _bank_keys(iv), f"{iv.source}.strength")

    def vector_project(self, iv: VectorProject) -> None:
        vec = self.look.vector(iv)
        if vec is not None:
            _finite(vec / vec.norm(), f"{iv.source}.vector", "the vector's unit direction")

    def _add(self, vec: torch.Tensor, keys: list[tuple], param: str) -> None:
        _finite(vec, param, "the added vector")
        for key in keys:  # NOTE: summed per slot in float32, in this order, as the bank sums
            total = self.sums[key] = vec if key not in self.sums else self.sums[key] + vec
            _finite(total, param, f"the sum of the vectors added at {key[0].hook_name}")


# what check_finite proves of each intervention type
FINITE_CHECKS: dict[type, Callable[[_FiniteCheck, Intervention], None]] = {
    FeatureAdd: _FiniteCheck.feature_add,
    FeatureClamp: _FiniteCheck.feature_target,
    FeatureAblate: _FiniteCheck.feature_target,
    FeatureScale: _FiniteCheck.feature_scale,
    VectorAdd: _FiniteCheck.vector_add,
    VectorProject: _FiniteCheck.vector_project,
    FeatureResample: _FiniteCheck.feature_resample,
    VectorResample: _FiniteCheck.vector_project,
}


# per feature-level type, the largest multiple of its decoder row |W_dec[f]| it can write (given that norm)
_ROW_MULTIPLE: dict[type, Callable[[Intervention, float], float]] = {
    FeatureAdd: lambda iv, norm: abs(iv.coefficient(norm)),
    FeatureClamp: lambda iv, norm: abs(iv.value),
    FeatureAblate: lambda iv, norm: abs(iv.value),
    FeatureResample: lambda iv, norm: abs(max(iv.sample, key=abs, default=0.0)),
}


def _clearly_finite(spec: SteeringSpec, look: _Lookups) -> bool:
    """True when every vector check_finite would compute has a norm far below the limit: the norms of
    all the decoder-row multiples the spec writes, summed, stay under half of it (a slot's sum is at most
    the sum of its vectors' norms, a component at most its vector's norm). One norm per feature instead of
    ~10 tensor ops, so a typical compile skips the exact walk; False sends it there (vector items, a zero
    row under `scale: "unit"`, a row that cannot be read, large multiples)."""
    total = 0.0
    for iv in spec.interventions:
        if type(iv) is FeatureScale:  # NOTE: writes nothing the spec fixes (check_finite proves nothing)
            continue
        multiple = _ROW_MULTIPLE.get(type(iv))
        row = None if multiple is None else look.decoder_row(iv)
        if row is None:
            return False
        norm = float(row.norm())
        if norm == 0.0 and type(iv) is FeatureAdd and iv.scale == AddScale.UNIT:
            return False
        total += multiple(iv, norm) * norm
    return math.isfinite(total) and total < _MAX_NORM / 2


def check_finite(spec: SteeringSpec, registry: Registry, sae_weights: SAEWeightsOf | None = None) -> None:
    """400 on the item whose vector (or whose addition to its bank slot's sum) is not finite in float32,
    and on `scale: "unit"` of a zero decoder row (it has no direction)."""
    look = _Lookups(registry, sae_weights)
    if _clearly_finite(spec, look):
        return
    check = _FiniteCheck(look)
    for iv in spec.interventions:
        prove = FINITE_CHECKS.get(type(iv))
        if prove is None:  # NOTE: compile, the only producer, makes only the types above
            raise TypeError(f"no float32 check for intervention type {type(iv).__name__}")
        prove(check, iv)


# NOTE: every normalization (LayerNorm, RMSNorm) sums squares in float32 (bf16 shares its range): a
# residual whose norm passes sqrt(max float32) makes that sum inf, and the layer's output NaN
_MAX_NORM = float(torch.finfo(torch.float32).max) ** 0.5


def _finite(t: torch.Tensor, param: str, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise invalid(param, f"{what} overflows float32: lower it")
    norm = float(t.double().norm())
    if norm >= _MAX_NORM:
        raise invalid(
            param,
            f"{what} has norm {norm:.3g}: the model's next normalization squares it past float32's "
            f"range (norm < {_MAX_NORM:.3g}); lower it",
        )
