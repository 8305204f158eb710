"""Loading the served model and tokenizer: a local path or hub id, or a random-weight model built in code.

`demo`, the model shipped in the package, reaches here as its folder (compose.resolve_model).
`random:<arch>` builds a tiny model from a transformers config with seeded random weights and a byte-level
tokenizer, so tests and benchmarks need no download. `save_random_model()` writes one with
`save_pretrained`, so the ordinary loading path can be exercised on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.activations import GELUTanh, NewGELUActivation

import steerkernels.cpu
from steerserve.config import ModelConfig
from steerserve.runner.attention import ATTENTION_NAME, register_attention

logger = logging.getLogger(__name__)

TINY_VOCAB = 320  # 256 bytes + specials, padded
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def random_model_config(arch: str):
    from transformers import (
        Gemma2Config,
        GPT2Config,
        LlamaConfig,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(vocab_size=TINY_VOCAB, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    llama_like = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        **common,
    )
    if arch == "gpt2":
        return GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=1024, **common)
    if arch == "gpt2-small":  # GPT-2 small's shape (124M) with its vocabulary size
        return GPT2Config(vocab_size=50257, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    if arch == "llama":
        return LlamaConfig(**llama_like)
    if arch == "llama-small":  # GPT-2 small's size as a Llama, which tensor parallelism can shard
        return LlamaConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=12,
            max_position_embeddings=1024,
            vocab_size=50257,
            bos_token_id=256,
            eos_token_id=257,
            pad_token_id=258,
        )
    if arch == "llama-1b":  # Llama-3.2-1B's shape (GQA 32/8 heads of 64, tied embeddings), GPT-2's vocabulary
        return LlamaConfig(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            vocab_size=50257,
            bos_token_id=256,
            eos_token_id=257,
            pad_token_id=258,
        )
    if arch == "qwen2":
        return Qwen2Config(**llama_like)
    if arch == "qwen3":
        return Qwen3Config(head_dim=16, **llama_like)
    if arch == "gemma2":
        return Gemma2Config(
            head_dim=16,
            sliding_window=8,  # small, so short test prompts cross it
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            query_pre_attn_scalar=16,
            **llama_like,
        )
    raise ValueError(
        f"unknown random architecture {arch!r}: use gpt2, gpt2-small, llama, llama-small, llama-1b, qwen2, qwen3, gemma2"
    )


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character map (what ByteLevel pre-tokenization produces)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: ids 0..255 are bytes, 256 BOS, 257 EOS, 258 PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in enumerate(_byte_chars())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|bos|>", "<|eos|>", "<|pad|>"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_random_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    cfg = random_model_config(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval(), byte_tokenizer()


def save_random_model(arch: str, path: str, seed: int = 0, chat_template: bool = True) -> str:
    model, _ = build_random_model(arch, seed)
    model.save_pretrained(path)
    byte_tokenizer(chat_template).save_pretrained(path)
    return path


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {
            "float32": torch.float32,
            "float64": torch.float64,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
        }[dtype]
    except KeyError:
        raise ValueError(
            f"--dtype must be auto, float32, float64, bfloat16 or float16, got {dtype!r}"
        ) from None


def load_model(cfg: ModelConfig, shard: Callable[[torch.nn.Module], None] | None = None):
    """(model on its device with our attention, tokenizer, device, dtype); `shard` (tensor parallelism)
    cuts its weights to this rank's share before the CPU path packs them."""
    register_attention()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.model.startswith("random:"):
        model, tokenizer = build_random_model(cfg.model.split(":", 1)[1], cfg.seed, dtype)
    else:
        path = cfg.model
        hf_cfg = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        if hf_cfg.is_encoder_decoder:
            raise ValueError(f"{path} is an encoder-decoder model: steerserve serves decoder-only models")
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=cfg.trust_remote_code
        ).eval()
        tokenizer = AutoTokenizer.from_pretrained(
            cfg.tokenizer or path, trust_remote_code=cfg.trust_remote_code
        )
    model.set_attn_implementation(ATTENTION_NAME)
    if shard is not None:  # NOTE: before the move, so a device never holds more than this rank's share
        shard(model)
    model.to(device)
    model.requires_grad_(False)
    if dtype in (torch.bfloat16, torch.float16) or device.type == "cpu":
        fuse_gelu_tanh(model)  # NOTE: fp32 on CPU too, where oneDNN's GEMMs already round unlike generate()
    if device.type == "cpu":
        from steerserve.runner import cpu_activation, cpu_attention, cpu_memory, cpu_prompt_rows, cpu_weights

        cpu_memory.tune_allocator()  # step buffers reused from the heap, not page-faulted in anew

        cpu_activation.block_activations(model)  # bit-identical; gelu_fast / quick_gelu 1.8x faster
        cpu_activation.vectorise_gelu_tanh(model)  # and the tanh GELU 5x, on its kernel

        cpu_attention.load()  # NOTE: build the decode kernel now (once per machine), not on the first request
        steerkernels.cpu.load()  # and the steering kernels, not on the first steered request
        if dtype in cpu_weights.PACKED_DTYPES:
            cpu_weights.pack_linear_weights(model)  # no per-call reorder; fp32: batch-invariant rows
            cpu_weights.fuse_gelu_epilogue(model)
            model._ss_prompt_route = cpu_prompt_rows.attach(model)  # fp32 prompt rows on MKL
    return model, tokenizer, device, dtype


def fuse_gelu_tanh(model) -> int:
    """Swap transformers' `NewGELUActivation` (GPT-2's `gelu_new`: six elementwise ops, each rounding to
    the model's dtype) for the fused `F.gelu(approximate="tanh")`, the same formula in one kernel. Returns
    the number of modules swapped.

    NOTE: 16-bit models, and fp32 ones on CPU. In 16 bits the fused op is closer to the fp32 math (it
    rounds once) and 3-10x faster (on CPU the unfused GELU took ~30% of a bf16 GPT-2 forward). In fp32 it
    is within 5e-7 of the eight-op form (N(0, 16) inputs) and 1.4-2x faster than it blocked (cpu_activation);
    fp32 models on CUDA keep transformers' modules, bit-identical to `generate()` there.
    """
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())
                swapped += 1
    return swapped
