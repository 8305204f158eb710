"""Feature registry: SAEs, their features, steering vectors and variants, stored once, addressed by id.

`Registry` is the facade (metadata in SQLite or PostgreSQL, weights as content-addressed safetensors
blobs on disk or in an S3-compatible bucket: `blobs`, `blobs_s3`); `formats` turns SAELens / Gemma Scope / sparsify / control-vector files into `SAEWeights`
and `SteeringVector`; `cli` adds `steerserve registry import|list|rm`. Storage only: it imports
nothing from the engine, the runner or the API (the runner keeps its own device copies).
"""

from steerserve.registry.errors import Conflict, InvalidInput, NotFound, RegistryError, TooLarge
from steerserve.registry.records import FeatureHit, FeatureInfo, SAERecord, VariantRecord, VectorRecord
from steerserve.registry.registry import Registry
from steerserve.registry.sae import SAEWeights
from steerserve.registry.samples import ACTIVE_SAMPLE_SIZE, SAMPLE_SIZE
from steerserve.registry.vector import SteeringVector

__all__ = [
    "ACTIVE_SAMPLE_SIZE",
    "Conflict",
    "FeatureHit",
    "FeatureInfo",
    "InvalidInput",
    "NotFound",
    "Registry",
    "RegistryError",
    "SAMPLE_SIZE",
    "SAERecord",
    "SAEWeights",
    "SteeringVector",
    "TooLarge",
    "VariantRecord",
    "VectorRecord",
]
