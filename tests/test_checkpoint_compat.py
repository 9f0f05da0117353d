"""Run directories written by an earlier version of dyrep-ray still load and resume.

``tests/data/legacy_runs/{bn,online}`` were written by commit 79ab219 (before the block contract and the config
split): a 2-epoch ``--local --cpu`` run of the built-in config with ``dyrep_adjust_interval=1`` (two grown blocks),
cut down to the newest checkpoint, plus the logits that version's rebuilt model gave on a seeded input
(``reference_logits.pt``).  See ``tests/data/legacy_runs/README.md`` for the exact command.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dyrep_ray.cli import main
from dyrep_ray.rep.blocks import is_block
from dyrep_ray.rundir.layout import METRICS_FILE, TRAIN_LOG
from tests.helpers import final_model

LEGACY = Path(__file__).parent / "data" / "legacy_runs"
#: The legacy run's own settings: resuming with different ones would be refused as a config change.
LEGACY_SETTINGS = ["synthetic_train_size=128", "synthetic_val_size=64", "batch_size=32", "dyrep_recal_bn_iters=2",
                   "dyrep_adjust_interval=1", "dyrep_grow_topk=2"]
#: What that version did where today's defaults follow the original instead (config keys it did not have yet).
LEGACY_BEHAVIOUR = ["dyrep_grow_optim_state=carry", "dyrep_cut_order=inner_first"]
LOGITS_ATOL = 1e-5


@pytest.mark.parametrize("block", ["bn", "online"])
def test_legacy_checkpoint_rebuilds_the_same_model(block):
    model, ckpt = final_model(LEGACY / block)
    assert ckpt.meta["epoch"] == 2
    assert sum(1 for m in model.modules() if is_block(m)) == 2
    reference = torch.load(LEGACY / block / "reference_logits.pt", weights_only=True)
    model.eval()
    with torch.no_grad():
        logits = model(reference["input"])
    torch.testing.assert_close(logits, reference["logits"], atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("block", ["bn", "online"])
def test_legacy_run_directory_resumes_past_its_last_epoch(block, tmp_path):
    shutil.copytree(LEGACY / block, tmp_path / block)
    argv = ["train", "--local", "--cpu", "--quiet", "--output", str(tmp_path), "--name", block]
    for setting in [*LEGACY_SETTINGS, *LEGACY_BEHAVIOUR, f"dyrep_block={block}", "epochs=3"]:
        argv += ["--set", setting]
    assert main(argv) == 0
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / block / METRICS_FILE).read_text().splitlines()]
    assert epochs == [1, 2, 3]
    _, ckpt = final_model(tmp_path / block)
    assert ckpt.meta["epoch"] == 3
    # The resume appends to the old train.log; what it logs names multiply-accumulates MACs.
    appended = (tmp_path / block / TRAIN_LOG).read_text()[len((LEGACY / block / TRAIN_LOG).read_text()):]
    assert " MMACs" in appended and "FLOPs" not in appended


def test_legacy_run_directory_resumed_with_todays_defaults_is_refused_naming_the_option(tmp_path, capsys):
    """A run started before dyrep_grow_optim_state / dyrep_cut_order existed carried momentum over and cut innermost
    first; resuming it with today's defaults (the original's behaviour) would change that mid-run: refused with
    one line naming the setting that restores it; the run's checkpoint, config and records stay as they were."""
    shutil.copytree(LEGACY / "bn", tmp_path / "bn")
    before = {p: p.read_bytes() for p in (tmp_path / "bn").rglob("*") if p.is_file()}
    before.pop(tmp_path / "bn" / TRAIN_LOG)  # the refusal is logged there too
    argv = ["train", "--local", "--cpu", "--quiet", "--output", str(tmp_path), "--name", "bn"]
    for setting in [*LEGACY_SETTINGS, "dyrep_cut_order=inner_first", "epochs=3"]:
        argv += ["--set", setting]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert any("dyrep_grow_optim_state" in line and "dyrep_grow_optim_state=carry" in line for line in err), err
    assert {p: p.read_bytes() for p in before} == before
