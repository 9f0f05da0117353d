"""DyRep in loops dyrep-ray does not own: the runnable examples under examples/, run as real processes.

(a) examples/torchrun_ddp.py under ``torch.distributed.run`` with 2 gloo processes;
(b) examples/lightning_dyrep.py with Lightning's DDP strategy, 2 CPU processes on gloo.
Each grows, proves every rank holds identical structure + weights after each adjust, and resumes from
its checkpoint with the grown structure, the same weights and the same optimizer state per parameter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dyrep_ray.data.synthetic import build_synthetic
from dyrep_ray.integrations.common import canonical_param_order
from dyrep_ray.models import build_model
from dyrep_ray.rep import DyRep, param_groups_for, structure_graph

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PROCESSES = 2
FIRST_EPOCHS = 3  # adjusts after epochs 1 and 2 (never after the last)
RESUMED_EPOCHS = 4
SMALL_RUN = ["--train-size", "256", "--image-size", "16", "--batch-size", "32"]
RUN_TIMEOUT_S = 300


def run_example(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                            "LOCAL_RANK")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False,
                          timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, f"example failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def n_blocks(graph: dict) -> int:
    return sum(entry["type"] == "dbb" for entry in graph["blocks"])


def check_first_run(report: dict) -> None:
    assert report["world_size"] == PROCESSES
    grows = [e for a in report["adjusts"] for e in a["events"] if e["op"] == "grow"]
    assert grows, f"no growth in {report['adjusts']}"
    assert n_blocks(report["final_graph"]) >= 1
    for adjust in report["adjusts"]:
        assert len(adjust["digests"]) == PROCESSES
        assert len(set(adjust["digests"])) == 1, f"replicas differ after the adjust at epoch {adjust['epoch']}"
    assert len(set(report["final_param_digests"])) == 1, "replicas' parameters differ at the end"


def check_resumed_run(first: dict, resumed: dict) -> None:
    assert resumed["start_epoch"] == FIRST_EPOCHS
    assert resumed["start_graph"] == first["final_graph"], "resume did not rebuild the grown structure"
    assert resumed["start_digests"] == [first["checkpoint_digest"]] * PROCESSES, "resumed weights differ"
    assert resumed["start_optimizer_digest"] == first["checkpoint_optimizer_digest"], \
        "optimizer state came back onto different parameters"
    assert len(set(resumed["final_param_digests"])) == 1


def test_param_order_matches_a_fresh_optimizer_after_growth():
    model = build_model("small_cnn", 10)
    dyrep = DyRep(model, seed=0, grow_optim_state="carry")  # every surviving buffer stays (default: restart)
    optimizer = torch.optim.SGD(param_groups_for(model, 5e-4), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    optimizer.step()  # momentum buffers exist and must follow their parameters
    before = {id(p): optimizer.state[p]["momentum_buffer"] for g in optimizer.param_groups for p in g["params"]}
    dyrep.grow(dyrep.eligible_names[0], optimizer=optimizer)
    fresh = [[id(p) for p in g["params"]] for g in param_groups_for(model, 5e-4)]
    # DyRep's surgery already keeps module order (it used to append new params: canonical_param_order's job)
    assert [[id(p) for p in g["params"]] for g in optimizer.param_groups] == fresh
    for group in optimizer.param_groups:  # what surgery of one's own could leave: reversed groups
        group["params"].reverse()
    assert [[id(p) for p in g["params"]] for g in optimizer.param_groups] != fresh
    canonical_param_order(optimizer, model)
    assert [[id(p) for p in g["params"]] for g in optimizer.param_groups] == fresh
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in before:
                assert optimizer.state[p]["momentum_buffer"] is before[id(p)]


def test_torchrun_ddp_example_grows_keeps_replicas_equal_and_resumes(tmp_path):
    script = str(EXAMPLES / "torchrun_ddp.py")
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(PROCESSES), script]
    first_report, resumed_report = tmp_path / "first.json", tmp_path / "resumed.json"
    run_example([*launcher, "--epochs", str(FIRST_EPOCHS), "--out", str(tmp_path), "--report", str(first_report),
                 *SMALL_RUN])
    first = json.loads(first_report.read_text())
    check_first_run(first)
    assert [a["epoch"] for a in first["adjusts"]] == list(range(1, FIRST_EPOCHS))
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["graph"] == first["final_graph"] and checkpoint["epoch"] == FIRST_EPOCHS

    run_example([*launcher, "--epochs", str(RESUMED_EPOCHS), "--out", str(tmp_path), "--resume",
                 "--report", str(resumed_report), *SMALL_RUN])
    resumed = json.loads(resumed_report.read_text())
    check_resumed_run(first, resumed)
    assert [e["epoch"] for e in resumed["epochs"]] == list(range(FIRST_EPOCHS + 1, RESUMED_EPOCHS + 1))


def test_lightning_callback_ddp_grows_keeps_replicas_equal_and_resumes_from_ckpt_path(tmp_path):
    from dyrep_ray.integrations.lightning import GRAPH_KEY

    script = str(EXAMPLES / "lightning_dyrep.py")
    common = [script, "--devices", str(PROCESSES), "--out", str(tmp_path / "ckpt"), *SMALL_RUN]
    first_report, resumed_report = tmp_path / "first.json", tmp_path / "resumed.json"
    run_example([*common, "--epochs", str(FIRST_EPOCHS), "--report", str(first_report)])
    first = json.loads(first_report.read_text())
    check_first_run(first)
    assert first["epochs_completed"] == FIRST_EPOCHS
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)  # plain data, no pickled code
    assert checkpoint[GRAPH_KEY] == first["final_graph"]

    run_example([*common, "--epochs", str(RESUMED_EPOCHS), "--resume", "--report", str(resumed_report)])
    resumed = json.loads(resumed_report.read_text())
    check_resumed_run(first, resumed)
    assert resumed["epochs_completed"] == RESUMED_EPOCHS
    # The callback's own state (event history) came back from the checkpoint too.
    assert resumed["events"][: len(first["events"])] == first["events"]


def test_lightning_restore_structure_is_idempotent_and_ignores_plain_checkpoints():
    from dyrep_ray.integrations.lightning import GRAPH_KEY, restore_structure

    grown = build_model("small_cnn", 10)
    dyrep = DyRep(grown, seed=0)
    dyrep.grow(dyrep.eligible_names[0])
    checkpoint = {GRAPH_KEY: structure_graph(grown), "state_dict": grown.state_dict()}
    fresh = build_model("small_cnn", 10)
    assert restore_structure(fresh, {"state_dict": {}}) is False
    assert restore_structure(fresh, checkpoint) is True
    assert restore_structure(fresh, checkpoint) is True  # second call: already that structure, no error
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    assert structure_graph(fresh) == checkpoint[GRAPH_KEY]


def test_lightning_single_device_weights_only_checkpoint_still_carries_the_graph(tmp_path):
    """Lightning skips callbacks' on_save_checkpoint for weights-only checkpoints; the graph must still be there."""
    import lightning.pytorch as pl

    from dyrep_ray.integrations.lightning import GRAPH_KEY, DyRepCallback, restore_structure  # noqa: I001

    spec = importlib.util.spec_from_file_location("lightning_dyrep_example", EXAMPLES / "lightning_dyrep.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    train_ds, _, _ = build_synthetic(image_size=16, seed=0, train_size=128, val_size=8)
    callback = DyRepCallback(recal_bn_batches=2, seed=0)
    checkpointing = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_weights_only=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, callbacks=[callback, checkpointing],
                         logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    model = example.LitClassifier(lr=0.05, epochs=2)
    trainer.fit(model, DataLoader(train_ds, batch_size=32, shuffle=True))
    assert [e["op"] for e in callback.events] == ["grow"]  # one adjust: after epoch 1 of 2
    assert "on_load_checkpoint" not in vars(model)  # teardown removed the per-instance hooks

    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert "optimizer_states" not in checkpoint and checkpoint[GRAPH_KEY] == structure_graph(model)
    fresh = example.LitClassifier(lr=0.05, epochs=2)
    restore_structure(fresh, checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
