"""The one configuration tree of steerserve.

Every knob the server has lives here, documented where it is declared. The CLI builds a `Config`
from its flags (`cli.py`), everything else receives the parts it needs. Frozen: nothing changes a
config after start-up.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field


class StepMode(enum.StrEnum):
    """How the runner executes a step (`--step-mode`; `--enforce-eager` = packed)."""

    AUTO = "auto"
    """CUDA: graphs; elsewhere: packed."""
    PACKED = "packed"
    """Every step packs its tokens into one `[1, T]` batch, eagerly. Attention: the C++ kernels on CPU,
    the Triton paged kernel on CUDA."""
    PADDED = "padded"
    """Decode steps run through persistent buffers padded to a captured batch size, with the paged
    attention kernel: the CUDA-graph step, run eagerly (on CPU: to test it; Triton under
    TRITON_INTERPRET=1, else the kernel's torch reference). Other steps: packed, paged attention."""
    GRAPHS = "graphs"
    """PADDED, with each decode step replayed from a CUDA graph (CUDA only)."""


@dataclass(frozen=True)
class ModelConfig:
    model: str = "demo"
    """Path or Hugging Face id of a decoder-only model; `demo` for the small GPT-2 shipped in the
    package (trained on the demo corpus; its SAE, feature labels and variants are registered on
    start); or `random:<arch>` for a tiny random-weight model built from a config in code (arch:
    gpt2, llama, qwen2, qwen3, gemma2; full-size shapes: gpt2-small, llama-small, llama-1b)."""
    tokenizer: str | None = None
    """Tokenizer path or id; defaults to the model's."""
    dtype: str = "auto"
    """auto | float32 | bfloat16 | float16. auto = bfloat16 on CUDA, float32 on CPU."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    trust_remote_code: bool = False
    """Run code shipped with a model repository. Off unless the operator turns it on."""
    served_model_name: str | None = None
    """Name clients use in `model`; defaults to the model argument."""
    seed: int = 0
    """Seed for random-weight models and for requests that bring no seed of their own."""
    step_mode: StepMode = StepMode.AUTO
    """See StepMode. vLLM's `--enforce-eager` is `packed`."""
    max_graph_batch: int = 64
    """Largest decode batch replayed from a CUDA graph (capped by max_num_seqs); larger ones run packed."""


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    """Tokens per KV-cache block."""
    kv_cache_memory_gb: float | None = None
    """KV-cache budget in GiB. None: `kv_cache_fraction` of free device memory (CPU: of available RAM)."""
    kv_cache_fraction: float = 0.3
    """Share of free memory given to the KV cache when no explicit budget is set."""
    kv_cache_dtype: str = "auto"
    """auto | float32 | bfloat16 | float16 | float64. auto: the model's dtype on CUDA; on CPU the model's
    dtype when steerserve's CPU attention kernel runs it (fp32, bf16), else float32 (PyTorch's CPU SDPA
    runs 2-3x slower on bf16 than on fp32 at decode)."""
    enable_prefix_caching: bool = True
    """Reuse computed prompt KV blocks across requests when provably the same KV (engine/prefix_cache.py);
    on by default, as in vLLM."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    """Most requests decoded together in one step."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (decode tokens + prefill chunks)."""
    max_model_len: int | None = None
    """Longest prompt + completion; None: the model's own maximum (capped by the KV budget)."""
    long_prefill_token_threshold: int = 512
    """A prompt longer than this is prefilled in chunks of at most this many tokens per step."""


@dataclass(frozen=True)
class LimitsConfig:
    max_n: int = 16
    """Largest `n` (choices per request)."""
    max_stop: int = 16
    """Most stop strings per request."""
    max_logit_bias: int = 1024
    """Most entries in `logit_bias`."""
    max_top_logprobs: int = 20
    """Largest `top_logprobs` / `logprobs`."""
    max_prompts: int = 64
    """Most prompts in one completions call (prompt as a list)."""
    max_contrast_pairs: int = 512
    """Most prompt pairs in one /v1/vectors/contrast call."""
    max_prompt_tokens: int | None = None
    """Longest prompt in tokens; None: whatever leaves room in the context (max_model_len - 1)."""
    max_output_tokens: int | None = None
    """Largest `max_tokens` accepted; None: whatever fits the context after the prompt."""


@dataclass(frozen=True)
class AdmissionConfig:
    """What the server takes in before it says no: queue bounds (429), body and header sizes (413 / 431),
    deadlines, and how long a SIGTERM waits for requests in flight."""

    max_queued_requests: int = 512
    """Engine requests (prompts x n) admitted but not yet producing tokens; past it a call gets 429 with
    Retry-After. A call always gets in when nothing is queued, whatever its size."""
    max_queued_tokens: int = 1 << 20
    """Prompt tokens of those queued requests; past it, 429 likewise."""
    max_queued_per_call: int | None = None
    """A call's share of the queue: at most this many of its requests wait in the engine at once, the
    rest go in as those start (fair admission: a 64 prompts x n=16 call no longer 429s everyone else
    for its whole run). None: the scheduler's max_num_seqs, which keeps a lone call's batches full."""
    retry_after_s: int = 1
    """The Retry-After a 429 or 503 suggests, in seconds."""
    request_timeout_s: float | None = None
    """Deadline of every generation request, from arrival; None: none. A request's own `timeout`
    field may ask for less. Past it the request is aborted (KV blocks and slot freed) and fails with 408."""
    drain_timeout_s: float = 20.0
    """On SIGTERM: stop admitting, let requests in flight finish for up to this long, then exit 0.
    Below Kubernetes' default 30 s grace period, so the drain ends before the SIGKILL."""
    max_body_mb: float = 16.0
    """Largest JSON request body (413 past it); registry uploads have `max_upload_mb` instead."""
    max_header_kb: float = 32.0
    """Largest total size of a request's headers (431 past it)."""
    header_timeout_s: float = 10.0
    """A connection must deliver a request's headers within this long, from its first byte (or from the
    connection's start); else 408 and the connection is closed (slow-header clients, "slowloris")."""
    body_timeout_s: float = 10.0
    """A request's body must arrive within this long after its headers, plus one second per
    `body_min_rate` bytes received (so a large upload at a healthy rate is never cut); else 408 and close."""
    body_min_rate: int = 16 << 10
    """Bytes per second that extend the body deadline by one second (see body_timeout_s)."""


@dataclass(frozen=True)
class SteeringConfig:
    max_steering_rows: int = 64
    """Distinct steering specs on the device at once (identical specs share a row); more wait."""
    max_interventions: int = 64
    """Interventions per request (a vector acting at several sites counts once per site)."""
    max_project_dirs: int = 8
    """Projection / clamp directions per row, site and position class."""
    max_feature_edits: int = 16
    """Clamped / scaled / ablated features per row, site, SAE and position class."""
    max_gates: int = 8
    """Distinct `when` gates plus `stop_when` conditions per request."""
    max_logit_bias_features: int = 32
    """Entries of `feature_logit_bias` per request."""
    max_abs_value: float = 1e6
    """Largest |strength|, |value|, |factor| accepted."""
    sae_cache_mb: int = 2048
    """Device memory for SAE weights in use by running requests (LRU)."""


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    """Ranks the model's weights are sharded over (one process each; torch.distributed)."""
    distributed_timeout_s: float = 300.0
    """A collective that waits longer breaks the group: the engine is dead and the server exits."""
    heartbeat_s: float = 10.0
    """While idle, rank 0 tells the other ranks it is alive this often (well under the timeout)."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    """Keys accepted as `Authorization: Bearer KEY` on /v1 routes and /generate. Empty: open."""
    admin_keys: tuple[str, ...] = ()
    """Keys required for registry writes. Empty: the api keys (or open, if there are none)."""
    log_level: str = "info"


@dataclass(frozen=True)
class RegistryConfig:
    data_dir: str = field(default_factory=lambda: os.environ.get("STEERSERVE_DATA_DIR", "./data"))
    """Directory for the SQLite registry and content-addressed blobs."""
    registry_url: str | None = field(default_factory=lambda: os.environ.get("STEERSERVE_REGISTRY_URL"))
    """`postgresql://...` for a shared registry; None: SQLite in `data_dir`."""
    max_upload_mb: int = 2048
    """Largest accepted upload (SAE weights, vectors)."""
    blob_url: str | None = field(default_factory=lambda: os.environ.get("STEERSERVE_BLOB_URL"))
    """`s3://BUCKET/PREFIX`: blobs in an S3-compatible bucket (region and credentials from the standard
    AWS variables); None: files under `data_dir/blobs`."""
    blob_endpoint_url: str | None = None
    """S3 endpoint (`http://minio:9000`); None: boto3's own (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS)."""
    blob_cache_mb: int = 16384
    """Local disk cache of S3 blobs under `data_dir/blob-cache` (least recently used files go first)."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    steering: SteeringConfig = field(default_factory=SteeringConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
