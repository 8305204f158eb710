"""Services: what the composition root (steerserve/compose.py) hands the API once the model is loaded.

The API sees the engine core and plain types; the model, the runner and its device state stay behind
`FeatureReadout` (interp/readout.py), a port the API names here without importing its implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from steerserve.engine.engine import EngineCore
from steerserve.metrics import EngineMetrics
from steerserve.registry import Registry, SAEWeights
from steerserve.types.grammar import GrammarSpec
from steerserve.types.model import ModelInfo
from steerserve.types.requests import FeatureCapture
from steerserve.types.steering import SAERef, SteeringSpec


class FeatureReadout(Protocol):
    def prepare(self, spec: SteeringSpec | None, captures: Iterable[FeatureCapture | None]) -> object:
        """Load what a call's steps need into the runner's cache; hold the result until the call ends."""

    def sae_weights(self, ref: SAERef) -> SAEWeights: ...

    def logit_effect(self, ref: SAERef, index: int) -> torch.Tensor: ...

    def promotion_scores(self, ref: SAERef, token_id: int) -> torch.Tensor: ...


class GrammarCompiler(Protocol):
    def compile(self, spec: GrammarSpec) -> object:
        """Compile `spec` into the runner's grammar cache (raises GrammarError); a blocking call."""


@dataclass
class Services:
    core: EngineCore
    info: ModelInfo
    tokenizer: Any
    metrics: EngineMetrics
    registry: Registry
    readout: FeatureReadout
    close: Callable[[], None]  # after the engine stopped: drain background writers, close the registry
    grammars: GrammarCompiler | None = None  # structured output; None: not served
