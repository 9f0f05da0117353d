"""The DyRep algorithm in pure PyTorch (no Ray, no I/O).

Public API::

    from dyrep_ray.rep import DyRep, DiverseBranchBlock, deploy
"""

from .block_base import RepBlock
from .blocks import BLOCK_CLASSES, BLOCK_TYPE_NAMES, BLOCK_TYPES, is_block, register_block_type
from .bn import recalibrate_bn
from .controller import DyRep
from .dbb import DiverseBranchBlock
from .dbb_convert import convert_to_dbb_original
from .deploy import DeployError, deploy, max_output_difference
from .geometry import BRANCH_NAMES, allowed_branches
from .graph import restore_graph, structure_graph
from .grow_cut import apply_plan, convert_to_dbb
from .online import OnlineBlock
from .optim import param_groups_for, update_optimizer
from .paths import eligible_convs
from .plan import CutEvent, CutOp, GrowEvent, GrowOp, Plan, event_from_json

__all__ = [
    "BLOCK_CLASSES",
    "BLOCK_TYPES",
    "BLOCK_TYPE_NAMES",
    "BRANCH_NAMES",
    "CutEvent",
    "CutOp",
    "DeployError",
    "DiverseBranchBlock",
    "DyRep",
    "GrowEvent",
    "GrowOp",
    "OnlineBlock",
    "Plan",
    "RepBlock",
    "allowed_branches",
    "apply_plan",
    "convert_to_dbb",
    "convert_to_dbb_original",
    "deploy",
    "eligible_convs",
    "is_block",
    "event_from_json",
    "max_output_difference",
    "param_groups_for",
    "recalibrate_bn",
    "register_block_type",
    "restore_graph",
    "structure_graph",
    "update_optimizer",
]
