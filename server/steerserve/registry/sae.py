"""SAEWeights: the one normalized in-memory SAE every loader produces, with reference encode/decode.

Conventions (SAELens'): `W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]`.
Activations, for `x [..., d_in]`:
    sae_in = x - b_dec * apply_b_dec_to_input                   # [..., d_in]
    pre    = sae_in @ W_enc + b_enc                             # [..., d_sae]
    relu:     a = relu(pre)
    jumprelu: a = relu(pre) * (pre > threshold)
    topk:     a = relu(pre) where pre is among the k largest of its row, else 0
    decode:   x_hat = a @ W_dec + b_dec                         # [..., d_in]
Gated SAEs are folded into jumprelu exactly by their loader (see formats/saelens.py); input
normalisations that depend on x are rejected there, the constant ones folded into the weights. So is
TopK's `rescale_acts_by_decoder_norm` (SAELens' fold_W_dec_norm): W_dec is always the row decode()
multiplies an activation by, which `add` writes (API.md). The kernels (steerkernels) compute the same
activations; tests/sae_fidelity checks both against the real libraries.

Transcoders (`site_out` set) read at `site` (the MLP's input) and write at `site_out` (its output, same
layer, same width): x above is the input, decode() their reconstruction of the output without the skip
term `x @ W_skip.T` of skip transcoders (never stored: see below). Their edits keep the transcoder's error
e = y - (decode(a) + x @ W_skip.T), y the true MLP output: y' = decode(a') + x @ W_skip.T + e
= y + (a'_f - a_f) * W_dec[f], so W_skip and b_dec cancel and the edit is the SAE edit's own delta,
computed at `site` and added at `site_out` (runner/steering/banks.py); `add` writes W_dec[f] at `site_out`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from steerserve.registry.errors import InvalidInput
from steerserve.types.sites import Site

ARCHITECTURES = ("relu", "jumprelu", "topk")
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True, eq=False)
class SAEWeights:
    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_dec: torch.Tensor  # [d_in]
    architecture: str  # relu | jumprelu | topk
    site: Site
    apply_b_dec_to_input: bool = False
    threshold: torch.Tensor | None = None  # [d_sae], jumprelu only
    k: int | None = None  # topk only
    site_out: Site | None = None  # transcoders: where they write (the MLP's output); None = at `site`

    def __post_init__(self) -> None:
        if self.site_out is not None and not self.site < self.site_out:
            raise InvalidInput(
                f"a transcoder must write after it reads: it reads {self.site.hook_name} and writes "
                f"{self.site_out.hook_name}",
                param="hook_name_out",
            )
        if self.architecture not in ARCHITECTURES:
            raise InvalidInput(
                f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}",
                param="architecture",
            )
        if self.W_enc.dim() != 2:
            raise InvalidInput(
                f"W_enc must be 2-d [d_in, d_sae], got shape {list(self.W_enc.shape)}", "W_enc"
            )
        d_in, d_sae = self.W_enc.shape
        if d_in < 1 or d_sae < 1:
            raise InvalidInput(f"W_enc must not be empty, got shape {list(self.W_enc.shape)}", "W_enc")
        expect = {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        if self.threshold is not None:
            expect["threshold"] = (d_sae,)
        for name, shape in expect.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape:
                raise InvalidInput(
                    f"{name} must have shape {list(shape)} to match W_enc [d_in={d_in}, d_sae={d_sae}], "
                    f"got {list(t.shape)}",
                    param=name,
                )
        dtypes = {t.dtype for t in self.tensors().values()}
        if len(dtypes) != 1 or next(iter(dtypes)) not in WEIGHT_DTYPES:
            raise InvalidInput(
                f"SAE tensors must share one of float32/float16/bfloat16, got {dtypes}", "dtype"
            )
        if (self.architecture == "jumprelu") != (self.threshold is not None):
            raise InvalidInput("a threshold [d_sae] is required for jumprelu and only for it", "threshold")
        if self.architecture == "topk":
            if not isinstance(self.k, int) or not 1 <= self.k <= d_sae:
                raise InvalidInput(f"topk needs an integer k in 1..d_sae={d_sae}, got {self.k!r}", param="k")
        elif self.k is not None:
            raise InvalidInput(f"k is only meaningful for topk, got k={self.k} for {self.architecture}", "k")

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def write_site(self) -> Site:
        """Where a feature's decoder row is written: `site_out` for a transcoder, else `site`."""
        return self.site if self.site_out is None else self.site_out

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The weights by their SAELens names (threshold only where there is one)."""
        out = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return out

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SAEWeights:
        moved = {name: t.to(device=device, dtype=dtype) for name, t in self.tensors().items()}
        return replace(self, **moved)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> pre [..., d_sae], computed in the weights' dtype."""
        x = x.to(self.dtype)
        sae_in = x - self.b_dec if self.apply_b_dec_to_input else x  # [..., d_in]
        return sae_in @ self.W_enc + self.b_enc  # [..., d_sae]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> feature activations [..., d_sae]."""
        pre = self.pre_activations(x)  # [..., d_sae]
        acts = torch.relu(pre)
        if self.architecture == "jumprelu":
            return acts * (pre > self.threshold)
        if self.architecture == "topk":
            top = torch.topk(pre, self.k, dim=-1)  # values/indices [..., k]
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return acts

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """acts [..., d_sae] -> reconstruction [..., d_in]."""
        return acts.to(self.dtype) @ self.W_dec + self.b_dec

    def blob_metadata(self) -> dict[str, str]:
        """What the stored safetensors blob carries beside the tensors (strings only)."""
        return {
            "format": "steerserve.sae.v1",
            "architecture": self.architecture,
            "k": "" if self.k is None else str(self.k),
            "apply_b_dec_to_input": "1" if self.apply_b_dec_to_input else "0",
            "layer": str(self.site.layer),
            "hook": self.site.hook,
            **(
                {}
                if self.site_out is None
                else {"layer_out": str(self.site_out.layer), "hook_out": self.site_out.hook}
            ),
        }

    @classmethod
    def from_blob(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> SAEWeights:
        """Inverse of (tensors(), blob_metadata())."""
        if metadata.get("format") != "steerserve.sae.v1":
            raise InvalidInput(f"not a steerserve SAE blob (format={metadata.get('format')!r})")
        k = metadata.get("k") or None
        out = metadata.get("hook_out")
        return cls(
            W_enc=tensors["W_enc"],
            b_enc=tensors["b_enc"],
            W_dec=tensors["W_dec"],
            b_dec=tensors["b_dec"],
            threshold=tensors.get("threshold"),
            architecture=metadata["architecture"],
            k=None if k is None else int(k),
            apply_b_dec_to_input=metadata.get("apply_b_dec_to_input") == "1",
            site=Site(int(metadata["layer"]), metadata["hook"]),
            site_out=None if out is None else Site(int(metadata["layer_out"]), out),
        )
