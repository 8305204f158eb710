"""Request JSON (`steering`, `feature_logit_bias`, `variant`) -> a validated SteeringSpec.

Every check that needs the registry or the model happens here, so nothing invalid reaches the device:
SAE / vector / variant exist (404), fit the served model (d_in, site), feature index < d_sae, numbers
finite and within caps, `scale: max_activation` only where the feature has one. Errors name the
offending field: `steering[2].feature.index`. Blocking (registry reads): call it from a thread.
"""

from __future__ import annotations

import math
from dataclasses import replace

from steerserve.api.errors import APIError
from steerserve.config import SteeringConfig
from steerserve.engine.types import ModelInfo
from steerserve.registry import NotFound, Registry
from steerserve.sites import Site, SiteError
from steerserve.steering.bounds import SAEWeightsOf, check_caps, check_finite
from steerserve.steering.spec import POSITIONS, Gate, Intervention, LogitBiasTerm, SAERef, SteeringSpec


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_steering")


class _Compiler:
    def __init__(self, registry: Registry, info: ModelInfo, limits: SteeringConfig):
        self.registry = registry
        self.info = info
        self.limits = limits
        self._saes: dict[str, object] = {}

    # -- shared pieces ------------------------------------------------------------------------
    def number(self, item: dict, key: str, param: str, default=None, lo=None) -> float:
        value = item.get(key, default)
        if value is None:
            raise _bad(f"{param}.{key}", "is required")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(f"{param}.{key}", f"must be a number, got {value!r}")
        cap = self.limits.max_abs_value
        if isinstance(value, int) and abs(value) > cap:  # NOTE: float() raises past 1e308
            value = math.inf
        value = float(value)
        if not math.isfinite(value) or abs(value) > cap:
            raise _bad(f"{param}.{key}", f"must be finite with |value| <= {cap:g}, got {value!r}")
        if lo is not None and value < lo:
            raise _bad(f"{param}.{key}", f"must be >= {lo:g}, got {value!r}")
        return value

    def sae(self, ref: object, param: str) -> tuple[object, int]:
        if not isinstance(ref, dict) or not isinstance(ref.get("sae"), str):
            raise _bad(param, 'must be {"sae": "<sae id>", "index": <int>}')
        sae_id, index = ref["sae"], ref.get("index")
        if sae_id not in self._saes:
            try:
                record = self.registry.get_sae(sae_id)
            except NotFound:
                raise APIError(
                    404, f"{param}.sae: SAE {sae_id!r} does not exist", f"{param}.sae", "sae_not_found"
                ) from None
            if record.d_in != self.info.d_model:
                raise _bad(
                    f"{param}.sae",
                    f"SAE {sae_id!r} has d_in {record.d_in}; the model has d_model {self.info.d_model}",
                )
            try:
                self.info.check_site(record.site)
            except SiteError as exc:
                raise _bad(f"{param}.sae", f"SAE {sae_id!r} acts at {record.site.hook_name}: {exc}") from None
            self._saes[sae_id] = record
        record = self._saes[sae_id]
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < record.d_sae:
            raise _bad(
                f"{param}.index",
                f"must be an integer in [0, {record.d_sae}) for SAE {sae_id!r}, got {index!r}",
            )
        return record, index

    def positions(self, item: dict, param: str) -> str:
        pos = item.get("positions", "all")
        if pos not in POSITIONS:
            raise _bad(f"{param}.positions", f"must be one of {', '.join(POSITIONS)}, got {pos!r}")
        return pos

    # -- interventions ------------------------------------------------------------------------
    def intervention(self, item: object, param: str) -> list[Intervention]:
        if not isinstance(item, dict):
            raise _bad(param, "must be an object")
        has_feature, has_vector = "feature" in item, "vector" in item
        if has_feature == has_vector:
            raise _bad(param, 'needs exactly one of "feature" or "vector"')
        mode = item.get("mode")
        if has_feature:
            out = [self.feature_intervention(item, mode, param)]
        else:
            out = self.vector_interventions(item, mode, param)
        if item.get("when") is None:
            return out
        gate = self.gate(item["when"], f"{param}.when", allow_latch=True)
        for iv in out:
            if gate.site > iv.site:
                raise _bad(
                    f"{param}.when.feature",
                    f"the gate is read at {gate.site.hook_name}, after the intervention's site "
                    f"{iv.site.hook_name}; a gate must be read at or before the site it controls",
                )
        return [replace(iv, gate=gate) for iv in out]

    def gate(self, item: object, param: str, allow_latch: bool) -> Gate:
        """`{"feature": FeatureRef, "above": x, "below": y, "latch": bool}`: at least one bound."""
        if not isinstance(item, dict):
            raise _bad(param, 'must be {"feature": {...}, "above": float} (or "below")')
        record, index = self.sae(item.get("feature"), f"{param}.feature")
        bounds = {k: self.number(item, k, param) for k in ("above", "below") if item.get(k) is not None}
        if not bounds:
            raise _bad(param, 'needs "above" or "below" (or both)')
        if bounds.keys() == {"above", "below"} and bounds["above"] >= bounds["below"]:
            raise _bad(f"{param}.below", f"below {bounds['below']:g} must exceed above {bounds['above']:g}")
        latch = item.get("latch", False)
        if not isinstance(latch, bool):
            raise _bad(f"{param}.latch", f"must be true or false, got {latch!r}")
        if latch and not allow_latch:
            raise _bad(f"{param}.latch", "is not allowed here: a stop condition ends the generation")
        return Gate(SAERef(record.id, record.uid), index, record.site, latch=latch, **bounds)

    def recorded(self, record, index: int, stat: str, param: str, how: str = "") -> float:
        """The feature's stored `stat` (max_activation, mean_activation); 400 on `param` when unknown."""
        value = getattr(self.registry.get_feature(record.id, index), stat)
        if value is None:
            what = stat.replace("_", " ")
            raise _bad(
                param, f"feature {index} of SAE {record.id!r} has no recorded {what}" + (how and f": {how}")
            )
        return value

    def feature_intervention(self, item: dict, mode: object, param: str) -> Intervention:
        record, index = self.sae(item["feature"], f"{param}.feature")
        common = dict(
            site=record.site,
            positions=self.positions(item, param),
            sae=SAERef(record.id, record.uid),
            index=index,
            source=param,
        )
        if mode == "add":
            scale = item.get("scale", "raw")
            if scale not in ("raw", "unit", "max_activation"):
                raise _bad(f"{param}.scale", f"must be raw, unit or max_activation, got {scale!r}")
            max_act = None
            if scale == "max_activation":
                max_act = self.recorded(record, index, "max_activation", f"{param}.scale")
            return Intervention(
                "feature_add",
                value=self.number(item, "strength", param),
                scale=scale,
                max_activation=max_act,
                **common,
            )
        if mode == "clamp":
            return Intervention("feature_clamp", value=self.number(item, "value", param), **common)
        if mode == "scale":
            return Intervention("feature_scale", value=self.number(item, "factor", param), **common)
        if mode == "ablate":
            to = item.get("to", "zero")
            if to == "mean":
                how = f'compute them with `steerserve registry stats {record.id}`, or use "to": "zero"'
                mean = self.recorded(record, index, "mean_activation", f"{param}.to", how)
                return Intervention("feature_ablate", value=mean, **common)
            if to not in ("zero", 0, 0.0):
                raise _bad(f"{param}.to", f'must be "zero" or "mean", got {to!r}')
            return Intervention("feature_ablate", value=0.0, **common)
        raise _bad(f"{param}.mode", f"must be add, clamp, scale or ablate for a feature, got {mode!r}")

    def vector_interventions(self, item: dict, mode: object, param: str) -> list[Intervention]:
        vector_id = item["vector"]
        if not isinstance(vector_id, str):
            raise _bad(f"{param}.vector", f"must be a vector id, got {vector_id!r}")
        try:
            record = self.registry.get_vector(vector_id)
        except NotFound:
            raise APIError(
                404,
                f"{param}.vector: vector {vector_id!r} does not exist",
                f"{param}.vector",
                "vector_not_found",
            ) from None
        if record.d != self.info.d_model:
            raise _bad(
                f"{param}.vector",
                f"vector {vector_id!r} has d {record.d}; the model has d_model {self.info.d_model}",
            )
        sites: list[Site] = sorted(record.norms)
        for site in sites:
            try:
                self.info.check_site(site)
            except SiteError as exc:
                raise _bad(
                    f"{param}.vector", f"vector {vector_id!r} acts at {site.hook_name}: {exc}"
                ) from None
        positions = self.positions(item, param)
        common = dict(positions=positions, vector_id=record.id, vector_uid=record.uid, source=param)
        if mode == "add":
            strength = self.number(item, "strength", param)
            return [Intervention("vector_add", site=s, value=strength, **common) for s in sites]
        if mode in ("project_out", "clamp"):
            if any(record.norms[s] == 0.0 for s in sites):
                raise _bad(f"{param}.vector", f"vector {vector_id!r} is zero at a site: it has no direction")
            lo = hi = 0.0
            if mode == "clamp":
                lo, hi = self.number(item, "min", param), self.number(item, "max", param)
                if lo > hi:
                    raise _bad(f"{param}.min", f"min {lo:g} is above max {hi:g}")
            return [Intervention("vector_project", site=s, lo=lo, hi=hi, **common) for s in sites]
        raise _bad(f"{param}.mode", f"must be add, project_out or clamp for a vector, got {mode!r}")

    def logit_bias(self, item: object, param: str) -> LogitBiasTerm:
        if not isinstance(item, dict):
            raise _bad(param, 'must be {"feature": {...}, "strength": float}')
        record, index = self.sae(item.get("feature"), f"{param}.feature")
        return LogitBiasTerm(
            SAERef(record.id, record.uid), index, self.number(item, "strength", param), param
        )

    def items(self, body: dict, prefix: str = "") -> tuple[list, list, list]:
        """(interventions, logit bias terms, stop conditions) of a request or variant body."""
        for key in ("steering", "feature_logit_bias", "stop_when"):
            if body.get(key) is not None and not isinstance(body[key], list):
                raise _bad(f"{prefix}{key}", "must be a list")
        interventions = [
            iv
            for i, item in enumerate(body.get("steering") or [])
            for iv in self.intervention(item, f"{prefix}steering[{i}]")
        ]
        terms = [
            self.logit_bias(item, f"{prefix}feature_logit_bias[{i}]")
            for i, item in enumerate(body.get("feature_logit_bias") or [])
        ]
        stops = [
            self.gate(item, f"{prefix}stop_when[{i}]", allow_latch=False)
            for i, item in enumerate(body.get("stop_when") or [])
        ]
        return interventions, terms, stops


def compile_steering(
    registry: Registry,
    info: ModelInfo,
    limits: SteeringConfig,
    steering: list | None,
    feature_logit_bias: list | None,
    variant: str | None,
    stop_when: list | None = None,
    sae_weights: SAEWeightsOf | None = None,
) -> SteeringSpec | None:
    """The request's SteeringSpec (the variant's items first, then the request's); None when empty.

    `sae_weights(ref)` gives an SAE's weights for the float32 checks (steering/bounds.py): the engine's
    device cache, which the row needs anyway; by default the registry's copy."""
    c = _Compiler(registry, info, limits)
    interventions, terms, stops = [], [], []
    if variant is not None:
        try:
            spec = registry.get_variant(variant).spec
        except NotFound:
            raise APIError(
                404, f"variant {variant!r} does not exist", "variant", "variant_not_found"
            ) from None
        interventions, terms, stops = c.items(spec, f"variant:{variant}.")
    more = c.items({"steering": steering, "feature_logit_bias": feature_logit_bias, "stop_when": stop_when})
    interventions, terms, stops = interventions + more[0], terms + more[1], stops + more[2]
    if len(interventions) > limits.max_interventions:
        raise _bad(
            "steering",
            f"{len(interventions)} interventions (after expanding vectors per site); at most {limits.max_interventions}",
        )
    if len(terms) > limits.max_logit_bias_features:
        raise _bad("feature_logit_bias", f"{len(terms)} features; at most {limits.max_logit_bias_features}")
    if not interventions and not terms and not stops:
        return None
    spec = SteeringSpec.build(interventions, terms, variant, stops)
    if len(spec.gates()) > limits.max_gates:
        raise _bad(
            "stop_when" if len(stops) > limits.max_gates else "steering",
            f"{len(spec.gates())} distinct gates and stop conditions; at most {limits.max_gates}",
        )
    check_caps(spec, limits)
    check_finite(spec, registry, sae_weights)
    return spec
