"""The one adjust sequence (engine.adjust) the trainer, the Lightning callback and the torchrun example share."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from dyrep_ray.engine.adjust import AdjustHooks, adjust_structure
from dyrep_ray.models import build_model
from dyrep_ray.rep import DyRep, GrowOp, Plan, param_groups_for, structure_graph


def _trained_step():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10)
    dyrep = DyRep(model, seed=0, grow_topk=1)
    optimizer = torch.optim.SGD(param_groups_for(model, 5e-4), lr=0.1, momentum=0.9)
    F.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.randint(0, 10, (4,))).backward()
    dyrep.record_metrics()
    optimizer.step()
    return model, dyrep, optimizer


def test_every_rank_applies_the_broadcast_plan_in_order_and_the_ema_copy_follows():
    model, dyrep, optimizer = _trained_step()
    ema = copy.deepcopy(model)
    local = dyrep.plan()
    # rank 0 decided differently: what arrives by broadcast is what every rank applies
    chosen = next(n for n in dyrep.eligible_names if n not in {g.path for g in local.grow})
    from_rank0 = Plan(grow=(GrowOp(path=chosen, seed=7),), init_gamma=local.init_gamma, cut_mode=local.cut_mode,
                      block_type=local.block_type)
    calls: list[str] = []

    def broadcast(plan: Plan) -> Plan:
        calls.append("broadcast")
        assert plan.grow == local.grow  # the local decision goes in
        return from_rank0

    def recal(net, bns) -> None:
        calls.append("recal model" if net is model else "recal ema" if net is ema else "recal ?")

    hooks = AdjustHooks(broadcast=broadcast, unwrap=lambda: calls.append("unwrap"),
                        place=lambda: calls.append("place"), rewrap=lambda: calls.append("rewrap"))
    adjustment = adjust_structure(dyrep, optimizer, recal, hooks, ema=ema)
    assert adjustment.plan is from_rank0
    assert [(e["op"], e["path"]) for e in adjustment.events] == [("grow", chosen)]
    assert calls == ["broadcast", "unwrap", "recal model", "recal ema", "place", "rewrap"]
    assert structure_graph(ema) == structure_graph(model) != structure_graph(build_model("small_cnn", 10))
    # optimizer surgery: the optimizer holds exactly the grown model's parameters
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters()}
    assert dyrep.adjust_count == 1
