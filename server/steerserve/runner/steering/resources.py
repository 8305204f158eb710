"""What steering rows are built from: SAE weights and vectors on the device, and feature logit effects,
loaded on API threads so that a step reads no registry.

Two sides. `load(spec)` runs on an API thread once a request's steering is compiled: it makes every SAE
and vector the spec names resident (runner/steering/sae_cache.py, keyed by the stored uid) and fetches
the logit effects it needs from the registry's cache, remembering the ones that are not there. The step
side (`sae`, `vector`, `logit_effects`, called by runner/steering/rows.py and capture.py on the engine
thread) then finds everything in memory; a registry read there (an entry evicted for room between load
and step) still gives the right tensors and is counted in `step_misses`.

Pinning: `load` returns a `SteeringPin` that the caller holds for the life of the call. While it is
held, the uids it names stay servable even when their SAE or vector is deleted or replaced: a request
runs with exactly the tensors it was validated against (the uid), as a request already running does
(its row and its capture hold their tensors), instead of failing because its queue wait overlapped a
re-upload. A pin does not hold tensors against the byte budget (memory stays bounded); an unpinned or
evicted uid whose id was replaced meanwhile raises SteeringResourceError at admission, which fails only
that request.

A feature's direct logit effect is its decoder direction read out the way the model reads its residual
stream: through the final norm and the unembedding, `U(N(W_dec[f]) - N(0))` with U the unembedding
without bias (`lm_head(x) - lm_head(0)`). For LayerNorm that is `W_U (g * (d - mean d) / std d)`, for
RMSNorm `W_U (g * d / rms d)`: the logits that direction adds when it dominates the residual. Effects are
computed on the engine thread (the readout needs the model) once per (SAE, feature) and stored in the
registry's blob store by a background thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

from steerserve.registry import Registry, SAEWeights
from steerserve.runner.model_adapter import model_adapter
from steerserve.runner.steering.sae_cache import DeviceSAECache, DeviceVectorCache, SteeringResourceError
from steerserve.types.sites import Site
from steerserve.types.steering import SAERef, SteeringSpec, VectorAdd, VectorProject, VectorRef

__all__ = ["SteeringPin", "SteeringResourceError", "SteeringResources", "lower_thread_priority"]

logger = logging.getLogger(__name__)
_EFFECTS_IN_MEMORY = 4096  # feature logit effects kept on the device (V floats each)
_VECTOR_CACHE_BYTES = 256 << 20  # vectors are [d] per site: a 80-layer, d=8192 control vector is 2.6 MB
_ABSENT = object()  # an effect `load` found in no cache: the step computes it without asking the registry


def lower_thread_priority() -> None:
    """Run the calling thread at nice 19 (Linux: per thread), so that background cache writes take CPU
    only when the engine's threads leave some. NOTE: on a busy 2-core box, 128 logit-effect writes at
    normal priority slowed the concurrent GEMMs by 11-14%; at nice 19 by ~1%, finishing ~100 ms later."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class SteeringPin:
    """The uids a loaded spec runs with, kept servable until `release()` (or until the pin is dropped)."""

    def __init__(self, resources: SteeringResources, saes: list[str], vectors: list[str]):
        resources.saes.pin(saes)
        resources.vectors.pin(vectors)
        self._release = weakref.finalize(self, _unpin, resources.saes, resources.vectors, saes, vectors)

    def release(self) -> None:
        self._release()  # NOTE: once: a finalize runs at most once


def _unpin(saes: DeviceSAECache, vectors: DeviceVectorCache, sae_uids, vector_uids) -> None:
    saes.unpin(sae_uids)
    vectors.unpin(vector_uids)


class SteeringResources:
    def __init__(self, registry: Registry, model, device: torch.device, sae_cache_bytes: int):
        self.registry = registry
        self.model = model
        self.device = device
        self.saes = DeviceSAECache(registry, device, sae_cache_bytes, dtype=torch.float32)
        self.vectors = DeviceVectorCache(registry, device, _VECTOR_CACHE_BYTES)
        # (uid, index) -> [V], or _ABSENT: checked at load, in no cache
        self._effects: OrderedDict[tuple[str, int], object] = OrderedDict()
        # NOTE: the engine thread and API threads (load, top_logits) share the effects
        self._lock = threading.RLock()
        self._writer = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="steerserve-effects", initializer=lower_thread_priority
        )
        self.effect_hits = 0  # logit effects found in memory or the registry's cache (for metrics)
        self.effect_misses = 0  # logit effects computed
        self.step_misses = 0  # registry reads inside a step: what `load` had made resident was evicted

    def close(self) -> None:
        """Wait for the queued cache writes (they use the registry, which is closed next)."""
        self._writer.shutdown(wait=True)

    # -- API threads ----------------------------------------------------------------------------
    def load(self, spec: SteeringSpec | None, saes: Iterable[SAERef] = ()) -> SteeringPin:
        """Make resident what `spec` (and the SAEs `saes`, e.g. a capture's) needs in a step, and pin it.
        Raises as the step would (NotFound, SteeringResourceError, TooLarge)."""
        sae_refs = {ref.uid: ref for ref in saes}
        vector_refs: dict[str, VectorRef] = {}
        if spec is not None:
            for iv in spec.interventions:
                if isinstance(iv, VectorAdd | VectorProject):
                    vector_refs[iv.vector.uid] = iv.vector
                else:
                    sae_refs[iv.sae.uid] = iv.sae
            sae_refs |= {g.sae.uid: g.sae for g in spec.gates()}
            # an effect in no cache is computed in the step, from its SAE's decoder row
            sae_refs |= {r.uid: r for r in self._fetch_effects([(t.sae, t.index) for t in spec.logit_biases])}
        pin = SteeringPin(self, list(sae_refs), list(vector_refs))  # NOTE: before loading: a delete may come
        try:
            for ref in sae_refs.values():
                self.saes.get(ref)
            for ref in vector_refs.values():
                self.vectors.get(ref)
        except BaseException:
            pin.release()
            raise
        return pin

    def load_sae(self, ref: SAERef) -> SAEWeights:
        """`ref`'s weights on the device, loaded here when absent (not a step: no `step_misses`)."""
        return self.saes.get(ref)

    def _fetch_effects(self, features: list[tuple[SAERef, int]]) -> list[SAERef]:
        """Bring the registry's cached effects of `features` into memory; the SAEs of those it lacks."""
        lacking: dict[str, SAERef] = {}
        for ref, index in features:
            key = (ref.uid, index)
            with self._lock:
                have = self._effects.get(key)
                if have is not None:
                    self._effects.move_to_end(key)
                    if have is _ABSENT:
                        lacking[ref.uid] = ref
                    continue
            cached = self.registry.get_cached(_effect_key(ref.uid, index))  # NOTE: outside the lock
            effect = _ABSENT if cached is None else cached["effect"].to(self.device, torch.float32)
            with self._lock:
                if self._effects.get(key, _ABSENT) is _ABSENT:  # never over one computed meanwhile
                    self._remember(key, effect)
            if effect is _ABSENT:
                lacking[ref.uid] = ref
        return list(lacking.values())

    # -- the step (engine thread) ---------------------------------------------------------------
    def sae(self, ref: SAERef) -> SAEWeights:
        """The weights of exactly `ref` (callers hold them: registry changes later do not reach a request
        that holds them)."""
        weights = self.saes.lookup(ref.uid)
        if weights is None:
            self.step_misses += 1
            weights = self.saes.get(ref)
        return weights

    def vector(self, ref: VectorRef, site: Site) -> torch.Tensor:
        """[d] float32 on the device: vector `ref`'s direction at `site`."""
        directions = self.vectors.lookup(ref.uid)
        if directions is None:
            self.step_misses += 1
            directions = self.vectors.get(ref)
        return directions[site]

    @torch.inference_mode()
    def logit_effect(self, ref: SAERef, index: int) -> torch.Tensor:
        """[V] fp32: the logits feature `index` of SAE `ref` writes directly (memory, then blob cache)."""
        return self._effects_of([(ref, index)], in_step=False)[0]

    @torch.inference_mode()
    def logit_effects(self, features: list[tuple[SAERef, int]]) -> list[torch.Tensor]:
        """`logit_effect` of each feature, in a step; the ones found nowhere are computed in one readout.

        NOTE: a readout streams the whole unembedding (V x d) however few rows it reads out: one row
        cost ~8 ms on a GPT-2-small on this CPU, eight rows ~7 ms, so a burst of new specs is batched.
        """
        return self._effects_of(features, in_step=True)

    def _effects_of(self, features: list[tuple[SAERef, int]], in_step: bool) -> list[torch.Tensor]:
        with self._lock:
            found: dict[tuple[str, int], torch.Tensor] = {}
            missing: dict[tuple[str, int], SAERef] = {}
            for ref, index in features:
                key = (ref.uid, index)
                if key in found or key in missing:
                    continue
                effect = self._cached_effect(ref, index, in_step)
                if effect is None:
                    missing[key] = ref
                else:
                    found[key] = effect
            if missing:
                refs = {uid: ref for (uid, _), ref in missing.items()}
                weights = self.sae if in_step else self.load_sae
                saes = {uid: weights(ref) for uid, ref in refs.items()}  # NOTE: one lookup per SAE
                rows = torch.stack([saes[uid].W_dec[index] for uid, index in missing])
                for ((uid, index), ref), effect in zip(missing.items(), self.readout(rows), strict=True):
                    self.effect_misses += 1
                    found[(uid, index)] = self._remember((uid, index), effect)
                    # NOTE: the durable write (fsync'd blob + row) happens off the engine thread
                    key = _effect_key(uid, index)
                    self._writer.submit(self._store_effect, key, effect.cpu().contiguous(), ref.id)
            return [found[(ref.uid, index)] for ref, index in features]

    def _cached_effect(self, ref: SAERef, index: int, in_step: bool) -> torch.Tensor | None:
        """From memory, then (when `load` did not look) the registry's cache; None: compute it."""
        key = (ref.uid, index)
        effect = self._effects.get(key)
        if effect is _ABSENT:
            return None
        if effect is not None:
            self._effects.move_to_end(key)
            self.effect_hits += 1
            return effect
        if in_step:
            self.step_misses += 1
        cached = self.registry.get_cached(_effect_key(ref.uid, index))
        if cached is None:
            return None
        self.effect_hits += 1
        return self._remember(key, cached["effect"].to(self.device, torch.float32))

    def _remember(self, key: tuple[str, int], effect):
        self._effects[key] = effect
        self._effects.move_to_end(key)
        if len(self._effects) > _EFFECTS_IN_MEMORY:
            self._effects.popitem(last=False)
        return effect

    def _store_effect(self, key: str, effect: torch.Tensor, sae_id: str) -> None:
        try:
            self.registry.put_cached(key, {"effect": effect}, owner=f"sae:{sae_id}")
        except Exception:  # a cache write that fails costs a recompute later, nothing else
            logger.warning("could not cache logit effect %s", key, exc_info=True)

    def readout(self, directions: torch.Tensor) -> torch.Tensor:
        """[n, d] directions -> [n, V] logits through the final norm and the unembedding (no biases)."""
        return model_adapter(self.model).direct_logits(directions)


def _effect_key(uid: str, index: int) -> str:
    return f"logit_effect:{uid}:{index}"
