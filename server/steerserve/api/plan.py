"""Planning one generation call: model/variant resolution, steering compilation, and the fan-out of
prompts x n choices (plus unsteered twins) into GenerationRequests."""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass

from fastapi import Request

from steerserve.api.convert import bad, check_model, check_steering_counts, child_seed, sampling_params
from steerserve.api.errors import APIError
from steerserve.api.executors import GENERATION_POOL, run_in
from steerserve.api.features_json import FeatureLabels, token_features_json
from steerserve.api.protocol import SamplingFields
from steerserve.api.structured import GrammarRequest, compile_grammar
from steerserve.registry import NotFound
from steerserve.steering.compile import compile_steering
from steerserve.types.requests import FeatureCapture, FeatureStop, GenerationRequest
from steerserve.types.steering import Positions, SteeringSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallPlan:
    requests: list[GenerationRequest]
    num_steered: int  # choices [0, num_steered) carry the steering; the rest are unsteered twins
    steering: SteeringSpec | None
    labels: FeatureLabels | None = None  # set when the call asked for return_features
    tokenizer: object = None
    # what the runner's cache holds for this call (api/services.py: FeatureReadout.prepare): kept until
    # the call ends, so its steps read no registry and run with what was compiled
    pin: object = None

    def features(self, index: int, feats, output_ids) -> dict:
        """{"features": [...]} for choice `index` when the call captures features, else {}."""
        if self.labels is None:
            return {}
        prompt = self.requests[index].prompt_token_ids

        def token_at(pos: int) -> int | None:
            if pos < len(prompt):
                return prompt[pos]
            k = pos - len(prompt)
            return output_ids[k] if k < len(output_ids) else None

        return {"features": token_features_json(feats, token_at, self.labels)}

    def is_twin(self, index: int) -> bool:
        return self.steering is not None and index >= self.num_steered

    def choice_extra(self, index: int, feature_stop: FeatureStop | None = None) -> dict:
        """Extra keys of choice `index`: `steered` whenever the call carries steering, and the
        `stop_when` condition that ended it."""
        out = {} if self.steering is None else {"steered": not self.is_twin(index)}
        return out | self.stop_extra(feature_stop)

    def stop_extra(self, feature_stop: FeatureStop | None) -> dict:
        """`{"feature_stop": {feature, activation, position, token_id, token}}`, or {}."""
        if feature_stop is None:
            return {}
        token = self.tokenizer.decode([feature_stop.token_id]) if self.tokenizer is not None else None
        return {"feature_stop": feature_stop.to_json() | {"token": token}}

    def response_extra(self) -> dict:
        return {} if self.steering is None else {"steering": self.steering.summary()}


def feature_capture(
    registry, info, sae_id: str, top_k: int, positions: Positions, param: str = "return_features.sae"
) -> FeatureCapture:
    """A validated FeatureCapture of SAE `sae_id`; 404 for an unknown SAE."""
    try:
        record = registry.get_sae(sae_id)
    except NotFound:
        raise APIError(404, f"{param}: SAE {sae_id!r} does not exist", param, "sae_not_found") from None
    if (
        record.d_in != info.d_model
        or record.site.layer >= info.n_layers
        or record.site.hook not in info.hooks
    ):
        raise bad(f"{param}: SAE {sae_id!r} does not fit the served model", param)
    return FeatureCapture(record.id, record.uid, top_k, positions)


def load_call(state, spec: SteeringSpec | None, captures) -> object:
    """Load what a call's steps need into the runner's cache (FeatureReadout.prepare); hold the result
    until the call ends. A failure here (a blob gone from the store, ...) is left to the step that needs
    the item: it loads it again and ends only that request with the cause, as any admission failure."""
    try:
        return state.readout.prepare(spec, captures)
    except Exception as exc:  # NOTE: see the docstring
        logger.warning("could not preload steering resources: %s: %s", type(exc).__name__, exc)
        return None


async def prepare_call(state, spec: SteeringSpec | None, captures) -> object:
    """`load_call` on the generation pool."""
    return await run_in(GENERATION_POOL, load_call, state, spec, captures)


def _steers(body: SamplingFields, variant: str | None) -> bool:
    """Whether a call carries anything compile_steering turns into a spec."""
    return bool(body.steering or body.feature_logit_bias or body.stop_when or variant)


def compile_call(state, body: SamplingFields, variant: str | None) -> tuple:
    """(steering spec, feature capture, pin) of a generation call: compiled, checked and loaded in one
    task. NOTE: one, not three: the pool runs tasks in order, so in a burst the first call's load would
    otherwise queue behind every call's compile while the engine had nothing to run."""
    info = state.model_info
    spec = None
    if _steers(body, variant):
        spec = compile_steering(
            state.registry, info, state.config.steering, body.steering, body.feature_logit_bias,
            variant, body.stop_when, state.readout.sae_weights,
        )  # fmt: skip
    capture = None
    if body.return_features is not None:
        capture = feature_capture(
            state.registry, info, body.return_features.sae, body.return_features.top_k, Positions.GENERATED
        )
    pin = load_call(state, spec, [capture]) if spec is not None or capture is not None else None
    return spec, capture, pin


def resolve_variant(body: SamplingFields, model_name: str) -> str | None:
    """`model="<model>:<variant>"` or the `variant` field; both naming different variants is a 400."""
    from_model = None
    if body.model and body.model != model_name and body.model.startswith(model_name + ":"):
        from_model = body.model[len(model_name) + 1 :]
    if from_model and body.variant and from_model != body.variant:
        raise bad(f"model names variant {from_model!r} but variant is {body.variant!r}", "variant")
    return body.variant or from_model


def call_deadline(timeout: float | None, server_timeout: float | None, now: float) -> float | None:
    """time.monotonic() deadline of a call: its own `timeout`, never later than --request-timeout."""
    limits = [t for t in (timeout, server_timeout) if t is not None]
    return now + min(limits) if limits else None


async def plan_call(
    request: Request,
    body: SamplingFields,
    prompts: list[list[int]],
    max_tokens,
    logprobs,
    call_id: str,
    grammar: GrammarRequest | None = None,  # structured output (api/structured.py)
) -> CallPlan:
    state = request.app.state
    info = state.model_info
    variant = resolve_variant(body, info.name)
    check_model(body.model if variant is None or body.model == info.name else info.name, info)
    check_steering_counts(body, state.config.steering)
    if grammar is not None:  # before steering: a bad schema is the cheaper 400
        await compile_grammar(state, grammar)
    spec = capture = pin = None
    if _steers(body, variant) or body.return_features is not None:
        spec, capture, pin = await run_in(GENERATION_POOL, compile_call, state, body, variant)
    twins = body.return_unsteered and spec is not None
    seed = body.seed
    if twins and seed is None:  # the twin must draw the same random numbers as the steered choice
        seed = random.getrandbits(63)
    now = time.monotonic()
    deadline = call_deadline(body.timeout, state.config.admission.request_timeout_s, now)
    steered, unsteered = [], []
    for p, ids in enumerate(prompts):
        for i in range(body.n):
            index = p * body.n + i
            sp = sampling_params(
                body,
                prompt_len=len(ids),
                max_tokens=max_tokens,
                logprobs=logprobs,
                info=info,
                limits=state.config.limits,
                seed=child_seed(seed, index) if body.n > 1 else seed,
            )
            if grammar is not None:
                sp = dataclasses.replace(sp, grammar=grammar.spec)
            steered.append(
                GenerationRequest(f"{call_id}-{index}", tuple(ids), sp, spec, now, capture, deadline)
            )
            if twins:
                unsteered.append(
                    GenerationRequest(f"{call_id}-u{index}", tuple(ids), sp, None, now, capture, deadline)
                )
    labels = FeatureLabels(state.registry, capture.sae_id) if capture is not None else None
    return CallPlan(steered + unsteered, len(steered), spec, labels, state.tokenizer, pin)
