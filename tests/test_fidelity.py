"""The original DyRep's small decisions, checked against its rules re-implemented here from its source
(hunto/image_classification_sota): the static DBB baseline (``--dbb``), optimizer state on grow, the warm-up
schedule, per-epoch BN recalibration and the order nested blocks are cut in.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, StepLR, _LRScheduler

from dyrep_ray.engine.assembly import build_dyrep, build_static_dbb
from dyrep_ray.engine.checkpoint import validate_checkpoint_content
from dyrep_ray.engine.config import TrainConfig
from dyrep_ray.engine.schedule import LRSchedule
from dyrep_ray.models import build_model
from dyrep_ray.rep import DyRep, deploy, restore_graph, structure_graph
from dyrep_ray.rep.blocks import is_block
from dyrep_ray.rep.grow_cut import cut_block
from dyrep_ray.rep.optim import param_groups_for
from dyrep_ray.rep.replaced_bn import ReplacedBatchNorm
from dyrep_ray.report.compare import run_mode
from tests.helpers import final_model, randomize_bn, rel_err, run_local

# The original's branch mask order (dbb_block.py DiverseBranchBlock.branches) and our names for it.
ORIGINAL_BRANCH_ORDER = ("1x1", "1x1_kxk", "1x1_avg", "kxk", "1xk", "kx1", "identity")


# ---------------------------------------------------------------------------
# The static DBB baseline
# ---------------------------------------------------------------------------
def original_dbb_conversion(model: nn.Module) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """``lib/models/utils/dbb_converter.py`` ``convert_to_dbb(model)`` (as ``tools/train.py`` calls it), re-run on
    module paths: {conv path: branch names of its DiverseBranchBlock}, [paths of BatchNorms set to nn.Identity].

    Same control flow: per parent, ``named_children()`` in order; a Conv2d with kernel 3x3 becomes a block with
    ``dbb_branches=[1,1,1,1,0,0,0]`` (``[0,1,1,1,0,0,0]`` where ``padding[0] != kernel_size[0] // 2``) and sets
    ``next_bn``; a BatchNorm2d while ``next_bn`` becomes an identity (and is not walked into); every other child
    (the replaced conv included, which has no children) is walked into with a fresh ``next_bn``.
    """
    convs: dict[str, tuple[str, ...]] = {}
    bns: list[str] = []

    def walk(parent: nn.Module, prefix: str) -> None:
        next_bn = False
        for k, m in parent.named_children():
            path = prefix + k
            if isinstance(m, nn.Conv2d) and m.kernel_size[0] == 3 and m.kernel_size[0] == m.kernel_size[1]:
                mask = [0, 1, 1, 1, 0, 0, 0] if m.padding[0] != m.kernel_size[0] // 2 else [1, 1, 1, 1, 0, 0, 0]
                convs[path] = tuple(n for n, on in zip(ORIGINAL_BRANCH_ORDER, mask) if on)
                next_bn = True
            if isinstance(m, nn.BatchNorm2d) and next_bn:
                bns.append(path)
                next_bn = False
            else:
                walk(m, path + ".")

    walk(model, "")
    return convs, bns


def block_census(model: nn.Module) -> tuple[dict[str, tuple[str, ...]], int]:
    """({block path: branch names}, BatchNorm2d count outside blocks)."""
    blocks = {n: tuple(m.branch_names) for n, m in model.named_modules() if is_block(m)}
    inside = {f"{b}.{n}" for b, m in model.named_modules() if is_block(m) for n, _ in m.named_modules()}
    bns = sum(isinstance(m, nn.BatchNorm2d) and n not in inside for n, m in model.named_modules())
    return blocks, bns


STATIC_DBB = TrainConfig(dbb=True, dyrep=False)
DBB_MODELS = [("resnet18", 1000), ("resnet50", 1000), ("vgg16_cifar", 10), ("mobilenet_v1", 1000),
              ("small_cnn", 10), ("timm/repvgg_a2", 1000)]  # B2g4/B3: A2's structure, 10+ s to build


@pytest.mark.parametrize(("name", "num_classes"), DBB_MODELS)
def test_static_dbb_is_the_original_converters(name, num_classes):
    """``dbb: true`` converts what the original's converter converts, into its branch sets, replaces the same
    BatchNorms by identities, and builds every block new (framework default init, not the conv's weights)."""
    torch.manual_seed(0)
    model = build_model(name, num_classes)
    expected_convs, expected_bns = original_dbb_conversion(model)
    untouched = copy.deepcopy(model)
    build_static_dbb(STATIC_DBB, model)
    blocks, _ = block_census(model)
    assert blocks == expected_convs
    assert sorted(n for n, m in model.named_modules() if isinstance(m, ReplacedBatchNorm)) == sorted(expected_bns)
    for path, block in ((p, model.get_submodule(p)) for p in blocks):
        conv = untouched.get_submodule(path)
        kxk = block.kxk_branch.conv
        fan_in = kxk.weight[0].numel()
        assert kxk.weight.abs().max() <= 1 / math.sqrt(fan_in) + 1e-7  # nn.Conv2d's default (kaiming_uniform a=√5)
        assert not torch.equal(kxk.weight, conv.weight)
        for bn in (m for m in block.modules() if isinstance(m, nn.BatchNorm2d)):
            assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and not bn.bias.any()


def test_static_dbb_done_when_figures():
    """ResNet-18: 16 blocks, none at the 7x7 stem, each with exactly the four branches, 4 BatchNorms outside blocks
    (the stem's and the three downsample ones); VGG-16 and MobileNet-v1 by the same rule."""
    four = ("1x1", "1x1_kxk", "1x1_avg", "kxk")
    expected = {"resnet18": (16, 4), "vgg16_cifar": (13, 0), "mobilenet_v1": (14, 13)}
    for name, (n_blocks, n_bns) in expected.items():
        model = build_model(name, 10)
        build_static_dbb(STATIC_DBB, model)
        blocks, bns = block_census(model)
        assert (len(blocks), bns) == (n_blocks, n_bns), name
        assert set(blocks.values()) == {four}, name
        if name == "resnet18":
            assert "conv1" not in blocks and model.conv1.kernel_size == (7, 7)


def test_every_conv_option_keeps_the_first_versions_baseline():
    model = build_model("resnet18", 10)
    build_static_dbb(STATIC_DBB.replace(dbb_convert="every_conv"), model)
    blocks, bns = block_census(model)
    assert len(blocks) == 17 and "conv1" in blocks and bns == 20


def test_static_dbb_deploys_into_the_untouched_architecture():
    """Deploy folds every block and puts back the BatchNorm the converter replaced (an eval-mode identity that
    takes the folded conv's bias): the same function, strict-loadable into a never-converted model.  The
    structure graph (with the replaced BatchNorms) rebuilds the trained model and passes checkpoint validation."""
    torch.manual_seed(1)
    model = build_model("resnet18", 10).double()
    build_static_dbb(STATIC_DBB, model)
    randomize_bn(model, 3)
    model.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    deployed = deploy(model)
    assert not any(is_block(m) or isinstance(m, ReplacedBatchNorm) for m in deployed.modules())
    plain = build_model("resnet18", 10).double().eval()
    plain.load_state_dict(deployed.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(plain(x), before) <= 1e-10
    graph = json.loads(json.dumps(structure_graph(model)))
    assert sum(e["type"] == "identity_bn" for e in graph["blocks"]) == 16
    validate_checkpoint_content("ckpt", {"epoch": 1, "global_step": 1}, graph, {"model": model.state_dict()})
    rebuilt = restore_graph(build_model("resnet18", 10).double(), graph)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(rebuilt.eval()(x), before) <= 1e-10


def test_static_dbb_run_trains_resumes_its_structure_and_converts(tmp_path):
    from dyrep_ray.export import convert_checkpoint

    run_dir = tmp_path / "dbb"
    run_local(run_dir, ["synthetic_train_size=64", "synthetic_val_size=32", "batch_size=32", "epochs=1",
                        "dyrep=false", "dbb=true"])
    model, _ = final_model(run_dir)
    assert sum(isinstance(m, ReplacedBatchNorm) for m in model.modules()) == 5  # small_cnn: five 3x3 conv-BN
    info = convert_checkpoint(run_dir, tmp_path / "deployed.safetensors").info
    assert info["strict_load"] is True and info["top1_after"] == pytest.approx(info["top1_before"])


def test_compare_labels_which_baseline_a_run_built():
    assert run_mode({"dbb": True, "dyrep": False, "dbb_convert": "original"}) == "DBB"
    assert run_mode({"dbb": True, "dyrep": False, "dbb_convert": "every_conv"}) == "DBB (every conv)"
    assert run_mode({"dbb": True, "dyrep": False}) == "DBB (every conv)"  # a run dir from before the key


# ---------------------------------------------------------------------------
# Optimizer state on grow
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("block", ["bn", "online"])
def test_grow_restarts_the_grown_blocks_optimizer_state(block):
    """``lib/models/utils/dyrep.py``: ``DyRep._grow`` builds a new DiverseBranchBlock whose ``_reset_dbb`` copies the
    conv's kernel into its own new kxk conv (``weight.data.copy_``) and hands it the conv's bias Parameter;
    ``_reset_optimizer`` keeps state only for parameter objects still in the model.  So after a grow the grown
    block's parameters (the conv's bias excepted) have no state and every surviving parameter keeps its own."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Flatten(),
                          nn.LazyLinear(4))
    model(torch.randn(2, 3, 6, 6))
    dyrep = build_dyrep(TrainConfig(dyrep_block=block), model)
    optimizer = torch.optim.SGD(param_groups_for(model, 5e-4), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    optimizer.step()
    before = {id(p): optimizer.state[p]["momentum_buffer"] for p in model.parameters()}
    conv_bias = model[0].bias
    dyrep.grow("0", optimizer=optimizer)
    for name, p in model.named_parameters():
        if name.startswith("0.") and p is not conv_bias:
            assert "momentum_buffer" not in optimizer.state[p], name
        elif id(p) in before:
            assert optimizer.state[p]["momentum_buffer"] is before[id(p)], name
    carry = build_dyrep(TrainConfig(dyrep_block=block, dyrep_grow_optim_state="carry"), model)
    weight = model[3].weight
    carry.grow("3", optimizer=optimizer)
    assert optimizer.state[weight]["momentum_buffer"] is before[id(weight)]


# ---------------------------------------------------------------------------
# Warm-up
# ---------------------------------------------------------------------------
class OriginalGradualWarmupScheduler(_LRScheduler):
    """``lib/utils/scheduler.py`` ``GradualWarmupScheduler`` as written there (the ReduceLROnPlateau paths and
    the multiplier > 1 formula left out: ``tools/train.py`` builds neither)."""

    def __init__(self, optimizer, multiplier, total_epoch, after_scheduler=None, warmup_lr=1e-6, step_size=1,
                 decay_by_epoch=True):
        self.multiplier = multiplier
        self.total_epoch = total_epoch
        self.after_scheduler = after_scheduler
        self.warmup_lr = warmup_lr
        self.step_size = step_size
        self.finished = False
        if self.total_epoch == 0:
            self.finished = True
            self.total_epoch = -1
        self.decay_by_epoch = decay_by_epoch
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch > self.total_epoch or self.finished:
            if self.after_scheduler:
                if not self.finished:
                    self.after_scheduler.base_lrs = [base_lr * self.multiplier for base_lr in self.base_lrs]
                    self.finished = True
                if self.after_scheduler.last_epoch == 0:
                    # the torch the original ran on (1.x): get_lr() at last_epoch 0 is the group's lr; torch 2's
                    # recursive cosine formula would bump it for this one step
                    return [group["lr"] for group in self.optimizer.param_groups]
                return self.after_scheduler.get_lr()
            return [base_lr * self.multiplier for base_lr in self.base_lrs]
        return [self.warmup_lr + (base_lr - self.warmup_lr)
                * (float(self.last_epoch // self.step_size * self.step_size) / self.total_epoch)
                for base_lr in self.base_lrs]

    def step(self, epoch=None, metrics=None):
        if self.finished and self.after_scheduler:
            if epoch is None:
                self.after_scheduler.step(None)
            elif self.decay_by_epoch:
                self.after_scheduler.step((epoch - self.total_epoch - 1) // self.step_size * self.step_size)
            else:
                self.after_scheduler.step(epoch - self.total_epoch - 1)
            self._last_lr = self.after_scheduler.get_lr()
        else:
            return super().step(epoch)


def original_lrs(sched, base_lr, epochs, spe, warmup_epochs, warmup_lr, decay_epochs, decay_rate, decay_by_epoch,
                 min_lr):
    """The LR of every training step as ``tools/train.py`` drives ``build_scheduler``'s scheduler: read by the
    step, then ``scheduler.step(epoch * len(loader) + batch_idx + 1)``."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)
    warmup_steps, total_steps = warmup_epochs * spe, epochs * spe
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if sched == "step":
            after = StepLR(optimizer, decay_epochs * spe, gamma=decay_rate)
            decay_by_epoch = False
        else:
            after = CosineAnnealingLR(optimizer, T_max=total_steps - warmup_steps, eta_min=min_lr)
        scheduler = OriginalGradualWarmupScheduler(optimizer, 1, warmup_steps, after, warmup_lr, spe, decay_by_epoch)
        lrs = []
        for epoch in range(epochs):
            for batch_idx in range(spe):
                lrs.append(optimizer.param_groups[0]["lr"])
                scheduler.step(epoch * spe + batch_idx + 1)
    return lrs


@pytest.mark.parametrize(("sched", "warmup_epochs", "decay_by_epoch", "decay_epochs"), [
    ("cosine", 3, True, 30), ("cosine", 3, False, 30), ("cosine", 0, True, 30), ("cosine", 0, False, 30),
    ("step", 2, True, 2.4), ("step", 0, True, 3),
])
def test_schedule_matches_the_original_step_by_step(sched, warmup_epochs, decay_by_epoch, decay_epochs):
    """The warm-up rises once per epoch in every recipe (``last_epoch // step_size * step_size``), with
    ``decay_by_epoch: false`` too, and the decay after it follows the original's step arithmetic."""
    epochs, spe = 8, 5
    kw = dict(sched=sched, min_lr=1e-5, warmup_epochs=warmup_epochs, warmup_lr=1e-4, decay_epochs=decay_epochs,
              decay_rate=0.1, decay_by_epoch=decay_by_epoch)
    expected = original_lrs(base_lr=0.1, epochs=epochs, spe=spe, **kw)
    ours = LRSchedule.from_config(TrainConfig(lr=0.1, epochs=epochs, **kw))
    got = [ours.lr_for_step(e, b, spe) for e in range(epochs) for b in range(spe)]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    if warmup_epochs:
        assert len(set(got[:spe])) == 1  # constant within the first warm-up epoch


# ---------------------------------------------------------------------------
# BN recalibration every epoch
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(("without_dyrep", "calls"), [(False, 0), (True, 1)])
def test_every_epoch_recalibration_only_with_dyrep(monkeypatch, tmp_path, without_dyrep, calls):
    """``tools/train.py``: ``recal_bn(model.module, train_loader, 200)`` sits inside ``if dyrep is not None:``, so
    a run without DyRep never recalibrates (``recal_bn_without_dyrep: true`` keeps the first version's)."""
    import dyrep_ray.engine.loop as loop

    seen = []
    real = loop.recalibrate_bn
    monkeypatch.setattr(loop, "recalibrate_bn", lambda *a, **k: seen.append(1) or real(*a, **k))
    run_local(tmp_path / "run", ["synthetic_train_size=64", "synthetic_val_size=32", "batch_size=32", "epochs=1",
                                 "dyrep=false", "dyrep_recal_bn_every_epoch=true",
                                 "dyrep_recal_bn_every_epoch_iters=1", f"recal_bn_without_dyrep={without_dyrep}"])
    assert len(seen) == calls


# ---------------------------------------------------------------------------
# Nested cut order
# ---------------------------------------------------------------------------
def original_adjust_cuts(model: nn.Module, threshold: float = 0.1, std_gate: float = 0.02) -> None:
    """``DyRep.adjust_model``'s cut loop (``lib/models/utils/dyrep.py``): blocks in ``named_modules()`` order, each
    judged on its state at its turn (after the cuts before it) with ``branch_weights`` (mean|gamma| over the kxk
    branch's, -1 where absent) and cut by ``_cut`` (skipped when its path is gone).  The cut itself is ours
    (checked against the original's ``cut_branch`` in test_dbb.py)."""
    for path in [n for n, m in model.named_modules() if is_block(m)]:
        try:
            block = model.get_submodule(path)
        except AttributeError:
            continue
        if not is_block(block):
            continue
        kxk = block.branch_gate("kxk").detach().abs().mean()
        weights = [float(block.branch_gate(n).detach().abs().mean() / kxk) if n in block.branches else -1.0
                   for n in ORIGINAL_BRANCH_ORDER]
        weights[3] = 1.0
        valid = torch.tensor([x for x in weights[:3] + weights[4:] if x not in (-1, 1)])
        if valid.numel() > 1 and valid.std() > std_gate:
            mean = valid.mean()
            cut = [ORIGINAL_BRANCH_ORDER[i] for i, w in enumerate(weights) if w < mean and w < threshold and w != -1]
            if cut:
                cut_block(model, path, cut)


def test_nested_block_is_judged_after_its_outer_blocks_cut():
    """A block nested in the kxk branch of a block that is cut is re-initialised by that cut before its own turn:
    the original then finds its branches equal and keeps them all."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
    dyrep = DyRep(model, grow_topk=0)
    dyrep.grow("0")
    dyrep.grow("0.branches.kxk.conv")
    with torch.no_grad():
        for block in (model[0], model.get_submodule("0.branches.kxk.conv")):
            for name in block.branch_names:
                block.branch_gate(name).fill_({"kxk": 1.0, "1x1": 0.01}.get(name, 0.5))
    expected = copy.deepcopy(model)
    original_adjust_cuts(expected)
    dyrep.step()
    assert structure_graph(model) == structure_graph(expected)
    assert "1x1" in model.get_submodule("0.branches.kxk.conv").branch_names
