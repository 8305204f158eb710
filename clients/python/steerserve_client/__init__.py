"""steerserve-client: a small httpx client for steerserve's HTTP API (see API.md), sync and async.

    from steerserve_client import Client, Steering
    c = Client("http://localhost:8000")
    c.generate("Hello", max_tokens=8, steering=[Steering.feature("my-sae", 12).add(4.0)])

Public names: `Client`, `AsyncClient`, `Stream`, `AsyncStream`, `Steering` (+ the builder types
`Intervention`, `FeatureRef`, `VectorRef`, `FeatureLogitBias`), `RetryPolicy`, the exceptions of
`steerserve_client.errors`, and `safetensors_bytes` / `float32_base64` for payloads.
"""

from steerserve_client._http import RetryPolicy
from steerserve_client.async_client import AsyncClient, AsyncStream
from steerserve_client.client import Client, Stream
from steerserve_client.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestTooLargeError,
    ServiceUnavailableError,
    SteerServeError,
)
from steerserve_client.payloads import float32_base64, safetensors_bytes
from steerserve_client.steering import (
    Condition,
    FeatureLogitBias,
    FeatureRef,
    Intervention,
    Steering,
    VectorRef,
)

__version__ = "0.1.0"

__all__ = [
    "Condition",
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ConflictError",
    "FeatureLogitBias",
    "FeatureRef",
    "InternalServerError",
    "Intervention",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTooLargeError",
    "RetryPolicy",
    "ServiceUnavailableError",
    "Steering",
    "SteerServeError",
    "Stream",
    "VectorRef",
    "float32_base64",
    "safetensors_bytes",
]
