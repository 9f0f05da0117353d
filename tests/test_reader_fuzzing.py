"""Fuzzing: arbitrary bytes / JSON into the readers a user's files reach.

Each reader must either succeed or raise a :class:`~dyrep_ray.errors.UserError` (what the CLI prints as one line
with exit 2) -- never another exception type.  Bounded and reproducible: ``derandomize=True`` (the same examples
every run), :data:`EXAMPLES` per reader, no deadline (the machine is shared), the whole file well under a minute.
"""

from __future__ import annotations

import json
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dyrep_ray.errors import UserError

EXAMPLES = 50
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# JSON values, including what Python's json writes but strict JSON forbids (NaN, Infinity) and huge ints.
json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)


def _mutations(original: bytes):
    """Random bytes, a truncation, or a few flipped bytes of a real file."""
    flips = st.lists(st.tuples(st.integers(0, max(len(original) - 1, 0)), st.integers(1, 255)), min_size=1,
                     max_size=4)

    def flipped(changes):
        data = bytearray(original)
        for index, xor in changes:
            if data:
                data[index] ^= xor
        return bytes(data)

    return (st.binary(max_size=300) | st.integers(0, len(original)).map(lambda n: original[:n])
            | flips.map(flipped))


def _expect_success_or_user_error(call):
    try:
        return call()
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), f"not one line: {exc!r}"
        return None


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real checkpoint of small_cnn with one grown block (the trainer's own writer)."""
    from dyrep_ray.engine.checkpoint import write_checkpoint_dir
    from dyrep_ray.engine.config import load_config
    from dyrep_ray.models import build_model
    from dyrep_ray.rep.graph import structure_graph
    from dyrep_ray.rep.grow_cut import grow_conv

    model = build_model("small_cnn", 10)
    grow_conv(model, "features.1.0", seed=0)
    cfg = load_config(None, ["model=small_cnn"])
    directory = tmp_path_factory.mktemp("fuzz") / "checkpoint_epoch0001"
    write_checkpoint_dir(directory, state={"model": model.state_dict()}, graph=structure_graph(model),
                         meta={"epoch": 1, "global_step": 4, "config": cfg.to_dict(), "num_classes": 10})
    return directory


def _remanifest(directory: Path) -> None:
    from dyrep_ray.engine.checkpoint import sha256_file

    files = {n: {"sha256": sha256_file(directory / n), "bytes": (directory / n).stat().st_size}
             for n in ("state.pt", "meta.json", "structure.json")}
    (directory / "MANIFEST.json").write_text(json.dumps({"format_version": 1, "files": files}))


def _load_and_rebuild(directory: Path) -> None:
    """What convert/eval/resume do with a checkpoint: verify and load it, rebuild the model, load strictly."""
    from dyrep_ray.engine.checkpoint import load_checkpoint_dir
    from dyrep_ray.export.weights import rebuild_trained_model

    rebuild_trained_model(load_checkpoint_dir(directory))


@pytest.mark.parametrize("target", ["state.pt", "meta.json", "structure.json", "MANIFEST.json"])
def test_checkpoint_files_with_arbitrary_bytes(checkpoint, target):
    original = (checkpoint / target).read_bytes()

    @FUZZ
    @given(data=_mutations(original), remanifest=st.booleans())
    def run(data, remanifest):
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / checkpoint.name
            shutil.copytree(checkpoint, copy)
            (copy / target).write_bytes(data)
            if remanifest and target != "MANIFEST.json":  # the manifest passes: the content itself is checked
                _remanifest(copy)
            _expect_success_or_user_error(lambda: _load_and_rebuild(copy))

    run()


@FUZZ
@given(value=json_values, key=st.sampled_from(["blocks", "entry", "field"]),
       field=st.sampled_from(["path", "type", "in_channels", "out_channels", "kernel_size", "stride", "padding",
                              "groups", "branches", "orig_bias"]))
def test_structure_json_with_arbitrary_values(checkpoint, value, key, field):
    """structure.json is JSON the manifest vouches for; any value in any place: loaded, or one line."""
    graph = json.loads((checkpoint / "structure.json").read_text())
    if key == "blocks":
        graph["blocks"] = value
    elif key == "entry":
        graph["blocks"] = [value]
    else:
        graph["blocks"][0][field] = value
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / checkpoint.name
        shutil.copytree(checkpoint, copy)
        (copy / "structure.json").write_text(json.dumps(graph))
        _remanifest(copy)
        _expect_success_or_user_error(lambda: _load_and_rebuild(copy))


# -------------------------------------------------------------------------------------------------- metrics
@FUZZ
@given(lines=st.lists(json_values.map(json.dumps) | st.text(max_size=40), max_size=6))
@example(lines=['0\x1e0', '{"epoch": Infinity}', '{"epoch": 1e400}', '[' * 5000, '{"epoch": [1]}'])
def test_metrics_reader(lines):
    from dyrep_ray.rundir.files import parse_metrics

    text = "\n".join(lines)
    records, skipped = parse_metrics(text, strict=False)  # lenient mode (report): never raises
    # str.splitlines also splits at \x1c-\x1e, \x85, \u2028 ...: count what the reader counts as lines.
    assert all(isinstance(r, dict) for r in records) and 0 <= skipped <= len(text.splitlines())
    try:
        parse_metrics(text, strict=True)
    except ValueError as exc:  # strict mode's documented error; its callers turn it into a one-line UserError
        assert "line" in str(exc)


@FUZZ
@given(data=st.binary(max_size=200) | st.lists(json_values.map(json.dumps), max_size=4).map(
    lambda lines: "\n".join(lines).encode()))
def test_report_of_a_run_with_arbitrary_metrics_file(data):
    from dyrep_ray.report.history import run_summary
    from dyrep_ray.report.runs import load_run

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "metrics.jsonl").write_bytes(data)
        run = _expect_success_or_user_error(lambda: load_run(tmp))
        if run is not None:
            try:
                run_summary(run)
            except UserError:
                pass


# ----------------------------------------------------------------------------------------------- sweep specs
@FUZZ
@given(data=st.binary(max_size=200) | json_values.map(lambda v: json.dumps({"search_space": v}).encode())
       | json_values.map(lambda v: json.dumps(v).encode()))
def test_sweep_spec_loader(data):
    from dyrep_ray.tune.spec import load_sweep

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sweep.yaml"
        path.write_bytes(data)
        _expect_success_or_user_error(lambda: load_sweep(path))


# ---------------------------------------------------------------------------------------------------- CIFAR
@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    batches = root / "cifar-10-batches-py"
    batches.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(batches / name, "wb") as f:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with open(batches / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)
    return root


@pytest.mark.parametrize("target", ["test_batch", "batches.meta"])
def test_cifar_reader_with_arbitrary_bytes(cifar_dir, target):
    from dyrep_ray.data import load_cifar_split

    original = (cifar_dir / "cifar-10-batches-py" / target).read_bytes()

    @FUZZ
    @given(data=_mutations(original))
    def run(data):
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "cifar"
            shutil.copytree(cifar_dir, copy)
            (copy / "cifar-10-batches-py" / target).write_bytes(data)
            _expect_success_or_user_error(lambda: load_cifar_split("cifar10", copy, train=False))

    run()


def test_fuzz_inputs_reach_past_the_first_check(checkpoint):
    """The checkpoint fixture is valid (so the fuzzed variants test the readers, not a broken fixture)."""
    _load_and_rebuild(checkpoint)
    assert torch.load(checkpoint / "state.pt", weights_only=True)["model"]
