"""The trainer's seams: callbacks, the TrainContext / DataSource protocols, typed run files, one default owner."""

from __future__ import annotations

import json

import pytest
import torch

from dyrep_ray.data import AUG_KEYS, AugConfig
from dyrep_ray.engine.callbacks import TrainerCallback
from dyrep_ray.engine.config import TrainConfig, load_config
from dyrep_ray.engine.context import LocalContext
from dyrep_ray.engine.data_source import TorchDataSource
from dyrep_ray.engine.loop import Trainer
from dyrep_ray.engine.protocols import DataSource, TrainContext
from dyrep_ray.rundir.files import CheckpointMeta, EpochMetrics, parse_metrics, plain_params_from
from dyrep_ray.rundir.layout import CHECKPOINT_PREFIX, META_FILE
from dyrep_ray.rundir.storage import RunStorage
from tests.helpers import run_metrics

MICRO = ["synthetic_train_size=96", "synthetic_val_size=32", "batch_size=32", "dyrep_recal_bn_iters=1", "epochs=2"]


class Recorder(TrainerCallback):
    def __init__(self):
        self.calls = []

    def on_fit_start(self, trainer):
        self.calls.append(("fit_start",))

    def on_step_end(self, trainer, epoch, step, loss):
        assert isinstance(loss, torch.Tensor) and not loss.requires_grad
        self.calls.append(("step", epoch, step))

    def on_epoch_end(self, trainer, metrics):
        self.calls.append(("epoch", metrics))

    def on_adjust(self, trainer, epoch, events):
        self.calls.append(("adjust", epoch, events))

    def on_checkpoint(self, trainer, epoch):
        self.calls.append(("checkpoint", epoch))

    def on_fit_end(self, trainer, summary):
        self.calls.append(("fit_end", summary))


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("arch") / "run"
    cfg = load_config(None, MICRO)
    recorder = Recorder()
    ctx = LocalContext(torch.device("cpu"), run_dir, cfg.keep_checkpoints)
    trainer = Trainer.from_config(cfg, ctx, callbacks=[recorder])
    summary = trainer.fit()
    return run_dir, trainer, recorder.calls, summary


def test_callbacks_see_every_step_epoch_adjust_checkpoint_in_order(micro_run):
    run_dir, trainer, calls, summary = micro_run
    steps = trainer.data.steps_per_epoch
    assert steps == 3  # 96 images / batch 32 on one rank
    kinds = [c[0] for c in calls]
    assert kinds[0] == "fit_start" and kinds[-1] == "fit_end" and calls[-1][1] == summary
    assert [c[1:] for c in calls if c[0] == "step"] == [(e, s) for e in range(2) for s in range(steps)]
    lines = run_metrics(run_dir)
    assert [c[1] for c in calls if c[0] == "epoch"] == lines  # exactly what metrics.jsonl holds
    adjusts = [c for c in calls if c[0] == "adjust"]
    assert [(c[1], c[2]) for c in adjusts] == [(0, lines[0]["events"])] and lines[0]["events"]
    assert [c[1] for c in calls if c[0] == "checkpoint"] == [0, 1]  # checkpoint_every=1
    # order inside an epoch: steps, adjust, epoch end, checkpoint
    first_epoch = kinds[1:kinds.index("checkpoint") + 1]
    assert first_epoch == ["step"] * steps + ["adjust", "epoch", "checkpoint"]


def test_context_and_data_source_satisfy_their_protocols(micro_run):
    _, trainer, _, _ = micro_run
    assert isinstance(trainer.ctx, TrainContext)
    assert isinstance(trainer.data, TorchDataSource) and isinstance(trainer.data, DataSource)
    assert trainer.data.sizes == (96, 32)
    assert sum(images.shape[0] for images, _ in trainer.data.val_batches()) == 32


def test_a_given_data_source_is_used_as_is(tmp_path):
    cfg = load_config(None, MICRO)
    ctx = LocalContext(torch.device("cpu"), tmp_path / "run")
    data = TorchDataSource.from_config(cfg, ctx)
    trainer = Trainer.from_config(cfg, ctx, data=data)
    assert trainer.data is data and trainer.num_classes == data.num_classes


def test_typed_run_files_round_trip_byte_for_byte(micro_run):
    run_dir, _, _, _ = micro_run
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        assert json.dumps(EpochMetrics.from_json(json.loads(line)).to_json()) == line
    metas = sorted(run_dir.glob(f"{CHECKPOINT_PREFIX}*/{META_FILE}"))
    assert len(metas) == 2
    for path in metas:
        raw = json.loads(path.read_text())
        meta = CheckpointMeta.from_json(raw)
        assert meta.extra == {"format_version": raw["format_version"]}
        assert json.dumps(meta.to_json(), sort_keys=True) == json.dumps(raw, sort_keys=True)
        assert [EpochMetrics.from_json(m).epoch for m in meta.history] == list(range(1, meta.epoch + 1))


def test_old_metrics_line_without_optional_keys_reads(micro_run):
    run_dir, _, _, _ = micro_run
    record = run_metrics(run_dir)[0]
    old = {k: v for k, v in record.items() if k not in ("replica_digests", "skipped_steps")}
    old["skipped_steps"] = 0
    parsed = EpochMetrics.from_json(old)
    assert parsed.replica_digests is None and parsed.to_json() == old


def test_parse_metrics_strict_and_tolerant():
    text = '{"epoch": 2, "a": 1}\nnot json\n{"epoch": 1}\n{"epoch": 2, "a": 2}\n'
    with pytest.raises(ValueError, match="line 2"):
        parse_metrics(text)
    records, skipped = parse_metrics(text, strict=False)
    assert skipped == 1 and records == [{"epoch": 1}, {"epoch": 2, "a": 2}]


def test_plain_params_is_none_without_checkpoint_and_read_from_meta(micro_run, tmp_path):
    run_dir, trainer, _, _ = micro_run
    assert plain_params_from(RunStorage(str(tmp_path), "empty")) is None
    assert plain_params_from(RunStorage(str(run_dir.parent), run_dir.name)) == trainer.plain_params


def test_augmentation_defaults_have_one_meaning():
    """build_datasets(aug=None) builds what a default TrainConfig trains on."""
    cfg, aug = TrainConfig(), AugConfig()
    for key in AUG_KEYS:
        value = getattr(cfg, key)
        assert (list(value) if isinstance(value, tuple) else value) == getattr(aug, key), key


def test_a_command_module_that_fails_to_import_is_not_hidden(monkeypatch):
    from dyrep_ray import cli

    monkeypatch.setattr(cli, "COMMAND_MODULES",
                        {**cli.COMMAND_MODULES, "nosuch": ("dyrep_ray.no_such_commands", "a missing module")})
    with pytest.raises(ModuleNotFoundError, match="no_such_commands"):
        cli.build_parser(["nosuch"])  # modules are imported when their command runs


def test_callbacks_must_be_trainer_callbacks(tmp_path):
    cfg = load_config(None, MICRO)
    with pytest.raises(TypeError, match="TrainerCallback"):
        Trainer.from_config(cfg, LocalContext(torch.device("cpu"), tmp_path / "run"), callbacks=[object()])


def test_no_engine_module_imports_the_loop():
    """The loop is the engine's top: its callbacks, assembly and adjust sequence never import it back (not even
    for annotations; callbacks name the trainer through protocols.TrainerView)."""
    import ast
    from pathlib import Path

    import dyrep_ray.engine as engine

    importers = []
    for path in sorted(Path(engine.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module == "loop":
                importers.append(path.name)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").endswith("engine.loop"):
                importers.append(path.name)
    assert importers == []
