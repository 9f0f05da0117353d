"""The DyRep algorithm in pure PyTorch (no Ray, no I/O).

Public API::

    from dyrep_ray.rep import DyRep, DiverseBranchBlock, deploy
"""

from .bn import recalibrate_bn
from .dbb import BRANCH_NAMES, DiverseBranchBlock, allowed_branches
from .deploy import DeployError, deploy, max_output_difference
from .dyrep import (
    DyRep,
    apply_plan,
    convert_to_dbb,
    eligible_convs,
    restore_graph,
    structure_graph,
)
from .optim import param_groups_for, update_optimizer
from .plan import CutEvent, CutOp, GrowEvent, GrowOp, Plan, event_from_json

__all__ = [
    "BRANCH_NAMES",
    "CutEvent",
    "CutOp",
    "DeployError",
    "DiverseBranchBlock",
    "DyRep",
    "GrowEvent",
    "GrowOp",
    "Plan",
    "allowed_branches",
    "apply_plan",
    "convert_to_dbb",
    "deploy",
    "eligible_convs",
    "event_from_json",
    "max_output_difference",
    "param_groups_for",
    "recalibrate_bn",
    "restore_graph",
    "structure_graph",
    "update_optimizer",
]
