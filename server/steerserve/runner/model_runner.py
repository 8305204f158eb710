"""The model runner: SchedulerOutput -> one packed forward pass -> sampler -> RunnerOutput.

Steps of `execute()`, in order:
  1. forget requests that finished; remember new ones (generator, penalty state);
  2. pack all scheduled tokens of all requests into one `[1, T]` batch (input_batch.py), or, for a
     decode step with a padded step mode, write them into the persistent buffers (step_buffers.py);
  3. run the transformers model with our attention (attention.py) and keep only the logits of rows
     that sample, and of the prompt rows scored for `prompt_logprobs` (`logits_to_keep`); a padded
     decode step in `graphs` mode replays a CUDA graph instead (cuda_graphs.py);
  4. sample, and copy the tokens to the host: the step's one host-device sync (a second one when
     prompt rows were scored).
What one request brings is checked where it can fail: admission (`failed`: its SAE vanished, ...), and
the sampler (a row whose logits are not finite ends its request alone). Anything else that raises fails
the whole call; the engine then finds the request responsible (engine.py) and `probe()` tells a failing
request from a broken engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
from collections.abc import Callable

import torch

from steerserve.config import StepMode
from steerserve.runner.attention import KVCache, paged_kernels_work
from steerserve.runner.cuda_graphs import DecodeGraphs
from steerserve.runner.input_batch import (
    CachedRequest,
    SamplingBatches,
    build_forward_inputs,
    draw_context,
    new_cached_request,
)
from steerserve.runner.model_adapter import model_adapter
from steerserve.runner.site_hooks import SiteHooks
from steerserve.runner.steering.capture import FeatureCapturer
from steerserve.runner.step_buffers import DecodeBuffers, is_decode_step
from steerserve.sampling.sampler import Sampler, bounded, prompt_scores
from steerserve.types.requests import (
    NON_FINITE_LOGITS,
    FeatureStop,
    SamplingParams,
    TokenLogprob,
)
from steerserve.types.step import RunnerOutput, ScheduledRequest, SchedulerOutput

logger = logging.getLogger(__name__)


def resolve_step_mode(mode: StepMode, device: torch.device) -> StepMode:
    if mode is StepMode.AUTO:
        return StepMode.GRAPHS if device.type == "cuda" else StepMode.PACKED
    if mode is StepMode.GRAPHS and device.type != "cuda":
        raise ValueError("--step-mode graphs needs a CUDA device (padded runs the same step eagerly)")
    return mode


class ModelRunner:
    def __init__(
        self,
        model,
        device,
        dtype,
        num_blocks: int,
        block_size: int,
        layout,
        seed: int = 0,
        steering=None,
        step_mode: StepMode = StepMode.PACKED,
        max_graph_batch: int = 64,
        max_blocks_per_seq: int = 0,
    ):
        self.model = model
        self.device = device
        self.block_size = block_size
        self.vocab_size = model_adapter(model).vocab_size
        n_layers, n_kv, head_dim = layout
        # NOTE: one block more than the allocator hands out: `probe()` writes there and nowhere else
        self._probe_block = num_blocks
        self.kv_cache = KVCache(n_layers, n_kv, head_dim, (num_blocks + 1) * block_size, dtype, device)
        self.sampler = Sampler()
        self._sampling_batches = SamplingBatches()
        self.requests: dict[str, CachedRequest] = {}
        self._rng = random.Random(seed)
        self.steering = steering  # SteeringRows, or None when the server cannot steer
        self.capturer = FeatureCapturer(steering.resources) if steering is not None else None
        self.site_hooks = SiteHooks(model_adapter(model), self._on_site)
        self.grammars = None  # runner/grammar.py GrammarRows (compose.py): structured output
        # tensor parallelism: every rank's refused admissions -> all of them (engine/distributed.py), so
        # that all ranks run the same rows through the forward's collectives
        self.consensus: Callable[[dict[str, str]], dict[str, str]] | None = None
        self.step_mode = resolve_step_mode(step_mode, device)
        # the paged kernels attend every step (packed ones too) on CUDA and in the padded modes; on CUDA
        # they are checked against their reference first, and a failure leaves the eager SDPA path
        self.paged = self.step_mode is not StepMode.PACKED or device.type == "cuda"
        if self.paged and device.type == "cuda" and not paged_kernels_work(device, dtype):
            logger.error("the paged attention kernels failed their start-up check: eager SDPA attention")
            self.paged, self.step_mode = False, StepMode.PACKED
        self.decode_buffers = None
        if self.step_mode in (StepMode.PADDED, StepMode.GRAPHS):
            self.decode_buffers = DecodeBuffers(max_graph_batch, max_blocks_per_seq, block_size, device)
        self.graphs = DecodeGraphs(device) if self.step_mode is StepMode.GRAPHS else None

    def _on_site(self, site, h) -> None:
        self.steering.apply(site, h)  # steering first: a capture sees the steered state
        self.capturer.collect(site, h)

    def _plan_captures(self, scheduled) -> None:
        items, q_start = [], 0
        for item in scheduled:
            n = len(item.token_ids)
            if item.capture is not None:
                skip = min(n, max(0, item.num_reported - item.start))  # recomputed after a preemption
                items.append(
                    (
                        item.request_id,
                        item.capture,
                        q_start + skip,
                        item.start + skip,
                        n - skip,
                        item.num_prompt_tokens,
                    )
                )
            q_start += n
        self.capturer.plan(items)

    def _admit(self, item: ScheduledRequest) -> CachedRequest:
        """The request's runner state; everything it reads from the registry is resolved here, once."""
        if item.steering is not None and self.steering is None:
            raise RuntimeError("this server was started without steering support")
        sampling = bounded(item.sampling, self.vocab_size)  # what passed the edge, in range for a step
        if sampling is not item.sampling:
            item = dataclasses.replace(item, sampling=sampling)
        req = new_cached_request(item, self.device, self._rng)
        if item.sampling.grammar is not None:  # first: nothing else to undo when it fails
            if self.grammars is None:
                raise RuntimeError("this server was started without structured output")
            self.grammars.admit(item.request_id, item.sampling.grammar)
        if self.capturer is not None and item.capture is not None:
            self.capturer.admit(item.request_id, item.capture)
        if item.steering is not None:
            try:
                req.row = self.steering.acquire(item.steering)
            except Exception:
                self.capturer.forget(item.request_id)
                if self.grammars is not None:
                    self.grammars.forget(item.request_id)
                raise
        return req

    def _forget(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None and req.row >= 0:
            self.steering.release(req.steering)
        if self.capturer is not None:
            self.capturer.forget(request_id)
        if self.grammars is not None:
            self.grammars.forget(request_id)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        for rid in sched.finished_ids:
            self._forget(rid)
        failed: dict[str, str] = {}
        new = [item for item in sched.scheduled if item.request_id not in self.requests]
        if self.steering is not None:
            try:
                self.steering.prepare([item.steering for item in new if item.steering is not None])
            except Exception:  # NOTE: only a speed-up: each request's own admission reports its error
                logger.debug("batched logit effects failed", exc_info=True)
        for item in new:
            try:
                self.requests[item.request_id] = self._admit(item)
            except Exception as exc:  # this request cannot run; the batch goes on without it
                logger.warning("request %s failed at admission: %s", item.request_id, exc)
                failed[item.request_id] = f"{type(exc).__name__}: {exc}"
        if self.consensus is not None and new:  # NOTE: every rank sees the same `new`: all skip alike
            agreed = self.consensus(failed)
            for rid in agreed.keys() - failed.keys():
                self._forget(rid)  # admitted here, refused on another rank
            failed = agreed
        scheduled = tuple(item for item in sched.scheduled if item.request_id not in failed)
        if not scheduled:
            return RunnerOutput({}, failed=failed)

        rows = [self.requests[item.request_id].row for item in scheduled]
        padded = self._padded_size(scheduled)
        if padded:
            inputs = self.decode_buffers.load(scheduled, rows, padded)
        else:
            inputs = build_forward_inputs(scheduled, rows, self.block_size, self.device, self.paged)
        gated = self.steering is not None and self.steering.gated and inputs.token_row is not None
        if self.steering is not None:
            draws = None
            if self.steering.resamples and inputs.token_row is not None:
                reqs = [self.requests[item.request_id] for item in scheduled]
                draws = draw_context(scheduled, reqs, inputs, self.device)
            if gated:
                self.steering.begin_step(
                    inputs.token_row, inputs.pos_class, [len(item.token_ids) for item in scheduled],
                    self._gate_states(scheduled), draws,
                )  # fmt: skip
            else:
                self.steering.begin_step(inputs.token_row, inputs.pos_class, draws=draws)
            self._plan_captures(scheduled)
            self.site_hooks.sync(self.steering.sites() | self.capturer.sites())
        states = None
        try:
            all_logits = self._logits(inputs, padded)  # [R + K (+ padding rows), V]
        finally:
            if self.steering is not None:
                sample_rows = [self.requests[rid].row for rid in inputs.sample_ids]
                states = self.steering.end_step(inputs.logits_rows[: len(sample_rows)], sample_rows)
        if states is not None:  # NOTE: only after a forward that ran: a failed step may be run again
            for i, item in enumerate(scheduled):
                self.requests[item.request_id].gate_state = states[i]
        features = self.capturer.results() if self.capturer is not None else {}
        n_sample = len(inputs.sample_ids)
        scored = self._prompt_logprobs(inputs, all_logits[n_sample:])
        if not n_sample:
            return RunnerOutput({}, failed=failed, features=features, prompt_logprobs=scored)
        logits = all_logits[:n_sample]  # [R, V]
        reqs = [self.requests[rid] for rid in inputs.sample_ids]
        dense = None if self.steering is None else self.steering.logit_bias([r.row for r in reqs])
        batch = self._sampling_batches.get(reqs, self.vocab_size, self.device, dense)
        if self.grammars is not None:
            batch.grammar_bitmask = self.grammars.bitmask(scheduled, inputs.sample_ids, self.device)
        result = self.sampler(logits, batch)
        output = self._to_host(reqs, result, failed, features, scheduled)
        output.prompt_logprobs.update(scored)
        if gated:
            self._apply_stops(output, scheduled)
        return output

    def _prompt_logprobs(self, inputs, logits: torch.Tensor) -> dict[str, list[TokenLogprob]]:
        """The scored prompt rows' logprobs (raw, like sampled ones), per request; `logits` [K, V] are
        the rows after the sampled ones, computed in the same forward pass (so under the steering)."""
        if inputs.prompt_targets is None:
            return {}
        scores = prompt_scores(logits, inputs.prompt_targets, max(r.k for r in inputs.prompt_rows))
        chosen, ranks = scores.logprobs.tolist(), scores.ranks.tolist()
        top_ids = scores.top_ids.tolist() if scores.top_ids is not None else None
        top_lp = scores.top_logprobs.tolist() if scores.top_logprobs is not None else None
        targets = inputs.prompt_targets.tolist()
        out: dict[str, list[TokenLogprob]] = {}
        i = 0
        for rows in inputs.prompt_rows:
            lps = out.setdefault(rows.request_id, [])
            for j in range(i, i + rows.count):
                top = tuple(zip(top_ids[j][: rows.k], top_lp[j][: rows.k], strict=True)) if top_ids else ()
                lps.append(TokenLogprob(targets[j], chosen[j], top, ranks[j]))
            i += rows.count
        return out

    def _padded_size(self, scheduled) -> int | None:
        """The padded batch size when this step runs through the persistent decode buffers."""
        if self.decode_buffers is None or not is_decode_step(scheduled):
            return None
        if self.steering is not None and (self.steering.gated or self.steering.resamples):
            return None  # NOTE: gates and resample draws take per-step host state: packed steps
        return self.decode_buffers.padded(len(scheduled))

    def _logits(self, inputs, padded: int | None) -> torch.Tensor:
        """The kept rows' logits [K, V]: replayed from a CUDA graph when this step has one; a padded step
        without one runs the same body eagerly."""
        if not padded:
            return self._forward(inputs).logits[0]
        if self.graphs is not None and not self.graphs.disabled:
            key = ("unsteered",) if inputs.token_row is None else self.steering.graph_layout()
            if key is not None:
                return self.graphs.run((padded, key), lambda: self._graph_body(inputs))
        return self._graph_body(inputs)

    def _graph_body(self, inputs) -> torch.Tensor:
        """The decode step as a graph records it: the steering's per-token slots are computed inside it,
        from the persistent buffers (execute() computed them too, outside: those the graph does not read)."""
        if inputs.token_row is not None:
            self.steering.begin_step(inputs.token_row, inputs.pos_class)
        return self._forward(inputs).logits[0]

    def _forward(self, inputs):
        route = getattr(self.model, "_ss_prompt_route", None)  # CPU fp32: prompt rows on MKL
        with contextlib.nullcontext() if route is None else route.step(inputs.row_kinds):
            return self.model(
                input_ids=inputs.input_ids,
                position_ids=inputs.position_ids,
                logits_to_keep=inputs.logits_rows,
                use_cache=False,
                steer_attn=inputs.attn,
                steer_cache=self.kv_cache,
            )

    @torch.inference_mode()
    def probe(self) -> None:
        """One unsteered token through the model into the probe block, which no request owns: raises when
        the engine itself cannot run a step (device lost, broken model), whatever its requests."""
        item = ScheduledRequest(
            request_id="", token_ids=(0,), start=0, block_ids=(self._probe_block,), sample=True,
            num_prompt_tokens=1, prompt_token_ids=(0,), sampling=SamplingParams(), steering=None,
        )  # fmt: skip
        inputs = build_forward_inputs((item,), [-1], self.block_size, self.device)
        if self.steering is not None:
            self.steering.begin_step(None, inputs.pos_class)  # no steered token: the hooks do nothing
            self.capturer.plan([])
        float(self._forward(inputs).logits[0, -1, 0])  # NOTE: a sync, so that device errors surface here

    def _gate_states(self, scheduled) -> torch.Tensor:
        """[N, G] bool: each scheduled request's gates that fired in earlier steps; a request computed
        from its first token again (new, or recomputed after preemption) starts with none."""
        none = torch.zeros(self.steering.cfg.max_gates, dtype=torch.bool, device=self.device)
        states = []
        for item in scheduled:
            state = self.requests[item.request_id].gate_state
            states.append(state if state is not None and item.start > 0 else none)
        return torch.stack(states)

    def _apply_stops(self, output: RunnerOutput, scheduled) -> None:
        """Requests whose stop condition held on their newest token end there: the token sampled from
        it is dropped, and `output.stopped` says which condition held."""
        hits = self.steering.stop_hits()
        if not any(hits):
            return
        items = {item.request_id: item for item in scheduled if item.sample}
        for rid, hit in zip(items, hits, strict=True):
            if hit is None:
                continue
            item = items[rid]
            g = hit.gate
            output.sampled.pop(rid, None)
            output.logprobs.pop(rid, None)
            output.stopped[rid] = FeatureStop(
                g.sae.id, g.index, hit.activation, item.start + len(item.token_ids) - 1,
                item.token_ids[-1], g.above, g.below,
            )  # fmt: skip

    def _to_host(
        self, reqs: list[CachedRequest], result, failed: dict[str, str], features, scheduled
    ) -> RunnerOutput:
        tokens, chosen, top_ids, top_lp = _read_back(result)
        sampled = {}
        for req, tok in zip(reqs, tokens, strict=True):
            if tok < 0:  # the sampler found the row's logits not finite
                failed[req.request_id] = _non_finite_message(req, scheduled)
            else:
                sampled[req.request_id] = tok
        logprobs = {}
        if chosen is not None:
            for i, (req, tok) in enumerate(zip(reqs, tokens, strict=True)):
                k = req.sampling.logprobs
                if k is None or tok < 0:
                    continue
                top = tuple(zip(top_ids[i][:k], top_lp[i][:k], strict=True)) if k and top_ids else ()
                logprobs[req.request_id] = TokenLogprob(tok, chosen[i], top)
        for req in reqs:  # NOTE: last, once nothing can fail: a failed step is run again
            tok = sampled.get(req.request_id)
            if tok is not None and req.sampling.uses_penalties:
                req.output_counts[tok] += 1
        return RunnerOutput(sampled, logprobs, failed, features)


def _read_back(result) -> tuple[list[int], list[float] | None, list | None, list | None]:
    """(tokens, chosen logprobs, top ids, top logprobs) on the host, in ONE device->host copy: the step's
    one sync. With logprobs, the columns travel as one float64 tensor (token ids < 2**53 are exact, and
    float32 logprobs widen exactly)."""
    if result.logprobs is None:
        return result.token_ids.tolist(), None, None, None
    cols = [result.token_ids[:, None], result.logprobs[:, None]]
    k = 0
    if result.top_ids is not None:
        k = result.top_ids.shape[1]
        cols += [result.top_ids, result.top_logprobs]
    rows = torch.cat([c.double() for c in cols], dim=1).tolist()
    tokens = [int(r[0]) for r in rows]
    chosen = [r[1] for r in rows]
    if result.top_ids is None:
        return tokens, chosen, None, None
    return tokens, chosen, [[int(t) for t in r[2 : 2 + k]] for r in rows], [r[2 + k :] for r in rows]


def _non_finite_message(req: CachedRequest, scheduled) -> str:
    item = next(item for item in scheduled if item.request_id == req.request_id)
    n = item.start + len(item.token_ids) - item.num_prompt_tokens + 1  # the output token it was for
    why = (
        "the steering is too strong for this model: lower its strength"
        if req.row >= 0
        else "the model's activations overflowed, or a sampling parameter is too extreme"
    )
    return f"{NON_FINITE_LOGITS} at output token {n}: {why}"
