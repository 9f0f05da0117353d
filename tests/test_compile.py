"""``compile: true``: one compile at the start and exactly one after each adjust, the same losses as eager.

The backend is dynamo's "aot_eager" (the same graph capture and autograd tracing as inductor, without code
generation, which takes minutes on CPU); compiles are counted with dynamo's own counters.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from dyrep_ray.engine import compile as compile_mod
from dyrep_ray.engine.config import load_config
from dyrep_ray.engine.config_rules import ConfigError
from dyrep_ray.engine.context import LocalContext
from dyrep_ray.engine.loop import Trainer

# 2 full batches per epoch (no partial batch: one input shape), an adjust after epochs 1, 2 and 3
RUN = ["synthetic_train_size=64", "synthetic_val_size=32", "batch_size=32", "epochs=4", "dyrep_adjust_interval=1",
       "dyrep_recal_bn_iters=1", "model=small_cnn"]


def _fit(tmp_path, compiled: bool):
    cfg = load_config(None, [*RUN, f"compile={str(compiled).lower()}"])
    trainer = Trainer.from_config(cfg, LocalContext(torch.device("cpu"), tmp_path, 1))
    return trainer.fit(), trainer.state.history


@pytest.fixture
def dynamo_config():
    """The dynamo settings compile_model changes, restored after the test (monkeypatch would delete them:
    dynamo's config module keeps its keys outside its __dict__)."""
    config = torch._dynamo.config
    saved = {key: getattr(config, key) for key in ("recompile_limit", "fail_on_recompile_limit_hit")}
    yield
    for key, value in saved.items():
        setattr(config, key, value)
    torch._dynamo.reset()


def test_compiled_run_compiles_once_per_structure_and_matches_eager(tmp_path, monkeypatch, caplog, dynamo_config):
    monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")
    caplog.set_level("INFO", logger=compile_mod.logger.name)
    graphs_before = counters["stats"]["unique_graphs"]
    summary, history = _fit(tmp_path / "compiled", compiled=True)
    graphs = counters["stats"]["unique_graphs"] - graphs_before
    adjusts = sum(1 for m in history if m["events"])
    assert adjusts == 3 and summary["grows"] >= 3
    assert graphs == 1 + adjusts, f"{graphs} compiled graphs for {adjusts} structure changes"
    assert sum("torch.compile" in r.getMessage() for r in caplog.records) == 1 + adjusts
    _, eager = _fit(tmp_path / "eager", compiled=False)
    for got, want in zip(history, eager):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4, abs=1e-5)
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-4, abs=1e-5)
        assert got["params"] == want["params"]
    assert torch._dynamo.config.fail_on_recompile_limit_hit is True  # never silently eager


def test_compile_refused_in_one_line_where_dynamo_cannot_run(tmp_path, monkeypatch):
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    cfg = load_config(None, [*RUN, "compile=true"])
    with pytest.raises(ConfigError, match="compile: true needs torch.compile") as info:
        Trainer.from_config(cfg, LocalContext(torch.device("cpu"), tmp_path / "run", 1))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
