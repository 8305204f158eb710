"""SteeringVector: one `[d]` direction per site (usually one site; a control-vector file has one per layer).

Directions are kept as given (not normalized): `add` with strength s adds `s * direction`. They are
float32 on the CPU, finite, all of one length `d`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from steerserve.registry.errors import InvalidInput
from steerserve.types.sites import Site, parse_site

FORMAT = "steerserve.vector.v1"


@dataclass(frozen=True, eq=False)
class SteeringVector:
    directions: dict[Site, torch.Tensor]  # site -> [d] float32

    def __post_init__(self) -> None:
        if not self.directions:
            raise InvalidInput("a steering vector needs at least one direction", param="vector")
        lengths = set()
        for site, t in self.directions.items():
            if not isinstance(site, Site):
                raise InvalidInput(f"direction key must be a Site, got {site!r}", param="site")
            if t.dim() != 1 or t.numel() == 0:
                raise InvalidInput(
                    f"the direction at {site.hook_name} must be a non-empty 1-d [d] tensor, got shape "
                    f"{list(t.shape)}",
                    param="vector",
                )
            if t.dtype != torch.float32:
                raise InvalidInput(f"directions are stored as float32, got {t.dtype}", param="vector")
            if not bool(torch.isfinite(t).all()):
                raise InvalidInput(f"the direction at {site.hook_name} holds NaN or inf", param="vector")
            if not math.isfinite(float(t.norm())):  # stored (and steered with) in float32
                raise InvalidInput(
                    f"the direction at {site.hook_name} has a norm beyond float32's range (~3.4e38); "
                    "scale it down",
                    param="vector",
                )
            lengths.add(t.numel())
        if len(lengths) != 1:
            raise InvalidInput(f"all directions must have one length, got {sorted(lengths)}", param="vector")

    @classmethod
    def of(cls, directions: dict[Site, torch.Tensor]) -> SteeringVector:
        """Build from tensors of any float dtype (converted to contiguous float32 on the CPU)."""
        return cls(
            {s: t.detach().to("cpu", torch.float32).reshape(-1).contiguous() for s, t in directions.items()}
        )

    @property
    def d(self) -> int:
        return next(iter(self.directions.values())).numel()

    @property
    def sites(self) -> list[Site]:
        return sorted(self.directions)

    def norms(self) -> dict[Site, float]:
        return {s: float(t.norm()) for s, t in self.directions.items()}

    def blob_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors keyed by SAELens hook name, as stored in the blob."""
        return {s.hook_name: t for s, t in self.directions.items()}

    @classmethod
    def from_blob(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> SteeringVector:
        if metadata.get("format") != FORMAT:
            raise InvalidInput(f"not a steerserve vector blob (format={metadata.get('format')!r})")
        return cls.of({parse_site(name): t for name, t in tensors.items()})
