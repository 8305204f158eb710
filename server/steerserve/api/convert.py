"""Pydantic bodies -> engine dataclasses, with every bound check that depends on the model or config.

Nothing invalid gets past this module: each error is a 400 (404 for an unknown model) naming the
parameter, the value and the bound, so a bad request never reaches the device.
"""

from __future__ import annotations

from steerserve.api.errors import APIError
from steerserve.api.protocol import ChatMessage, CompletionRequest, SamplingFields
from steerserve.config import LimitsConfig
from steerserve.engine.tokenizer import ChatTemplateError, apply_chat_template, encode_prompt
from steerserve.types.model import ModelInfo
from steerserve.types.requests import SamplingParams


def bad(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def check_model(name: str | None, info: ModelInfo) -> None:
    if name is None or name == info.name:
        return
    raise APIError(
        404, f"model {name!r} does not exist: this server serves {info.name!r}", "model", "model_not_found"
    )


def check_token_ids(ids: list[int], info: ModelInfo, param: str) -> list[int]:
    for t in ids:
        if not 0 <= t < info.vocab_size:
            raise bad(f"{param}: token id {t} is out of range: ids must be in [0, {info.vocab_size})", param)
    return ids


def completion_prompts(
    body: CompletionRequest, tokenizer, info: ModelInfo, limits: LimitsConfig
) -> list[list[int]]:
    p = body.prompt
    if isinstance(p, list) and not p:
        raise bad("prompt must not be empty", "prompt")
    # NOTE: a list of strings or of id lists is several prompts: counted before any is encoded
    several = isinstance(p, list) and not isinstance(p[0], int)
    if several and len(p) > limits.max_prompts:
        raise bad(f"prompt: {len(p)} prompts in one request; at most {limits.max_prompts}", "prompt")
    if isinstance(p, str):
        prompts = [encode_prompt(tokenizer, p)]
    elif not several:
        prompts = [list(p)]
    else:
        prompts = [encode_prompt(tokenizer, x) if isinstance(x, str) else list(x) for x in p]
    for i, ids in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if not ids:
            raise bad(f"{param} must not be empty", param)
        check_token_ids(ids, info, param)
    return prompts


def encode_text(tokenizer, text: str, param: str) -> list[int]:
    """`text` as prompt token ids; 400 on `param` when it is empty or encodes to no token at all."""
    ids = encode_prompt(tokenizer, text) if text else []
    if not ids:
        raise bad(f"{param} must not be empty (it encodes to no token)", param)
    return ids


def chat_prompt(
    messages: list[ChatMessage],
    tokenizer,
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
) -> list[int]:
    """The chat's prompt ids (OpenAI content parts: the text ones); 400 on `messages` when the
    template renders them to no token at all (an empty message, only non-text parts)."""
    rendered = [_message(m) for m in messages]
    try:
        ids = apply_chat_template(tokenizer, rendered, add_generation_prompt, tools)
    except ChatTemplateError as exc:
        raise bad(str(exc), "messages", "chat_template_missing") from None
    if not ids:
        raise bad("messages render to an empty prompt: give some text content", "messages")
    return ids


def _message(m: ChatMessage) -> dict:
    """A message as chat templates take it; an assistant's tool calls and a tool's call id kept."""
    out = {"role": m.role, "content": m.text()}
    if m.tool_calls:
        out["tool_calls"] = m.tool_calls
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _stop_list(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def sampling_params(
    body: SamplingFields,
    *,
    prompt_len: int,
    max_tokens: int | None,
    logprobs: int | None,
    info: ModelInfo,
    limits: LimitsConfig,
    seed: int | None,
) -> SamplingParams:
    if limits.max_prompt_tokens is not None and prompt_len > limits.max_prompt_tokens:
        raise bad(
            f"prompt is {prompt_len} tokens; at most {limits.max_prompt_tokens} (max_prompt_tokens)",
            "prompt",
            "context_length_exceeded",
        )
    room = info.max_model_len - prompt_len
    if max_tokens == 0 and not (isinstance(body, CompletionRequest) and body.echo):
        # NOTE: as vLLM: 0 tokens is the scoring call (echo: the prompt's logprobs), else there is no output
        raise bad(
            "max_tokens=0 is only allowed with echo=true (score the prompt, generate nothing)", "max_tokens"
        )
    if room < 0 or (room == 0 and max_tokens != 0):
        raise bad(
            f"prompt is {prompt_len} tokens; the context holds {info.max_model_len}, leaving no room to generate",
            "prompt",
            "context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = min(room, limits.max_output_tokens or room)
    elif limits.max_output_tokens is not None and max_tokens > limits.max_output_tokens:
        raise bad(
            f"max_tokens={max_tokens} is above the limit of {limits.max_output_tokens} (max_output_tokens)",
            "max_tokens",
        )
    elif max_tokens > room:
        raise bad(
            f"max_tokens={max_tokens} with a {prompt_len}-token prompt exceeds the context of "
            f"{info.max_model_len} tokens: at most {room}",
            "max_tokens",
            "context_length_exceeded",
        )
    if body.n > limits.max_n:
        raise bad(f"n={body.n} is above the limit of {limits.max_n}", "n")
    stop = _stop_list(body.stop)
    if len(stop) > limits.max_stop:
        raise bad(f"stop: {len(stop)} stop strings; at most {limits.max_stop}", "stop")
    if any(not s for s in stop):
        raise bad("stop strings must not be empty", "stop")
    stop_ids = tuple(check_token_ids(body.stop_token_ids or [], info, "stop_token_ids"))
    bias = body.logit_bias or {}
    if len(bias) > limits.max_logit_bias:
        raise bad(f"logit_bias has {len(bias)} entries; at most {limits.max_logit_bias}", "logit_bias")
    parsed_bias = []
    for key, value in bias.items():
        try:
            tok = int(key)
        except ValueError:
            raise bad(f"logit_bias key {key!r} is not a token id", "logit_bias") from None
        check_token_ids([tok], info, "logit_bias")
        if not -100.0 <= value <= 100.0:
            raise bad(f"logit_bias[{key}]={value} is outside [-100, 100]", "logit_bias")
        parsed_bias.append((tok, float(value)))
    if logprobs is not None and logprobs > limits.max_top_logprobs:
        raise bad(f"logprobs={logprobs} is above the limit of {limits.max_top_logprobs}", "logprobs")
    prompt_logprobs = _prompt_logprobs(body, logprobs, limits)
    if body.min_tokens > max_tokens:
        raise bad(f"min_tokens={body.min_tokens} is above max_tokens={max_tokens}", "min_tokens")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0),  # NOTE: at or above the vocabulary: no top_k (sampler.bounded)
        min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=tuple(parsed_bias),
        seed=seed,
        stop=stop,
        stop_token_ids=stop_ids,
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        min_tokens=body.min_tokens,
        prompt_logprobs=prompt_logprobs,
    )


def _prompt_logprobs(body: SamplingFields, logprobs: int | None, limits: LimitsConfig) -> int | None:
    """The top k the prompt's tokens are scored with: `prompt_logprobs`, and echo's `logprobs`."""
    k = body.prompt_logprobs
    if k is not None and k > limits.max_top_logprobs:
        raise bad(f"prompt_logprobs={k} is above the limit of {limits.max_top_logprobs}", "prompt_logprobs")
    if isinstance(body, CompletionRequest) and body.echo and logprobs is not None:
        k = max(k or 0, logprobs)
    return k


def check_steering_counts(body, limits, prefix: str = "") -> None:
    """Cheap caps on the raw lists before compiling them touches the registry once per item."""
    for param, items, bound in (
        ("steering", body.steering, limits.max_interventions),
        ("feature_logit_bias", body.feature_logit_bias, limits.max_logit_bias_features),
        ("stop_when", getattr(body, "stop_when", None), limits.max_gates),
    ):
        param = prefix + param
        if items is not None and len(items) > bound:
            raise bad(f"{param} has {len(items)} entries; at most {bound}", param)


def child_seed(seed: int | None, index: int) -> int | None:
    """Seed of choice `index` of an n > 1 request: distinct per choice, same across calls."""
    if seed is None:
        return None
    return (seed + index * 0x9E3779B97F4A7C15) % (2**63)
