"""The demo language model: a byte-level BPE tokenizer and a small GPT-2, trained on the demo corpus.

Steps (`train_tokenizer`, then `train_model`):
1. a byte-level BPE vocabulary (`tokenizers`) learned from generated documents, wrapped as a
   `PreTrainedTokenizerFast` that writes BOS before every text (as the server's prompts get it);
2. documents as `BOS text EOS`, packed whole into rows of `context` tokens (padding masked out);
3. AdamW with warm-up and cosine decay, from `torch.manual_seed(seed)` on a fixed number of threads,
   so the same seed gives the same weights on the same machine.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from steerserve.demo.corpus import CorpusGenerator, Document

logger = logging.getLogger(__name__)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"


@dataclass(frozen=True)
class LMConfig:
    vocab_size: int = 1024
    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    context: int = 64  # tokens per training row (documents are ~30 tokens)
    n_positions: int = 256
    train_docs: int = 70_000
    steps: int = 1000
    batch_rows: int = 32
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1


def train_tokenizer(docs: list[Document], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in docs), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(cfg: LMConfig, tokenizer):
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.n_positions,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return AutoModelForCausalLM.from_config(config)


def pack_rows(docs: list[Document], tokenizer, context: int) -> torch.Tensor:
    """Whole documents (`BOS text EOS`) packed greedily into rows: [num_rows, context], PAD after."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    encoded = tokenizer([d.text for d in docs], add_special_tokens=True)["input_ids"]
    rows, row = [], []
    for ids in encoded:
        ids = [*ids, eos][:context]
        if len(row) + len(ids) > context:
            rows.append(row + [pad] * (context - len(row)))
            row = []
        row += ids
    if row:
        rows.append(row + [pad] * (context - len(row)))
    return torch.tensor(rows, dtype=torch.long)


def lr_at(step: int, cfg: LMConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_model(cfg: LMConfig, tokenizer, seed: int, log_every: float = 15.0):
    """(model in eval mode, final training loss)."""
    docs = CorpusGenerator(seed).documents(cfg.train_docs)
    rows = pack_rows(docs, tokenizer, cfg.context)  # [num_rows, context]
    torch.manual_seed(seed)
    model = build_model(cfg, tokenizer)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    pad = tokenizer.pad_token_id
    logger.info(
        "training a %d-layer d_model %d GPT-2 (%.2fM parameters) on %d rows of %d tokens, %d steps",
        cfg.n_layer, cfg.d_model, sum(p.numel() for p in model.parameters()) / 1e6, len(rows),
        cfg.context, cfg.steps,
    )  # fmt: skip
    start = last = time.monotonic()
    smooth = None
    for step in range(cfg.steps):
        take = torch.arange(step * cfg.batch_rows, (step + 1) * cfg.batch_rows) % len(rows)
        batch = rows[order[take]]  # [batch_rows, context]
        labels = batch.masked_fill(batch == pad, -100)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        # NOTE: no attention mask: padding only follows a row's documents, and attention is causal
        loss = model(input_ids=batch, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if time.monotonic() - last > log_every or step == cfg.steps - 1:
            last = time.monotonic()
            logger.info("lm step %d/%d loss %.3f (%.0f s)", step + 1, cfg.steps, smooth, last - start)
    return model.eval(), float(smooth)


@torch.no_grad()
def perplexity(model, tokenizer, docs: list[Document], batch: int = 64) -> float:
    """exp(mean next-token loss) over the text tokens of `docs` (each `BOS text`, one per row)."""
    total, count = 0.0, 0
    for start in range(0, len(docs), batch):
        enc = tokenizer([d.text for d in docs[start : start + batch]], padding=True, return_tensors="pt")
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        targets = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
        )
        total += loss.item()
        count += int((targets != -100).sum())
    return math.exp(total / count)
