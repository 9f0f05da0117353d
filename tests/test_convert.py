"""``dyrep-ray convert`` / ``eval``: fold a checkpoint into the plain model, prove nothing changed.

One short real ``--local`` run (module fixture) plus checkpoints built programmatically for every
supported model family; a hostile checkpoint must be refused without running its payload.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dyrep_ray.cli import main
from dyrep_ray.engine.checkpoint import find_valid_checkpoints, load_checkpoint_dir, write_checkpoint_dir
from dyrep_ray.engine.config import TrainConfig, load_config
from dyrep_ray.engine.context import LocalContext
from dyrep_ray.engine.loop import train
from dyrep_ray.export import ATOL, RTOL, convert_checkpoint, validation_loader
from dyrep_ray.models import build_model, count_macs, count_params
from dyrep_ray.rep import DiverseBranchBlock, DyRep, restore_graph, structure_graph
from tests.helpers import LOCAL_TINY, randomize_bn

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*:FutureWarning")



@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("convert") / "run"
    cfg = load_config(None, LOCAL_TINY)
    summary = train(cfg, LocalContext(torch.device("cpu"), run_dir, cfg.keep_checkpoints))
    assert summary["grows"] >= 2  # the conversion below must have blocks to fold
    return run_dir, cfg


@pytest.fixture(scope="module")
def converted(tiny_run, tmp_path_factory):
    """``dyrep-ray convert RUN_DIR`` with the default output, TorchScript and (maybe skipped) ONNX."""
    run_dir, _ = tiny_run
    extra = tmp_path_factory.mktemp("exports")
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(["convert", str(run_dir), "--torchscript", str(extra / "model.ts"), "--onnx",
                   str(extra / "model.onnx"), "--no-progress"])
    return rc, out.getvalue(), run_dir / "deployed.safetensors", extra


def _trained_model(ckpt_dir: Path) -> tuple[nn.Module, dict]:
    ckpt = load_checkpoint_dir(ckpt_dir)
    model = build_model(ckpt.meta["config"]["model"], ckpt.meta["num_classes"])
    restore_graph(model, ckpt.graph)
    model.load_state_dict(ckpt.state["model"], strict=True)
    return model.eval(), ckpt.meta


def _within_tolerance(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= RTOL * float(a.abs().max()) + ATOL


# ---------------------------------------------------------------------------
# A real (tiny) run
# ---------------------------------------------------------------------------
def test_convert_run_keeps_accuracy_and_writes_sidecar(tiny_run, converted):
    run_dir, cfg = tiny_run
    rc, stdout, weights, _ = converted
    assert rc == 0, stdout
    info = json.loads((run_dir / "deployed.json").read_text())
    newest = find_valid_checkpoints(run_dir)[0]
    trained, meta = _trained_model(newest)
    # accuracy before/after folding, and the same number the training loop logged for that epoch
    assert info["evaluated"] and info["val_images"] == 128
    assert abs(info["top1_after"] - info["top1_before"]) <= 0.01
    assert info["top1_before"] == pytest.approx(meta["metrics"]["val_top1"], abs=1e-9)
    assert info["max_output_diff"] <= RTOL * info["max_abs_logit"] + ATOL
    # sidecar fields
    assert info["architecture"] == "small_cnn" and info["num_classes"] == 10 and info["image_size"] == 32
    assert info["config"] == cfg.to_dict() and info["epoch"] == 3
    assert info["blocks_folded"] == sum(isinstance(m, DiverseBranchBlock) for m in trained.modules()) >= 2
    assert info["params"]["deployed"] == info["params"]["plain"] == meta["plain_params"] < info["params"]["trained"]
    assert info["macs"]["deployed"] == info["macs"]["plain"] < info["macs"]["trained"]
    assert info["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert f"top-1 before {info['top1_before']:.2f}%" in stdout


def test_deployed_weights_load_strictly_into_untouched_architecture(tiny_run, converted):
    run_dir, cfg = tiny_run
    _, _, weights, _ = converted
    plain = build_model("small_cnn", 10)
    plain.load_state_dict(load_file(str(weights)), strict=True)
    plain.eval()
    untouched = build_model("small_cnn", 10)
    assert count_params(plain) == count_params(untouched)
    assert count_macs(plain, (3, 32, 32)) == count_macs(untouched, (3, 32, 32))
    trained, _ = _trained_model(find_valid_checkpoints(run_dir)[0])
    assert count_params(trained) > count_params(plain)
    loader, _ = validation_loader(cfg)
    images, _ = next(iter(loader))
    with torch.no_grad():
        expected, actual = trained(images), plain(images)
    assert _within_tolerance(expected, actual)
    assert torch.equal(expected.argmax(1), actual.argmax(1))


def test_optional_exports(converted):
    rc, stdout, weights, extra = converted
    assert rc == 0
    traced = torch.jit.load(str(extra / "model.ts"))
    plain = build_model("small_cnn", 10).eval()
    plain.load_state_dict(load_file(str(weights)), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert _within_tolerance(plain(x), traced(x))
    if importlib.util.find_spec("onnx") is None:
        assert not (extra / "model.onnx").exists()
        assert sum("onnx" in line and "skipped" in line for line in stdout.splitlines()) == 1
    else:
        assert (extra / "model.onnx").stat().st_size > 0


def test_eval_deployed_and_checkpoint(tiny_run, converted, capsys):
    run_dir, _ = tiny_run
    _, _, weights, _ = converted
    info = json.loads((run_dir / "deployed.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(weights), "--json", "--no-progress"]) == 0
    deployed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert deployed["images"] == 128 and deployed["model"] == "small_cnn"
    assert deployed["top1"] == pytest.approx(info["top1_after"], abs=1e-9)
    assert main(["eval", str(run_dir), "--json", "--no-progress"]) == 0
    ckpt = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ckpt["top1"] == pytest.approx(info["top1_before"], abs=1e-9)
    assert ckpt["top5"] == pytest.approx(info["top5_before"], abs=1e-9)
    # --set applies on top of the stored config
    assert main(["eval", str(weights), "--json", "--no-progress", "--set", "synthetic_val_size=64"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 64


def test_eval_bare_safetensors_needs_a_config(tiny_run, converted, tmp_path, capsys):
    _, _, weights, _ = converted
    bare = tmp_path / "bare.safetensors"
    shutil.copy(weights, bare)
    assert main(["eval", str(bare), "--no-progress"]) == 2
    assert "-c CONFIG" in capsys.readouterr().err
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text("model: small_cnn\ndataset: synthetic\nsynthetic_val_size: 32\nbatch_size: 16\n")
    assert main(["eval", str(bare), "-c", str(cfg_file), "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 32 and 0.0 <= result["top1"] <= 100.0


def test_convert_fails_loudly_when_folding_is_wrong(tiny_run, tmp_path, monkeypatch, capsys):
    run_dir, _ = tiny_run
    import dyrep_ray.export.convert as convert_module
    from dyrep_ray.rep import deploy as real_deploy

    def broken_deploy(model):
        folded = real_deploy(model)
        with torch.no_grad():
            conv = folded.features[0][0]  # a grown conv: perturb its folded kernel
            conv.weight.add_(0.05 * conv.weight.abs().max())
        return folded

    monkeypatch.setattr(convert_module, "deploy", broken_deploy)
    out = tmp_path / "bad.safetensors"
    assert main(["convert", str(run_dir), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "convert FAILED" in err and "outputs differ" in err
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert not list(tmp_path.glob(".bad.safetensors.tmp-*"))


# ---------------------------------------------------------------------------
# Every supported model family, checkpoints built by hand
# ---------------------------------------------------------------------------
def _family_checkpoint(directory: Path, name: str, grow: list[str], cut: dict[str, list[str]],
                       **config) -> tuple[Path, dict]:
    """A checkpoint laid out like the training loop's, for ``name`` with ``grow`` convs grown."""
    model = build_model(name, 10)
    plain_params = count_params(model)
    dyrep = DyRep(model, seed=1)
    for path in grow:
        dyrep.grow(path)
    for path, branches in cut.items():
        dyrep.cut(path, branches)
    randomize_bn(model, seed=len(name))
    cfg = TrainConfig(**{"model": name, "image_size": 32, "synthetic_train_size": 16, "synthetic_val_size": 16,
                         "batch_size": 8, "epochs": 1, **config})
    history = [{"epoch": 1, "val_top1": 10.0, "params": count_params(model), "events": []}]
    meta = {"epoch": 1, "global_step": 2, "history": history, "metrics": history[-1], "config": cfg.to_dict(),
            "skipped_steps": 0, "plain_params": plain_params, "num_classes": 10}
    state = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    return write_checkpoint_dir(directory / "checkpoint_epoch0001", state=state, meta=meta,
                                graph=structure_graph(model)), meta


FAMILIES = {
    # name: (convs to grow, cuts applied afterwards)
    "vgg16_cifar": (["features.0.0", "features.3.0", "features.0.0.branches.kxk.conv"], {"features.3.0": ["1x1"]}),
    # conv1 (7x7, stride 2, pad 3) grows then collapses back into a conv with a bias to fold into bn1
    "resnet18": (["conv1", "layer1.0.conv2", "layer2.0.conv1"],
                 {"conv1": ["1x1_kxk", "1x1_avg", "1xk", "kx1", "1x1"]}),
    "mobilenet_v1": (["stem.0", "features.0.dw.0", "features.1.dw.0"], {}),  # depthwise convs
    "timm/repvgg_a2": (["stem.conv_kxk.conv", "stages.0.0.conv_kxk.conv"], {}),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_convert_each_model_family(name, tmp_path):
    grow, cut = FAMILIES[name]
    ckpt_dir, meta = _family_checkpoint(tmp_path / "run", name, grow, cut)
    trained, _ = _trained_model(ckpt_dir)
    blocks = sum(isinstance(m, DiverseBranchBlock) for m in trained.modules())
    assert blocks >= 2
    evaluate = name in ("vgg16_cifar", "mobilenet_v1")  # tiny synthetic val set; --no-eval for the others
    result = convert_checkpoint(ckpt_dir, tmp_path / "out" / "w.safetensors", evaluate=evaluate)
    info = json.loads((tmp_path / "out" / "w.json").read_text())
    assert info == result.info
    assert info["blocks_folded"] == blocks and info["architecture"] == name
    assert info["params"]["deployed"] == info["params"]["plain"] == meta["plain_params"] < info["params"]["trained"]
    assert info["macs"]["deployed"] == info["macs"]["plain"]
    if evaluate:
        assert info["val_images"] == 16 and abs(info["top1_after"] - info["top1_before"]) <= 0.01
    else:
        assert info["top1_before"] is None and info["compared_batches"] >= 1
    plain = build_model(name, 10).eval()
    plain.load_state_dict(load_file(str(tmp_path / "out" / "w.safetensors")), strict=True)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, actual = trained(x), plain(x)
    assert _within_tolerance(expected, actual), float((expected - actual).abs().max())


def test_convert_and_eval_on_parquet_validation_shards(tmp_path, capsys):
    from dyrep_ray.data.parquet import export_parquet

    shards = tmp_path / "val_shards"
    export_parquet("synthetic", None, shards, split="val", synthetic_val_size=24, rows_per_shard=10)
    ckpt_dir, _ = _family_checkpoint(tmp_path / "run", "small_cnn", ["features.0.0", "features.3.0"], {},
                                     dataset="parquet", parquet_train=str(shards))
    result = convert_checkpoint(ckpt_dir)
    assert result.weights == tmp_path / "run" / "deployed.safetensors"
    assert result.info["val_images"] == 24 and abs(result.info["top1_after"] - result.info["top1_before"]) <= 0.01
    capsys.readouterr()
    assert main(["eval", str(result.weights), "--json", "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["images"] == 24 and evaluated["top1"] == pytest.approx(result.info["top1_after"], abs=1e-9)


# ---------------------------------------------------------------------------
# Hostile input
# ---------------------------------------------------------------------------
class _Payload:
    """Unpickling this calls ``open(marker, "w")``: creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _make_hostile(ckpt_dir: Path, marker: Path) -> None:
    state = ckpt_dir / "state.pt"
    torch.save({"model": {"features.0.0.weight": _Payload(marker)}}, state)
    manifest = json.loads((ckpt_dir / "MANIFEST.json").read_text())
    manifest["files"]["state.pt"] = {"sha256": hashlib.sha256(state.read_bytes()).hexdigest(),
                                     "bytes": state.stat().st_size}
    (ckpt_dir / "MANIFEST.json").write_text(json.dumps(manifest))


def test_payload_is_live_under_plain_pickle(tmp_path):
    """Sanity check of the test itself: the payload does run when unpickled naively."""
    marker = tmp_path / "pwned-naive"
    pickle.loads(pickle.dumps(_Payload(marker))).close()
    assert marker.exists()


def test_hostile_checkpoint_is_refused_and_never_executed(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    hostile_run = tmp_path / "hostile_run"
    shutil.copytree(run_dir, hostile_run, ignore=shutil.ignore_patterns("deployed*", "report"))
    newest = find_valid_checkpoints(hostile_run)[0]
    marker = tmp_path / "pwned"
    _make_hostile(newest, marker)
    capsys.readouterr()
    for argv in (["convert", str(newest)], ["convert", str(hostile_run)], ["eval", str(newest)],
                 ["eval", str(newest / "state.pt")]):
        assert main(argv + ["--no-progress"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("dyrep-ray: error:") and "refused" in err[0], (argv, err)
        assert not marker.exists()
    assert not (hostile_run / "deployed.safetensors").exists()
    # a plain .pt file given to eval goes through the same weights_only loader
    torch.save({"w": _Payload(marker)}, tmp_path / "weights.pt")
    assert main(["eval", str(tmp_path / "weights.pt"), "--set", "model=small_cnn", "--no-progress"]) == 2
    assert "refused" in capsys.readouterr().err and not marker.exists()


def test_convert_errors_are_one_line(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing")]) == 2
    assert main(["convert", str(tmp_path)]) == 2  # a directory without checkpoints
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("dyrep-ray: error:") for line in err)
    assert "no valid checkpoint" in err[1]


# ---------------------------------------------------------------------------
# File permissions: the umask, read without changing it
# ---------------------------------------------------------------------------
_UMASK_PROBE = """
import json, os, stat, sys
from pathlib import Path
os.umask(0o027)
from dyrep_ray.export import convert_checkpoint
from dyrep_ray.export.convert import new_file_mode
run_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
before = os.umask(0o027)  # unchanged by anything above
mode = new_file_mode(out.parent)
convert_checkpoint(run_dir, out, evaluate=False)
print(json.dumps({"umask": before, "mode": mode, "left": sorted(p.name for p in out.parent.iterdir()),
                  "weights": stat.S_IMODE(out.stat().st_mode),
                  "sidecar": stat.S_IMODE(out.with_suffix(".json").stat().st_mode)}))
"""


def test_exported_files_get_the_processes_umask(tiny_run, tmp_path):
    """safetensors writes 0600 files; convert gives them the mode any new file gets (here 0640 from umask 027)."""
    import subprocess
    import sys

    run_dir, _ = tiny_run
    out = tmp_path / "export" / "model.safetensors"
    out.parent.mkdir()
    done = subprocess.run([sys.executable, "-c", _UMASK_PROBE, str(run_dir), str(out)], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["umask"] == 0o027 and got["mode"] == 0o640
    assert (got["weights"], got["sidecar"]) == (0o640, 0o640)
    assert got["left"] == ["model.json", "model.safetensors"]  # no probe or temp file left behind


def test_convert_never_sets_the_umask(tiny_run, tmp_path, monkeypatch):
    """Reading the umask by setting it would race with other threads creating files: convert must not call it."""
    import os

    def refuse(mask):
        raise AssertionError(f"os.umask({mask:#o}) called")

    monkeypatch.setattr(os, "umask", refuse)
    run_dir, _ = tiny_run
    result = convert_checkpoint(run_dir, tmp_path / "model.safetensors", evaluate=False)
    assert result.weights.is_file() and not list(tmp_path.glob(".dyrep-ray-mode-probe-*"))
