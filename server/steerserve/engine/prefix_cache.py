"""Prefix caching, the request side: which of a request's KV blocks may be shared, and under which hash.

A full block's KV is a function of the tokens up to its end and of the interventions that act at those
positions, nothing else (sampling, captures, gates' readings and logit biases do not write the residual
stream). So a block is keyed by (its parent's hash, its token ids, the steering that changes its KV):
- a block of prompt tokens only: the interventions acting on prompt positions (`positions` prompt or
  all), with their place in the spec; empty when there are none, so unsteered requests, requests
  steered on generated positions only and `return_unsteered` twins share. When one of them resamples,
  its draws depend on the request's key (its seed, runner/steering/resample.py): the seed joins the key,
  and an unseeded request never shares.
- a block holding a generated position: empty only when the request has no intervention at all; such
  blocks of a steered request are never shared (their KV depends on where the prompt ended).
When in doubt, nothing is shared: a key of None ends the request's chain of shareable blocks.

The block side (hash -> block table, reference counts, LRU eviction) is the allocator's (kv_cache.py).
"""

from __future__ import annotations

import hashlib
import json
from array import array

from steerserve.types.requests import FeatureCapture, GenerationRequest
from steerserve.types.steering import FeatureResample, Positions, SteeringSpec, VectorResample, canonical

ROOT = bytes(32)  # the parent hash of a request's first block
_RESAMPLES = (FeatureResample, VectorResample)


def steering_keys(spec: SteeringSpec | None, seed: int | None) -> tuple[bytes | None, bytes | None]:
    """(key of prompt-only blocks, key of blocks holding a generated position); b"" = unsteered KV,
    None = never shared."""
    if spec is None or not spec.interventions:
        return b"", b""
    acting = [(i, iv) for i, iv in enumerate(spec.interventions) if iv.positions != Positions.GENERATED]
    if not acting:
        return b"", None
    resamples = any(isinstance(iv, _RESAMPLES) for _, iv in acting)
    if resamples and seed is None:
        return None, None
    # NOTE: the intervention's index stays in the key: a resample draw depends on it, and the order of
    # edits at one site changes the result
    body = [[i, canonical(iv)] for i, iv in acting]  # canonical() names the kind
    if resamples:
        body.append(["seed", seed])
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).digest()
    return digest, None


def must_compute_prompt(request: GenerationRequest) -> bool:
    """True when the request needs something computed at its prompt positions besides the KV, so it may
    not skip them (it may still publish the blocks it computes): prompt logprobs (echo), captures at
    prompt positions, and gates or stop conditions (a latched gate's state builds up over the prompt)."""
    if request.sampling.prompt_logprobs is not None:
        return True
    cap = request.capture
    if cap is not None and not (isinstance(cap, FeatureCapture) and cap.positions == Positions.GENERATED):
        return True
    return request.steering is not None and bool(request.steering.gates())


def block_hash(parent: bytes, token_ids, key: bytes) -> bytes:
    """sha256 over (parent, key, token ids): fixed-width fields, so no two inputs share an encoding."""
    h = hashlib.sha256(parent)
    h.update(len(key).to_bytes(1, "little"))
    h.update(key)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def extend_hashes(state, block_size: int, num_tokens: int) -> None:
    """Append to `state.block_hashes` the hashes of its full blocks within its first `num_tokens` tokens
    not hashed yet; the chain stops at the first block whose key is None."""
    hashes, keys, n_prompt = state.block_hashes, state.cache_keys, state.num_prompt_tokens
    while (len(hashes) + 1) * block_size <= num_tokens:
        j = len(hashes)
        end = (j + 1) * block_size
        key = keys[0] if end <= n_prompt else keys[1]
        if key is None:
            return
        hashes.append(block_hash(hashes[-1] if hashes else ROOT, state.tokens(j * block_size, end), key))
