"""Steering items (`steering`, `feature_logit_bias`, `stop_when`, `variant`) -> a validated SteeringSpec.

The one validator of steering. Its input is typed (steering/items.py): the request's fields as the
edge parsed them, or plain JSON (a stored variant, a test) parsed here through the same models. On
top of their shape it checks what needs the registry, the model or the config, so nothing invalid
reaches the device: SAE / vector / variant exist (404), fit the served model (d_in, site), feature
index < d_sae, numbers within caps, `scale: max_activation` only where the feature has one, a gate read
at or before the site it controls; then the device banks' caps and float32 (steering/bounds.py).
Errors are SteeringError naming the offending field: `steering[2].feature.index`. Blocking (registry
reads): call it from a thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

from steerserve.config import SteeringConfig
from steerserve.registry import NotFound, Registry
from steerserve.steering import items as it
from steerserve.steering.bounds import SAEWeightsOf, check_caps, check_finite
from steerserve.steering.errors import SteeringError, invalid
from steerserve.types.model import ModelInfo
from steerserve.types.sites import Site, SiteError
from steerserve.types.steering import (
    AddScale,
    FeatureAblate,
    FeatureAdd,
    FeatureClamp,
    FeatureResample,
    FeatureScale,
    Gate,
    Intervention,
    LogitBiasTerm,
    SAERef,
    SteeringSpec,
    VectorAdd,
    VectorProject,
    VectorRef,
    VectorResample,
)


class _Compiler:
    def __init__(self, registry: Registry, info: ModelInfo, limits: SteeringConfig):
        self.registry = registry
        self.info = info
        self.limits = limits
        self._saes: dict[str, object] = {}

    # -- shared pieces ------------------------------------------------------------------------
    def number(self, value: float, param: str) -> float:
        """`value` (finite by its model) within the configured cap."""
        cap = self.limits.max_abs_value
        if not math.isfinite(value) or abs(value) > cap:
            raise invalid(param, f"must be finite with |value| <= {cap:g}, got {value!r}")
        return float(value)

    def sae(self, ref: it.FeatureRef, param: str) -> tuple[object, int]:
        """The SAE record and feature index of `ref` (`param` names the ref)."""
        if ref.sae not in self._saes:
            try:
                record = self.registry.get_sae(ref.sae)
            except NotFound:
                raise SteeringError(
                    404, f"{param}.sae: SAE {ref.sae!r} does not exist", f"{param}.sae", "sae_not_found"
                ) from None
            if record.d_in != self.info.d_model:
                raise invalid(
                    f"{param}.sae",
                    f"SAE {ref.sae!r} has d_in {record.d_in}; the model has d_model {self.info.d_model}",
                )
            try:
                self.info.check_site(record.site)
            except SiteError as exc:
                raise invalid(
                    f"{param}.sae", f"SAE {ref.sae!r} acts at {record.site.hook_name}: {exc}"
                ) from None
            self._saes[ref.sae] = record
        record = self._saes[ref.sae]
        if not ref.index < record.d_sae:
            raise invalid(
                f"{param}.index",
                f"must be an integer in [0, {record.d_sae}) for SAE {ref.sae!r}, got {ref.index!r}",
            )
        return record, ref.index

    def recorded(self, record, index: int, stats: tuple[str, ...], param: str, how: str = "") -> tuple:
        """The feature's stored `stats` (max_activation, mean_activation, density, active_sample), from one
        registry read; 400 on `param` naming the first one unknown."""
        info = self.registry.get_feature(record.id, index)
        values = tuple(getattr(info, stat) for stat in stats)
        for stat, value in zip(stats, values, strict=True):
            if value is None:
                what = stat.replace("_", " ")
                raise invalid(
                    param,
                    f"feature {index} of SAE {record.id!r} has no recorded {what}" + (how and f": {how}"),
                )
        return values

    def gate(self, cond: it.Condition, param: str) -> Gate:
        """A `when` gate or a `stop_when` entry (a stop's `latch` is refused by its model)."""
        record, index = self.sae(cond.feature, f"{param}.feature")
        bounds = {
            k: self.number(getattr(cond, k), f"{param}.{k}")
            for k in ("above", "below")
            if getattr(cond, k) is not None
        }
        if bounds.keys() == {"above", "below"} and bounds["above"] >= bounds["below"]:
            raise invalid(
                f"{param}.below", f"below {bounds['below']:g} must exceed above {bounds['above']:g}"
            )
        return Gate(SAERef(record.id, record.uid), index, record.site, latch=cond.latch, **bounds)

    # -- interventions: one builder per item type -----------------------------------------------
    def intervention(self, item: it.SteeringItem, param: str) -> list[Intervention]:
        out = _BUILDERS[type(item)](self, item, param)
        if item.when is None:
            return out
        gate = self.gate(item.when, f"{param}.when")
        for iv in out:
            if gate.site > iv.site:
                raise invalid(
                    f"{param}.when.feature",
                    f"the gate is read at {gate.site.hook_name}, after the intervention's site "
                    f"{iv.site.hook_name}; a gate must be read at or before the site it controls",
                )
        return [replace(iv, gate=gate) for iv in out]

    def feature_common(self, item, param: str) -> tuple[object, dict]:
        record, index = self.sae(item.feature, f"{param}.feature")
        sae = SAERef(record.id, record.uid)
        return record, dict(site=record.site, positions=item.positions, sae=sae, index=index, source=param)

    def feature_add(self, item: it.FeatureAddItem, param: str) -> list[Intervention]:
        record, common = self.feature_common(item, param)
        max_act = None
        if item.scale is AddScale.MAX_ACTIVATION:
            (max_act,) = self.recorded(record, common["index"], ("max_activation",), f"{param}.scale")
        strength = self.number(item.strength, f"{param}.strength")
        return [FeatureAdd(strength=strength, scale=item.scale, max_activation=max_act, **common)]

    def feature_clamp(self, item: it.FeatureClampItem, param: str) -> list[Intervention]:
        _, common = self.feature_common(item, param)
        return [FeatureClamp(value=self.number(item.value, f"{param}.value"), **common)]

    def feature_scale(self, item: it.FeatureScaleItem, param: str) -> list[Intervention]:
        _, common = self.feature_common(item, param)
        return [FeatureScale(value=self.number(item.factor, f"{param}.factor"), **common)]

    def feature_ablate(self, item: it.FeatureAblateItem, param: str) -> list[Intervention]:
        record, common = self.feature_common(item, param)
        how = f'compute them with `steerserve registry stats {record.id}`, or use "to": "zero"'
        if item.to == "resample":
            stats = ("density", "active_sample")
            density, sample = self.recorded(record, common["index"], stats, f"{param}.to", how)
            if density > 0 and not sample:
                raise invalid(
                    f"{param}.to",
                    f"feature {common['index']} of SAE {record.id!r} has density {density:g} but no "
                    f"recorded active activations to draw from: {how}",
                )
            return [FeatureResample(density=density, sample=tuple(sample), **common)]
        value = 0.0
        if item.to == "mean":
            (value,) = self.recorded(record, common["index"], ("mean_activation",), f"{param}.to", how)
        return [FeatureAblate(value=value, **common)]

    def vector(self, item, param: str) -> tuple[dict, list[Site]]:
        """What every vector intervention shares (vector, positions, source), and its sites."""
        try:
            record = self.registry.get_vector(item.vector)
        except NotFound:
            raise SteeringError(
                404,
                f"{param}.vector: vector {item.vector!r} does not exist",
                f"{param}.vector",
                "vector_not_found",
            ) from None
        if record.d != self.info.d_model:
            raise invalid(
                f"{param}.vector",
                f"vector {item.vector!r} has d {record.d}; the model has d_model {self.info.d_model}",
            )
        sites: list[Site] = sorted(record.norms)
        for site in sites:
            try:
                self.info.check_site(site)
            except SiteError as exc:
                raise invalid(
                    f"{param}.vector", f"vector {item.vector!r} acts at {site.hook_name}: {exc}"
                ) from None
        if not isinstance(item, it.VectorAddItem) and any(record.norms[s] == 0.0 for s in sites):
            raise invalid(f"{param}.vector", f"vector {item.vector!r} is zero at a site: it has no direction")
        vector = VectorRef(record.id, record.uid)
        return dict(positions=item.positions, vector=vector, source=param), sites

    def vector_add(self, item: it.VectorAddItem, param: str) -> list[Intervention]:
        common, sites = self.vector(item, param)
        strength = self.number(item.strength, f"{param}.strength")
        return [VectorAdd(site=s, strength=strength, **common) for s in sites]

    def vector_project_out(self, item: it.VectorProjectOutItem, param: str) -> list[Intervention]:
        common, sites = self.vector(item, param)
        if item.to != "resample":
            return [VectorProject(site=s, lo=0.0, hi=0.0, **common) for s in sites]
        stats = self.registry.get_vector_stats(item.vector)
        missing = [s.hook_name for s in sites if not stats.get(s)]
        if missing:
            raise invalid(
                f"{param}.to",
                f"vector {item.vector!r} has no recorded projection distribution at {', '.join(missing)}: "
                f'compute it with `steerserve registry stats {item.vector}`, or use "to": "zero"',
            )
        return [VectorResample(site=s, sample=tuple(stats[s]), **common) for s in sites]

    def vector_clamp(self, item: it.VectorClampItem, param: str) -> list[Intervention]:
        common, sites = self.vector(item, param)
        lo, hi = self.number(item.min, f"{param}.min"), self.number(item.max, f"{param}.max")
        if lo > hi:
            raise invalid(f"{param}.min", f"min {lo:g} is above max {hi:g}")
        return [VectorProject(site=s, lo=lo, hi=hi, **common) for s in sites]

    # -- the rest -------------------------------------------------------------------------------
    def logit_bias(self, item: it.LogitBiasItem, param: str) -> LogitBiasTerm:
        record, index = self.sae(item.feature, f"{param}.feature")
        strength = self.number(item.strength, f"{param}.strength")
        return LogitBiasTerm(SAERef(record.id, record.uid), index, strength, param)

    def items(self, fields: it.SteeringFields, prefix: str = "") -> tuple[list, list, list]:
        """(interventions, logit bias terms, stop conditions) of a request's or a variant's fields."""
        interventions = [
            iv
            for i, item in enumerate(fields.steering or [])
            for iv in self.intervention(item, f"{prefix}steering[{i}]")
        ]
        terms = [
            self.logit_bias(item, f"{prefix}feature_logit_bias[{i}]")
            for i, item in enumerate(fields.feature_logit_bias or [])
        ]
        stops = [self.gate(item, f"{prefix}stop_when[{i}]") for i, item in enumerate(fields.stop_when or [])]
        return interventions, terms, stops


# item type -> its builder: a new mode is one model in items.py, one builder here
_BUILDERS: dict[type, Callable[[_Compiler, object, str], list[Intervention]]] = {
    it.FeatureAddItem: _Compiler.feature_add,
    it.FeatureClampItem: _Compiler.feature_clamp,
    it.FeatureScaleItem: _Compiler.feature_scale,
    it.FeatureAblateItem: _Compiler.feature_ablate,
    it.VectorAddItem: _Compiler.vector_add,
    it.VectorProjectOutItem: _Compiler.vector_project_out,
    it.VectorClampItem: _Compiler.vector_clamp,
}


def compile_steering(
    registry: Registry,
    info: ModelInfo,
    limits: SteeringConfig,
    steering: Sequence[it.SteeringItem | dict] | None,
    feature_logit_bias: Sequence[it.LogitBiasItem | dict] | None,
    variant: str | None,
    stop_when: Sequence[it.StopCondition | dict] | None = None,
    sae_weights: SAEWeightsOf | None = None,
) -> SteeringSpec | None:
    """The request's SteeringSpec (the variant's items first, then the request's); None when empty.
    Items may be parsed already (the request's, from the edge) or plain JSON, parsed here.

    `sae_weights(ref)` gives an SAE's weights for the float32 checks (steering/bounds.py): the engine's
    device cache, which the row needs anyway; by default the registry's copy."""
    c = _Compiler(registry, info, limits)
    interventions, terms, stops = [], [], []
    if variant is not None:
        try:
            stored = registry.get_variant(variant).spec
        except NotFound:
            raise SteeringError(
                404, f"variant {variant!r} does not exist", "variant", "variant_not_found"
            ) from None
        prefix = f"variant:{variant}."
        interventions, terms, stops = c.items(it.parse(stored, prefix), prefix)
    fields = {"steering": steering, "feature_logit_bias": feature_logit_bias, "stop_when": stop_when}
    more = c.items(it.parse(fields))
    interventions, terms, stops = interventions + more[0], terms + more[1], stops + more[2]
    if len(interventions) > limits.max_interventions:
        raise invalid(
            "steering",
            f"{len(interventions)} interventions (after expanding vectors per site); at most {limits.max_interventions}",
        )
    if len(terms) > limits.max_logit_bias_features:
        raise invalid(
            "feature_logit_bias", f"{len(terms)} features; at most {limits.max_logit_bias_features}"
        )
    if not interventions and not terms and not stops:
        return None
    spec = SteeringSpec.build(interventions, terms, variant, stops)
    if len(spec.gates()) > limits.max_gates:
        raise invalid(
            "stop_when" if len(stops) > limits.max_gates else "steering",
            f"{len(spec.gates())} distinct gates and stop conditions; at most {limits.max_gates}",
        )
    check_caps(spec, limits)
    check_finite(spec, registry, sae_weights)
    return spec
