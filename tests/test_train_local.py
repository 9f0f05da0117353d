"""--local: the same training loop in-process, without Ray."""

from __future__ import annotations

import json

import pytest
import torch

from dyrep_ray.engine.config import load_config
from dyrep_ray.engine.context import LocalContext
from dyrep_ray.engine.faults import FAULT_ENV
from dyrep_ray.engine.loop import METRICS_FILE, STRUCTURE_FILE, model_digest, train
from tests.helpers import final_model

REQUIRED_KEYS = {"epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "params", "n_blocks",
                 "epoch_time_s", "images_per_s", "events"}
LOCAL_TINY = ["synthetic_train_size=256", "synthetic_val_size=128", "batch_size=32", "dyrep_recal_bn_iters=2",
              "epochs=3", "dyrep_grow_topk=2"]


def _run_local(run_dir, overrides):
    cfg = load_config(None, overrides)
    return cfg, train(cfg, LocalContext(torch.device("cpu"), run_dir, cfg.keep_checkpoints))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("local") / "ref"
    cfg, summary = _run_local(run_dir, LOCAL_TINY)
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


def test_interrupted_local_run_resumes_exactly(reference_run, tmp_path, monkeypatch):
    ref_dir, cfg, _ = reference_run
    run_dir = tmp_path / "interrupted"
    monkeypatch.setenv(FAULT_ENV, f"raise:epoch=3:rank=0:marker={tmp_path / 'fired'}")
    with pytest.raises(RuntimeError, match="injected fault"):
        _run_local(run_dir, LOCAL_TINY)
    assert (tmp_path / "fired").exists()
    assert len(json.loads("[" + ",".join((run_dir / METRICS_FILE).read_text().splitlines()) + "]")) == 2
    _run_local(run_dir, LOCAL_TINY)  # same command again: resumes from epoch 2
    resumed, ckpt_b = final_model(run_dir)
    reference, ckpt_a = final_model(ref_dir)
    assert ckpt_a.graph == ckpt_b.graph
    ref_state, new_state = reference.state_dict(), resumed.state_dict()
    assert ref_state.keys() == new_state.keys()
    worst = max((ref_state[k].double() - new_state[k].double()).abs().max().item() for k in ref_state)
    assert worst <= 1e-6, worst
    assert model_digest(reference) == model_digest(resumed)
    epochs = [json.loads(x)["epoch"] for x in (run_dir / METRICS_FILE).read_text().splitlines()]
    assert epochs == [1, 2, 3]
