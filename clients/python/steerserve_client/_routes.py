"""Every route of API.md as one method, written once for both clients.

Each method builds a `Call` (method, path, body, how to parse the answer) and hands it to
`self._send` (one answer) or `self._stream` (SSE events). `Client` executes calls synchronously;
`AsyncClient` returns coroutines of the same results. Generation methods take the sampling and
steering fields of API.md as keyword arguments (`None` = the server's default, not sent); anything
else goes through `**extra` unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any
from urllib.parse import quote

from steerserve_client import payloads
from steerserve_client._http import Call
from steerserve_client.steering import to_json_list

_STEERING_FIELDS = ("steering", "feature_logit_bias", "stop_when")


def _path(*parts: str | int) -> str:
    return "/" + "/".join(quote(str(p), safe="") if i else str(p) for i, p in enumerate(parts))


def _data(response) -> Any:
    return response.json()["data"]


def _text(response) -> str:
    return response.text


def body_of(fields: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Request JSON: fields that are not None, builders rendered to JSON, then `extra` on top."""
    body: dict[str, Any] = {}
    for name, value in fields.items():
        if value is None:
            continue
        body[name] = to_json_list(value) if name in _STEERING_FIELDS else value
    for name, value in extra.items():
        body[name] = to_json_list(value) if name in _STEERING_FIELDS and value is not None else value
    return body


def _messages(messages: str | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return [dict(m) for m in messages]


def _pairs(pairs: Iterable[Any]) -> list[dict[str, str]]:
    out = []
    for pair in pairs:
        if isinstance(pair, Mapping):
            out.append({"positive": pair["positive"], "negative": pair["negative"]})
        else:
            positive, negative = pair
            out.append({"positive": positive, "negative": negative})
    return out


class Routes:
    """The route methods; subclasses provide `_send(call)` and `_stream(call)`."""

    def _send(self, call: Call) -> Any:  # pragma: no cover - provided by the transports
        raise NotImplementedError

    def _stream(self, call: Call) -> Any:  # pragma: no cover
        raise NotImplementedError

    # ---- service ----------------------------------------------------------------------------------

    def health(self):
        """`GET /health`: `{"status": "ok"}`; ServiceUnavailableError (not retried) while loading."""
        return self._send(Call("GET", "/health", retry=False))

    def metrics(self):
        """`GET /metrics`: Prometheus text."""
        return self._send(Call("GET", "/metrics", parse=_text))

    def models(self):
        """`GET /v1/models`: the base model and one `<model>:<variant>` entry per stored variant."""
        return self._send(Call("GET", "/v1/models", parse=_data))

    # ---- generation -------------------------------------------------------------------------------

    def _generation(self, path: str, body: dict[str, Any], stream: bool, include_usage: bool | None):
        if stream:
            body["stream"] = True
            if include_usage is not None:
                body["stream_options"] = {"include_usage": include_usage}
            return self._stream(Call("POST", path, json=body))
        return self._send(Call("POST", path, json=body))

    def generate(self, prompt: str | Sequence[int], *, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 min_p: float | None = None, n: int | None = None, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, logprobs: int | None = None,
                 steering: Iterable[Any] | None = None, feature_logit_bias: Iterable[Any] | None = None,
                 variant: str | None = None, return_unsteered: bool | None = None, stop_when: Iterable[Any] | None = None,
                 **extra: Any):  # fmt: skip
        """`POST /generate` -> `GenerateResponse` (text, token_ids, finish_reason, usage)."""
        fields = dict(locals())
        del fields["self"], fields["extra"]
        return self._generation("/generate", body_of(fields, extra), False, None)

    def generate_stream(self, prompt: str | Sequence[int], **kwargs: Any):
        """Streamed `/generate`: an iterator of `GenerateEvent`s (`{"token_id", "text"}`, then the final
        one with `finish_reason` and `usage`). Takes `generate`'s keyword arguments."""
        return self._generation("/generate", body_of({"prompt": prompt}, kwargs), True, None)

    def completions(self, prompt: str | Sequence[str] | Sequence[int], *, model: str | None = None,
                    max_tokens: int | None = None, temperature: float | None = None,
                    top_p: float | None = None, top_k: int | None = None, n: int | None = None,
                    seed: int | None = None, stop: str | Sequence[str] | None = None,
                    logprobs: int | None = None, steering: Iterable[Any] | None = None,
                    feature_logit_bias: Iterable[Any] | None = None, variant: str | None = None,
                    return_unsteered: bool | None = None, stop_when: Iterable[Any] | None = None,
                 **extra: Any):  # fmt: skip
        """`POST /v1/completions` -> the OpenAI completion object (a dict)."""
        fields = dict(locals())
        del fields["self"], fields["extra"]
        return self._generation("/v1/completions", body_of(fields, extra), False, None)

    def completions_stream(self, prompt: str | Sequence[str] | Sequence[int], *,
                           include_usage: bool | None = None, **kwargs: Any):  # fmt: skip
        """Streamed `/v1/completions`: an iterator of OpenAI completion chunks (dicts)."""
        body = body_of({"prompt": prompt}, kwargs)
        return self._generation("/v1/completions", body, True, include_usage)

    def chat(self, messages: str | Sequence[Mapping[str, Any]], *, model: str | None = None,
             max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
             top_k: int | None = None, n: int | None = None, seed: int | None = None,
             stop: str | Sequence[str] | None = None, steering: Iterable[Any] | None = None,
             feature_logit_bias: Iterable[Any] | None = None, variant: str | None = None,
             return_unsteered: bool | None = None, stop_when: Iterable[Any] | None = None,
                 **extra: Any):  # fmt: skip
        """`POST /v1/chat/completions` -> the OpenAI chat completion object (a dict).
        `messages` may be a plain string: one user message."""
        fields = dict(locals())
        del fields["self"], fields["extra"]
        fields["messages"] = _messages(messages)
        return self._generation("/v1/chat/completions", body_of(fields, extra), False, None)

    def chat_stream(self, messages: str | Sequence[Mapping[str, Any]], *,
                    include_usage: bool | None = None, **kwargs: Any):  # fmt: skip
        """Streamed `/v1/chat/completions`: an iterator of chat completion chunks (dicts)."""
        body = body_of({"messages": _messages(messages)}, kwargs)
        return self._generation("/v1/chat/completions", body, True, include_usage)

    # ---- SAEs and their features ------------------------------------------------------------------

    def upload_sae(self, source: payloads.PathLike | None = None, *,
                   cfg: payloads.PathLike | Mapping[str, Any] | None = None,
                   weights: payloads.PathLike | bytes | IO[bytes] | Mapping[str, Any] | None = None,
                   id: str | None = None, layer: int | None = None, site: str | None = None):  # fmt: skip
        """`POST /v1/saes` -> `SAEInfo`. Give a folder (SAELens cfg.json + sae_weights.safetensors,
        sparsify, or a Gemma Scope params.npz) or a weights file; or `cfg` (dict or path) and `weights`
        (path, bytes, or `{name: array}` written as safetensors). `layer`/`site` override the cfg's."""
        upload = payloads.sae_upload(source, cfg, weights, id, layer, site)
        return self._send(Call("POST", "/v1/saes", upload=upload, admin=True))

    def list_saes(self, model: str | None = None):
        return self._send(Call("GET", "/v1/saes", params={"model": model} if model else None, parse=_data))

    def get_sae(self, sae_id: str):
        return self._send(Call("GET", _path("v1/saes", sae_id)))

    def delete_sae(self, sae_id: str):
        return self._send(Call("DELETE", _path("v1/saes", sae_id), admin=True))

    def put_features(self, sae_id: str, features: Any):
        """`PUT /v1/saes/{id}/features`: a list of `{"index", "label", "max_activation", "density"}`,
        a Neuronpedia export (object, JSON or JSONL bytes), or the path of such a file."""
        content = payloads.features_body(features)
        call = Call("PUT", _path("v1/saes", sae_id, "features"), content=content, admin=True,
                    headers={"Content-Type": "application/json"})  # fmt: skip
        return self._send(call)

    def get_feature(self, sae_id: str, index: int):
        """`GET /v1/saes/{id}/features/{index}` -> `FeatureInfo` (label, max activation, top logits)."""
        return self._send(Call("GET", _path("v1/saes", sae_id, "features", int(index))))

    def search_features(self, q: str, *, sae: str | None = None, limit: int | None = None):
        """`GET /v1/features/search` -> `[FeatureHit]`, best first."""
        params = {k: v for k, v in {"q": q, "sae": sae, "limit": limit}.items() if v is not None}
        return self._send(Call("GET", "/v1/features/search", params=params, parse=_data))

    def inspect(self, text: str, sae: str, *, top_k: int | None = None):
        """`POST /v1/inspect` -> per token of `text`, the SAE's most active features."""
        body = body_of({"text": text, "sae": sae, "top_k": top_k}, {})
        return self._send(Call("POST", "/v1/inspect", json=body))

    # ---- steering vectors -------------------------------------------------------------------------

    def upload_vector(self, vector: Any, *, id: str | None = None, layer: int | None = None,
                      site: str | Mapping[str, Any] | None = None, encoding: str = "json"):  # fmt: skip
        """`POST /v1/vectors` (JSON) -> `VectorInfo`. `vector`: floats or an array; `encoding="base64"`
        sends it as base64 of float32 (compact, exact for float32 data)."""
        body = payloads.vector_json(vector, id, layer, site, encoding)
        return self._send(Call("POST", "/v1/vectors", json=body, admin=True))

    def upload_vector_file(self, path: payloads.PathLike | bytes | IO[bytes], *, id: str | None = None,
                           layer: int | None = None, site: str | None = None, format: str | None = None,
                           filename: str | None = None):  # fmt: skip
        """`POST /v1/vectors` (multipart) from a safetensors, repeng / llama.cpp gguf, or JSON file."""
        upload = payloads.vector_file_upload(path, id, layer, site, format, filename)
        return self._send(Call("POST", "/v1/vectors", upload=upload, admin=True))

    def contrast_vector(self, id: str, pairs: Iterable[Any], *, layer: int | None = None,
                        site: str | Mapping[str, Any] | None = None):  # fmt: skip
        """`POST /v1/vectors/contrast`: the server computes and stores the mean-difference (CAA) vector
        of `pairs` (`(positive, negative)` tuples or `{"positive", "negative"}` dicts)."""
        body = body_of({"id": id, "layer": layer, "site": site, "pairs": _pairs(pairs)}, {})
        return self._send(Call("POST", "/v1/vectors/contrast", json=body, admin=True))

    def list_vectors(self):
        return self._send(Call("GET", "/v1/vectors", parse=_data))

    def get_vector(self, vector_id: str):
        return self._send(Call("GET", _path("v1/vectors", vector_id)))

    def delete_vector(self, vector_id: str):
        return self._send(Call("DELETE", _path("v1/vectors", vector_id), admin=True))

    # ---- variants ---------------------------------------------------------------------------------

    def create_variant(self, id: str, *, steering: Iterable[Any] | None = None,
                       feature_logit_bias: Iterable[Any] | None = None,
                       stop_when: Iterable[Any] | None = None, **extra: Any):  # fmt: skip
        """`POST /v1/variants` -> `VariantInfo`; then `model="<model>:<id>"` or `variant=id` uses it."""
        fields = {"id": id, "steering": steering, "feature_logit_bias": feature_logit_bias}
        body = body_of(fields | {"stop_when": stop_when}, extra)
        return self._send(Call("POST", "/v1/variants", json=body, admin=True))

    def list_variants(self):
        return self._send(Call("GET", "/v1/variants", parse=_data))

    def get_variant(self, variant_id: str):
        return self._send(Call("GET", _path("v1/variants", variant_id)))

    def delete_variant(self, variant_id: str):
        return self._send(Call("DELETE", _path("v1/variants", variant_id), admin=True))
