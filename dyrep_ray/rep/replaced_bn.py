"""The BatchNorm the original's ``--dbb`` converter removes: a converted conv's following BatchNorm becomes an
identity (the block has BatchNorms of its own).

:class:`ReplacedBatchNorm` is that identity, remembering the BatchNorm it replaced so the structure graph can
rebuild it and deploy can put an exact identity BatchNorm back (the untouched architecture's layout, so the
deployed weights strict-load into it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

#: Structure-graph entry type of a replaced BatchNorm.
GRAPH_ENTRY_TYPE = "identity_bn"


def replaceable_bn(module: nn.Module) -> bool:
    """A BatchNorm2d whose function is the plain BatchNorm's: ``nn.BatchNorm2d`` itself, or a subclass whose
    submodules are all identities (timm's BatchNormAct2d with no activation or dropout, as RepVGG's)."""
    if not isinstance(module, nn.BatchNorm2d):
        return False
    return type(module) is nn.BatchNorm2d or all(type(m) is nn.Identity for m in module.children())


class ReplacedBatchNorm(nn.Identity):
    """Forwards its input unchanged; keeps the settings of the BatchNorm2d it replaced (no parameters)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True):
        super().__init__()
        self.num_features, self.eps, self.momentum = int(num_features), float(eps), momentum
        self.affine, self.track_running_stats = bool(affine), bool(track_running_stats)

    @classmethod
    def replacing(cls, bn: nn.BatchNorm2d) -> ReplacedBatchNorm:
        return cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)

    def forward(self, x: Tensor) -> Tensor:
        return x

    def describe(self) -> dict[str, Any]:
        return {"num_features": self.num_features, "eps": self.eps, "momentum": self.momentum,
                "affine": self.affine, "track_running_stats": self.track_running_stats}

    @classmethod
    def from_description(cls, entry: dict, like: nn.BatchNorm2d) -> ReplacedBatchNorm:
        if int(entry["num_features"]) != like.num_features:
            raise ValueError(f"replaced BatchNorm has {entry['num_features']} features, the model's "
                             f"{like.num_features}")
        momentum = entry["momentum"]
        return cls(int(entry["num_features"]), float(entry["eps"]), None if momentum is None else float(momentum),
                   bool(entry["affine"]), bool(entry["track_running_stats"]))

    @torch.no_grad()
    def to_batchnorm(self, device=None, dtype=None) -> nn.BatchNorm2d:
        """A BatchNorm2d equal to the identity in eval mode: mean 0, var 1 - eps (so var + eps = 1), gamma 1,
        beta 0.  Without running statistics a BatchNorm normalizes by the batch in eval mode too: no identity."""
        if not self.track_running_stats:
            raise ValueError("a BatchNorm without running statistics cannot be an identity in eval mode")
        bn = nn.BatchNorm2d(self.num_features, self.eps, self.momentum, self.affine, True, device=device,
                            dtype=dtype)
        bn.eval()
        running_var = bn.running_var
        assert running_var is not None  # track_running_stats=True
        running_var.fill_(1.0 - self.eps)
        return bn

    def extra_repr(self) -> str:
        return f"replaces BatchNorm2d({self.num_features}, eps={self.eps})"
