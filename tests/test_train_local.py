"""--local: the same training loop in-process, without Ray."""

from __future__ import annotations

import json

import pytest
import torch

from dyrep_ray.engine.faults import RaiseAt
from dyrep_ray.engine.loop import model_digest
from dyrep_ray.rundir.layout import METRICS_FILE, STRUCTURE_FILE
from tests.helpers import LOCAL_TINY, RESUME_ATOL, final_model, max_abs_diff, run_local, run_metrics

REQUIRED_KEYS = {"epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "params", "n_blocks",
                 "epoch_time_s", "images_per_s", "events"}
EMA_MICRO = ["synthetic_train_size=96", "synthetic_val_size=32", "batch_size=32", "dyrep_recal_bn_iters=1",
             "epochs=3", "model_ema=true", "model_ema_decay=0.9"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("local") / "ref"
    cfg, summary = run_local(run_dir, LOCAL_TINY)
    return run_dir, cfg, summary


def test_local_run_writes_metrics_events_and_structure(reference_run):
    run_dir, cfg, summary = reference_run
    lines = [json.loads(x) for x in (run_dir / METRICS_FILE).read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    for m in lines:
        assert REQUIRED_KEYS <= m.keys()
    grows = [e for m in lines for e in m["events"] if e["op"] == "grow"]
    # adjust every epoch except after the last one, top-2 each time
    assert len(grows) == 4 and summary["grows"] == 4
    assert lines[-1]["n_blocks"] >= 2 and lines[-1]["params"] > summary["deployed_params"]
    graph = json.loads((run_dir / STRUCTURE_FILE).read_text())
    assert {b["path"] for b in graph["blocks"] if b["type"] == "dbb"} >= {g["path"] for g in grows[-2:]}
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 3


def test_checkpoint_restores_structure_and_weights(reference_run):
    run_dir, cfg, _ = reference_run
    model, ckpt = final_model(run_dir)
    assert ckpt.graph == json.loads((run_dir / STRUCTURE_FILE).read_text())
    # same weights => same validation accuracy as the run reported
    from dyrep_ray.data import build_datasets

    _, val, _ = build_datasets("synthetic", seed=cfg.seed, synthetic_train_size=256, synthetic_val_size=128)
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.tensor([val[i][1] for i in range(len(val))])
    model.eval()
    with torch.no_grad():
        top1 = 100.0 * (model(x).argmax(1) == y).float().mean().item()
    reported = json.loads((run_dir / METRICS_FILE).read_text().splitlines()[-1])["val_top1"]
    assert abs(top1 - reported) < 1e-6


def test_interrupted_local_run_resumes_exactly(reference_run, tmp_path):
    ref_dir, cfg, _ = reference_run
    run_dir = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="injected fault"):
        run_local(run_dir, LOCAL_TINY, [RaiseAt(epoch=2, marker=str(tmp_path / "fired"))])
    assert (tmp_path / "fired").exists()
    assert len(json.loads("[" + ",".join((run_dir / METRICS_FILE).read_text().splitlines()) + "]")) == 2
    run_local(run_dir, LOCAL_TINY)  # same command again: resumes from epoch 2
    resumed, ckpt_b = final_model(run_dir)
    reference, ckpt_a = final_model(ref_dir)
    assert ckpt_a.graph == ckpt_b.graph
    ref_state, new_state = reference.state_dict(), resumed.state_dict()
    assert ref_state.keys() == new_state.keys()
    worst = max_abs_diff(ref_state, new_state)
    assert worst <= RESUME_ATOL, worst
    assert model_digest(reference) == model_digest(resumed)
    epochs = [json.loads(x)["epoch"] for x in (run_dir / METRICS_FILE).read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_ema_run_resumes_from_a_checkpoint_with_grown_blocks(tmp_path):
    """The EMA copy is built from the restored model, so it has the checkpoint's blocks before its state loads."""
    run_local(tmp_path / "ref", EMA_MICRO)
    run_dir = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="injected fault"):
        run_local(run_dir, EMA_MICRO, [RaiseAt(epoch=2, marker=str(tmp_path / "fired"))])
    run_local(run_dir, EMA_MICRO)  # resumes from epoch 2, whose checkpoint holds the blocks grown after epoch 1
    reference, resumed = run_metrics(tmp_path / "ref"), run_metrics(run_dir)
    assert reference[1]["n_blocks"] > 0 and [m["epoch"] for m in resumed] == [1, 2, 3]
    assert [m["n_blocks"] for m in resumed] == [m["n_blocks"] for m in reference]
    ema_keys = ("ema_val_loss", "ema_val_top1", "ema_val_top5")
    assert [resumed[2][k] for k in ema_keys] == pytest.approx([reference[2][k] for k in ema_keys], abs=1e-6)
