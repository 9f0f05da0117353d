"""The original DyRep's cut rule: which of a block's branches to cut, from their relative gates."""

from __future__ import annotations

import torch

# Below this |kxk_scale()| (bn block: kxk BN gamma; online block: kxk scale) the kxk branch cannot absorb a
# cut branch without blowing up (cut_mode="absorb").
MIN_ABSORB_GAMMA = 1e-8


def cut_decision(weights: dict[str, float], threshold: float, std_gate: float,
                 cut_lone_branch: bool = False) -> list[str]:
    """Branches to cut, given each present non-kxk branch's weight (mean|gamma| / kxk's).

    The original DyRep's rule: ``valid`` = the weights that are not exactly 1.0; if the
    *unbiased* std of ``valid`` exceeds ``std_gate``, cut every branch whose weight is below
    both mean(valid) and ``threshold``.  With fewer than two valid weights the std is
    undefined and nothing is cut, and with two or more the largest always survives: a block
    never collapses back to a plain conv.  ``cut_lone_branch=True`` (dyrep-ray's first
    version) also cuts a block's only remaining branch when its weight is below
    ``threshold``, collapsing the block into a conv that may grow again later.
    """
    if cut_lone_branch and len(weights) == 1:
        (name, value), = weights.items()
        return [name] if value < threshold else []
    valid = [v for v in weights.values() if v != 1.0]
    if len(valid) < 2:
        return []
    vals = torch.tensor(valid, dtype=torch.float64)
    if not float(vals.std(unbiased=True)) > std_gate:
        return []
    mean = float(vals.mean())
    return [n for n, v in weights.items() if v < mean and v < threshold]
