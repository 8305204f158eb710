"""Device banks of one site: what each steering row does there, laid out for the kernels.

Slots: each row has two slots, `2 * row + pos_class` (0 prompt token, 1 generated token), so an
intervention limited to prompt or generated positions lives only in that slot, and a token's slot is
known from its row and position class. At one site, in order:
  1. SAE feature edits (clamp / scale / ablate), one `sae_edit` call per SAE used there;
  2. projections / clamps along vector directions (`project_clamp`);
  3. additive steering, summed per slot at admission (`steer_add`);
  (a resample's column draws its per-token target first: runner/steering/resample.py)
  4. transcoder feature edits: a transcoder reads here and writes at its `site_out` (registry/sae.py), so
     its edit runs on a float32 scratch copy of h as it stands after 1-3 (what the MLP reads) and the
     change, `(a'_f - a_f) * W_dec[f]` per token, is returned for the rows to add at `site_out`
     (runner/steering/rows.py). h itself is not changed here.
"""

from __future__ import annotations

import torch

import steerkernels
from steerserve.registry import SAEWeights
from steerserve.runner.steering.resample import DrawContext, ResampleColumns
from steerserve.types.sites import Site
from steerserve.types.steering import InterventionKind, Positions

# the kernel's `mode` of each feature edit (steerkernels.sae_edit). NOTE: keyed by the StrEnum, so the
# plain strings ("feature_clamp") find the same entries
EDIT_MODES = {
    InterventionKind.FEATURE_CLAMP: 0,
    InterventionKind.FEATURE_SCALE: 1,
    InterventionKind.FEATURE_ABLATE: 2,
    InterventionKind.FEATURE_RESAMPLE: 2,  # its per-token draw (sae_edit's token_value) overrides value
}
# a resampling column: (stream id, density, sample); see ResampleColumns.set
Resample = tuple[int, float, tuple[float, ...]]


def topk_token_threshold(weights: SAEWeights, h: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """A TopK SAE's per-token rank threshold (`steerkernels.sae_topk_threshold`) for the tokens `need`
    [T] bool of `h` [T, d]; NaN for the others.

    NOTE: whether a TopK feature is active depends on every other feature of the token (is its
    pre-activation among the k largest?), so it needs the FULL encoder, which the slot-local edit SAE
    (SAEEdits) does not hold: one GEMM + topk over the tokens that need it, from the h the kernel reads
    next. Not cached across calls: an edit earlier at the same site changes h. Only TopK SAEs pay
    this (and, on CUDA, the sync of picking the rows)."""
    rows = need.nonzero().squeeze(1)
    w = weights
    return steerkernels.sae_topk_threshold(h, w.W_enc, w.b_enc, w.b_dec, w.apply_b_dec_to_input, w.k, rows)


def slots_for(row: int, positions: Positions | str) -> tuple[int, ...]:
    """The bank slots of `row` that act on `positions`: `2 * row + position class`."""
    return tuple(2 * row + pc for pc in Positions(positions).classes)


class SAEEdits:
    """Feature edits of one SAE at one site, held as a slot-local SAE.

    Edit j of slot s is local feature `s * cap + j`: its encoder column, encoder bias, threshold and
    decoder row are copied out of the SAE at admission into `[2R, cap, d]` / `[2R, cap]` buffers, and the
    kernel gets these as the SAE. NOTE: a decode step's tokens each read their own feature; reading
    W_enc's columns in place is d strided reads over the whole [d, d_sae] matrix (cache and TLB misses:
    ~300 us per 64-token step on CPU), the local copies are contiguous (~50 us). `cap` grows by doubling
    up to `max_feature_edits`, so a site that clamps one feature per request holds one column per slot.
    """

    def __init__(self, weights: SAEWeights, num_slots: int, max_width: int, device):
        self.weights = weights
        self.rows: set[int] = set()  # rows with edits of this SAE here; empty = the bank drops it
        self.max_width = max_width
        self.device = device
        self.count = [0] * num_slots
        self.resample: ResampleColumns | None = None  # created by the first resampling edit
        self._resize(1)

    def _resize(self, cap: int) -> None:
        S, d, dev = len(self.count), self.weights.W_dec.shape[1], self.device
        old = self.__dict__.get("enc")
        buffers = {
            "enc": torch.zeros((S, cap, d), dtype=torch.float32, device=dev),  # encoder columns, as rows
            "dec": torch.zeros((S, cap, d), dtype=torch.float32, device=dev),
            "b_enc": torch.zeros((S, cap), dtype=torch.float32, device=dev),
            "threshold": torch.zeros((S, cap), dtype=torch.float32, device=dev),
            "mode": torch.zeros((S, cap), dtype=torch.int64, device=dev),
            "value": torch.zeros((S, cap), dtype=torch.float32, device=dev),
        }
        for name, buf in buffers.items():
            if old is not None:
                buf[:, : old.shape[1]] = getattr(self, name)
            setattr(self, name, buf)
        col = torch.arange(cap, device=dev)
        local = torch.arange(S, device=dev)[:, None] * cap + col  # [S, cap]
        counts = torch.tensor(self.count, device=dev)[:, None]
        self.local_idx = torch.where(col < counts, local, -1)  # -1 = padding
        if self.resample is not None:
            self.resample.resize(cap)
        self._edit = None  # (width, the prepared sae_edit over these buffers)

    def add(
        self, slot: int, index: int, kind: InterventionKind | str, value: float, resample: Resample | None
    ) -> None:
        k = self.count[slot]
        if k >= self.max_width:
            raise ValueError(f"more than {self.max_width} feature edits of one SAE at one site")
        cap = self.enc.shape[1]
        if k >= cap:
            self._resize(min(2 * cap, self.max_width))
            cap = self.enc.shape[1]
        w = self.weights
        self.enc[slot, k] = w.W_enc[:, index]
        self.dec[slot, k] = w.W_dec[index]
        self.b_enc[slot, k] = w.b_enc[index]
        if w.threshold is not None:
            self.threshold[slot, k] = w.threshold[index]
        self.mode[slot, k], self.value[slot, k] = EDIT_MODES[kind], value
        self.local_idx[slot, k] = slot * cap + k
        self.count[slot] = k + 1
        if resample is not None:
            if self.resample is None:
                self.resample = ResampleColumns(len(self.count), cap, self.device)
            self.resample.set(slot, k, *resample)

    def clear_row(self, row: int) -> None:
        self.rows.discard(row)
        for slot in (2 * row, 2 * row + 1):
            self.local_idx[slot].fill_(-1)
            self.count[slot] = 0
            if self.resample is not None:
                self.resample.clear_slot(slot)

    def graph_layout(self) -> tuple | None:
        """What `apply` launches and the addresses it reads (a CUDA graph replays exactly these); None
        when it cannot be captured: a TopK SAE picks its tokens on the host, a resample draws per step."""
        w = self.weights
        if w.architecture == "topk" or self.resample is not None:
            return None
        tensors = (
            self.enc,
            self.dec,
            self.b_enc,
            self.threshold,
            self.mode,
            self.value,
            self.local_idx,
            w.b_dec,
        )
        return (w.architecture, max(self.count), w.apply_b_dec_to_input, *(t.data_ptr() for t in tensors))

    def delta(self, h: torch.Tensor, slots: torch.Tensor, ctx: DrawContext | None) -> torch.Tensor:
        """A transcoder's edit of `h` [T, d] as the float32 [T, d] change it makes at its output."""
        read = h.float()
        scratch = read.clone()
        self.apply(scratch, slots, ctx)
        return scratch.sub_(read)

    def apply(self, h: torch.Tensor, slots: torch.Tensor, ctx: DrawContext | None) -> None:
        w = self.weights
        width = max(self.count)  # NOTE: only as wide as the busiest slot: the kernels loop per column
        drawn = None if self.resample is None else self.resample.draw(slots, ctx, width)
        token_threshold = None
        if w.architecture == "topk":
            work = (self.local_idx[:, :width] >= 0).any(1)  # [S] slots with edits of this SAE
            token_threshold = topk_token_threshold(w, h, (slots >= 0) & work[slots.clamp(min=0)])
        self._prepared(width)(h, slots, token_threshold, drawn)

    def _prepared(self, width: int):
        """The sae_edit over the first `width` columns, bound once (steerkernels.prepare_sae_edit): its
        buffers are written in place, so it holds until they are reallocated or the width changes."""
        if self._edit is None or self._edit[0] != width:
            w = self.weights
            S, cap, d = self.enc.shape
            edit = steerkernels.prepare_sae_edit(
                self.local_idx[:, :width], self.enc.view(S * cap, d).t(), self.b_enc.view(-1),
                self.dec.view(S * cap, d), w.b_dec,
                self.threshold.view(-1) if w.architecture == "jumprelu" else None,
                w.apply_b_dec_to_input, self.mode[:, :width], self.value[:, :width],
            )  # fmt: skip
            self._edit = (width, edit)
        return self._edit[1]


class SiteBank:
    """Everything the rows do at one site."""

    def __init__(self, num_rows: int, d: int, cfg, device):
        s = 2 * num_rows
        self.device = device
        self.cfg = cfg
        self.add = torch.zeros((s, d), dtype=torch.float32, device=device)  # [2R, d]
        # steer_add's slot of each token slot, one index op a step: `add_slot[slot]` is the slot itself
        # where it adds something here, else -1 (slots with no additive work here are left unwritten,
        # not given +0), and entry 2R (what a token's -1 picks) is -1
        self.add_slot = torch.full((s + 1,), -1, dtype=torch.int64, device=device)
        self._steer_add = steerkernels.prepare_steer_add(self.add)  # NOTE: `add` is written in place
        self.dirs = torch.zeros((s, cfg.max_project_dirs, d), dtype=torch.float32, device=device)
        self.lo = torch.zeros((s, cfg.max_project_dirs), dtype=torch.float32, device=device)
        self.hi = torch.zeros((s, cfg.max_project_dirs), dtype=torch.float32, device=device)
        self.dir_count = torch.zeros(s, dtype=torch.int32, device=device)
        self.edits: dict[str, SAEEdits] = {}  # sae uid -> edits
        self.add_rows: set[int] = set()  # rows with additive / projection work: skip idle kernels
        self.proj_rows: set[int] = set()
        self.proj_count = [0] * s
        self.proj_resample: ResampleColumns | None = None  # created by the first resampled projection

    @property
    def idle(self) -> bool:
        return not (self.add_rows or self.proj_rows or self.edits)

    def add_vector(self, row: int, positions: Positions | str, vec: torch.Tensor) -> None:
        for slot in slots_for(row, positions):
            self.add[slot] += vec
            self.add_slot[slot] = slot
        self.add_rows.add(row)

    def add_projection(
        self,
        row: int,
        positions: Positions | str,
        unit: torch.Tensor,
        lo: float,
        hi: float,
        resample: Resample | None = None,
    ) -> None:
        for slot in slots_for(row, positions):
            k = self.proj_count[slot]
            if k >= self.dirs.shape[1]:
                raise ValueError(f"more than {self.dirs.shape[1]} projection directions at one site")
            self.dirs[slot, k], self.lo[slot, k], self.hi[slot, k] = unit, lo, hi
            if resample is not None:
                if self.proj_resample is None:
                    self.proj_resample = ResampleColumns(
                        len(self.proj_count), self.dirs.shape[1], self.device
                    )
                self.proj_resample.set(slot, k, *resample)
            self.proj_count[slot] = k + 1
            self.dir_count[slot] = k + 1
        self.proj_rows.add(row)

    def add_edit(
        self,
        row: int,
        positions: Positions | str,
        uid: str,
        weights: SAEWeights,
        index: int,
        kind: InterventionKind | str,
        value: float,
        resample: Resample | None = None,
    ) -> None:
        """Edit `kind` (a key of EDIT_MODES) of feature `index` of SAE `uid` to `value` (a resample: to
        its per-token draw)."""
        edits = self.edits.get(uid)
        if edits is None:
            edits = self.edits[uid] = SAEEdits(
                weights, self.add.shape[0], self.cfg.max_feature_edits, self.device
            )
        edits.rows.add(row)
        for slot in slots_for(row, positions):
            edits.add(slot, index, kind, value, resample)

    def clear_row(self, row: int) -> None:
        self.add[2 * row : 2 * row + 2].zero_()
        self.add_slot[2 * row : 2 * row + 2] = -1
        self.dir_count[2 * row : 2 * row + 2] = 0
        self.proj_count[2 * row] = self.proj_count[2 * row + 1] = 0
        if self.proj_resample is not None:
            self.proj_resample.clear_slot(2 * row)
            self.proj_resample.clear_slot(2 * row + 1)
        self.add_rows.discard(row)
        self.proj_rows.discard(row)
        for uid, edits in list(self.edits.items()):
            if row in edits.rows:
                edits.clear_row(row)
                if not edits.rows:
                    del self.edits[uid]

    def graph_layout(self) -> tuple | None:
        """See SAEEdits.graph_layout: the kernels `apply` launches here and what they read."""
        if self.proj_resample is not None:
            return None
        edits = []
        for uid, e in self.edits.items():
            layout = e.graph_layout()
            if layout is None:
                return None
            edits.append((uid, e.weights.site_out, layout))
        tensors = (self.add, self.add_slot, self.dirs, self.lo, self.hi, self.dir_count)
        return (bool(self.proj_rows), bool(self.add_rows), tuple(edits), *(t.data_ptr() for t in tensors))

    def writes(self) -> set[Site]:
        """The sites where this bank's transcoder edits write."""
        return {e.weights.site_out for e in self.edits.values() if e.weights.site_out is not None}

    def apply(
        self, h: torch.Tensor, token_slot: torch.Tensor, ctx: DrawContext | None = None
    ) -> list[tuple[Site, torch.Tensor]]:
        """Edit `h` [T, d] in place for the tokens whose slots act here (token_slot -1 = none); return
        the transcoder edits' changes as (site_out, [T, d] float32 delta) for the rows to add there.

        Slots without work here cost nothing and are not written: they have no edit columns (-1) and no
        projection directions (dir_count 0); additive steering is masked to the slots that have some.
        """
        for edits in self.edits.values():
            if edits.weights.site_out is None:
                edits.apply(h, token_slot, ctx)
        if self.proj_rows:
            K = self.dirs.shape[1]
            drawn = None if self.proj_resample is None else self.proj_resample.draw(token_slot, ctx, K)
            steerkernels.project_clamp(
                h, token_slot, self.dirs, self.lo, self.hi, self.dir_count, token_value=drawn, validate=False
            )
        if self.add_rows:
            self._steer_add(h, self.add_slot[token_slot])
        return [
            (e.weights.site_out, e.delta(h, token_slot, ctx))
            for e in self.edits.values()
            if e.weights.site_out is not None
        ]
