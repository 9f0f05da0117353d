"""Tests of the validated training configuration (pure Python: no torch, no Ray)."""

from __future__ import annotations

import dataclasses
import logging
import pickle
import sys
from pathlib import Path

import pytest
import yaml

from dyrep_ray.engine.config import (
    CHOICES,
    ORIGINAL_FORMAT,
    ORIGINAL_KEY_MAP,
    ORIGINAL_ONLY_KEYS,
    ConfigError,
    TrainConfig,
    detect_format,
    load_config,
    parse_override,
    translate_original,
)

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
EXPERIMENT_FILES = sorted(EXPERIMENTS.glob("*.yaml"))

# configs/strategies/DyRep/cifar.yaml of the original training code (hunto/image_classification_sota), verbatim
ORIGINAL_CIFAR_YAML = """\
dataset: cifar10
aa: null
batch_size: 128
color_jitter: 0.0
cutout_length: 16
decay_by_epoch: false
decay_epochs: 3
decay_rate: 0.967
drop: 0.0
epochs: 600
log_interval: 50
lr: 0.1
smoothing: 0.0
min_lr: 1.0e-06
model_ema: false
model_ema_decay: 0.9998
momentum: 0.9
opt: sgd
opt_betas: null
opt_eps: 1.0e-08
remode: const
reprob: 0.0
sched: cosine
seed: 42
warmup_epochs: 0
warmup_lr: 0.2
weight_decay: 1.0e-04
workers: 4
sgd_no_nesterov: True
opt_no_filter: True
# dyrep
dyrep_adjust_interval: 15
dyrep_recal_bn_every_epoch: False
dyrep_max_adjust_epochs: 500
"""

# configs/strategies/DyRep/resnet.yaml of the original, verbatim (note the hyphenated `drop-path-rate`)
ORIGINAL_RESNET_YAML = """\
# Note:
# Differences between our strategy and the official dbb strategy:
# 1. we do not use PCA lighting augmentation
dataset: imagenet
aa: null
batch_size: 32
color_jitter: 0.06
decay_by_epoch: false
decay_epochs: 3
decay_rate: 0.967
drop: 0.0
drop-path-rate: 0.0
epochs: 120
log_interval: 50
lr: 0.1
smoothing: 0.0
min_lr: 1.0e-07
model_ema: false
model_ema_decay: 0.9998
momentum: 0.9
opt: sgd
opt_betas: null
opt_eps: 1.0e-08
remode: const
reprob: 0.0
sched: cosine
seed: 42
warmup_epochs: 0
warmup_lr: 0.2
weight_decay: 1.0e-04
workers: 4
# dyrep
dyrep: True
dyrep_adjust_interval: 5
dyrep_recal_bn_every_epoch: False
dyrep_max_adjust_epochs: 100
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(err.value)
    assert "\n" not in message and "\r" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ----------------------------------------------------------------------------------------------------------------
# defaults, module hygiene
# ----------------------------------------------------------------------------------------------------------------


def test_defaults_are_valid_and_as_documented() -> None:
    cfg = TrainConfig()
    assert load_config() == cfg
    assert (cfg.model, cfg.dataset, cfg.epochs, cfg.batch_size, cfg.workers) == ("small_cnn", "synthetic", 6, 64, 2)
    assert cfg.lr == 0.05 and cfg.opt == "sgd" and cfg.nesterov is True and cfg.weight_decay == 5e-4
    assert cfg.sched == "cosine" and cfg.decay_epochs == 30.0 and isinstance(cfg.decay_epochs, float)
    assert cfg.dyrep is True and cfg.dyrep_metric == "synflow" and cfg.dyrep_max_depth == 2
    assert cfg.use_gpu is None and cfg.num_classes is None and cfg.on_nonfinite == "skip"


def test_required_field_names_exist() -> None:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    required = """model dataset data_dir num_classes image_size synthetic_train_size synthetic_val_size parquet_train
    parquet_val epochs batch_size val_batch_size opt lr momentum nesterov weight_decay opt_eps opt_betas opt_no_filter
    sched min_lr warmup_epochs warmup_lr decay_epochs decay_rate decay_by_epoch smoothing seed amp clip_grad
    channels_last model_ema model_ema_decay aa reprob remode color_jitter cutout_length interpolation dyrep
    dyrep_adjust_interval dyrep_max_adjust_epochs dyrep_recal_bn_iters dyrep_recal_bn_every_epoch dyrep_metric
    dyrep_grow_topk dyrep_cut_threshold dyrep_cut_std_gate dyrep_init_gamma dyrep_max_depth workers use_gpu
    num_data_workers checkpoint_every keep_checkpoints max_failures storage_path on_nonfinite""".split()
    assert set(required) <= names, set(required) - names


def test_config_module_imports_neither_torch_nor_ray() -> None:
    import subprocess

    code = (
        "import sys, dyrep_ray.engine.config as c, dyrep_ray.engine.config_reference as r; "
        "bad = [m for m in ('torch', 'ray') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_config_is_frozen_and_picklable() -> None:
    cfg = TrainConfig(opt_betas=[0.9, 0.99])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(cfg)) == cfg


# ----------------------------------------------------------------------------------------------------------------
# precedence, overrides
# ----------------------------------------------------------------------------------------------------------------


def test_yaml_then_overrides_precedence(tmp_path: Path) -> None:
    path = write(tmp_path, "exp.yaml", "lr: 0.2\nepochs: 3\nbatch_size: 16\n")
    cfg = load_config(path, ["epochs=4", "seed=7", "epochs=5"], base={"lr": 0.3, "epochs": 9, "momentum": 0.5})
    assert cfg.lr == 0.2  # YAML over base
    assert cfg.epochs == 5  # the last override wins over YAML and base
    assert cfg.seed == 7  # override over default
    assert cfg.momentum == 0.5  # base over default
    assert cfg.batch_size == 16  # YAML over default
    assert cfg.weight_decay == TrainConfig().weight_decay  # untouched default
    assert load_config(str(path)).epochs == 3  # str paths work too


def test_parse_override_uses_yaml_values() -> None:
    assert parse_override("lr=0.1") == ("lr", 0.1)
    assert parse_override(" epochs = 3") == ("epochs", 3)
    assert parse_override("use_gpu=true") == ("use_gpu", True)
    assert parse_override("data_dir=") == ("data_dir", None)
    assert parse_override("data_dir=null") == ("data_dir", None)
    assert parse_override("aa=rand-m9-mstd0.5") == ("aa", "rand-m9-mstd0.5")
    assert parse_override("opt_betas=[0.9, 0.99]") == ("opt_betas", [0.9, 0.99])
    assert parse_override("storage_path=s3://bucket/a=b") == ("storage_path", "s3://bucket/a=b")


@pytest.mark.parametrize("text", ["lr", "=0.1", "", "   "])
def test_parse_override_rejects_malformed(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_override(text)
    assert_one_line(err, "key=value")


def test_parse_override_rejects_bad_yaml_value() -> None:
    with pytest.raises(ConfigError) as err:
        parse_override("aa=[1, 2")
    assert_one_line(err, "aa=[1, 2", "not valid YAML")


def test_exponent_floats_without_dot_are_accepted(tmp_path: Path) -> None:
    # PyYAML reads "1e-3" as a string; float fields accept it (and only float fields)
    cfg = load_config(write(tmp_path, "e.yaml", "min_lr: 1e-6\nweight_decay: 5E-4\n"), ["lr=1e-3"])
    assert (cfg.lr, cfg.min_lr, cfg.weight_decay) == (1e-3, 1e-6, 5e-4)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["epochs=1e3"])
    assert_one_line(err, "'epochs'", "int")
    with pytest.raises(ConfigError) as err:
        load_config(None, ["lr='0.1'"])  # a quoted number stays a string
    assert_one_line(err, "'lr'", "float", "'0.1'")


# ----------------------------------------------------------------------------------------------------------------
# validation errors
# ----------------------------------------------------------------------------------------------------------------


def test_unknown_key_names_closest_valid_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["lrr=0.1"])
    assert_one_line(err, "unknown config key 'lrr' (did you mean 'lr'?)")
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "u.yaml", "dyrep_adjust_intervall: 3\n"))
    assert_one_line(err, "u.yaml", "'dyrep_adjust_intervall'", "did you mean 'dyrep_adjust_interval'?")
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"batchsize": 3})
    assert_one_line(err, "'batchsize'", "'batch_size'")
    with pytest.raises(ConfigError) as err:
        TrainConfig().replace(epoch=3)
    assert_one_line(err, "'epoch'", "'epochs'")
    with pytest.raises(ConfigError) as err:
        load_config(None, ["zzzqqq=1"])
    assert_one_line(err, "unknown config key 'zzzqqq'", "experiments/default.yaml")


def test_original_key_in_native_form_gets_a_hint() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["sgd_no_nesterov=true"])
    assert_one_line(err, "'sgd_no_nesterov'", "nesterov=false")


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("epochs=ten", ("'epochs'", "int", "'ten'", "str")),
        ("epochs=2.5", ("'epochs'", "int", "2.5", "float")),
        ("epochs=true", ("'epochs'", "int", "True", "bool")),  # a bool is not an int
        ("lr=true", ("'lr'", "float", "True", "bool")),
        ("lr=null", ("'lr'", "float", "null")),  # None only where Optional
        ("lr=.inf", ("'lr'", "finite")),
        ("nesterov=1", ("'nesterov'", "bool", "1", "int")),
        ("use_gpu=yes please", ("'use_gpu'", "bool or null", "'yes please'")),
        ("model=3", ("'model'", "str", "3", "int")),
        ("opt_betas=0.9", ("'opt_betas'", "list of float", "0.9")),
        ("opt_betas=[0.9, x]", ("'opt_betas'", "list of float")),
        ("num_classes=ten", ("'num_classes'", "int or null", "'ten'")),
    ],
)
def test_wrong_types_are_one_line_and_name_key_type_value(override: str, fragments: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert_one_line(err, *fragments)


def test_ints_are_accepted_for_float_fields_and_stored_as_float() -> None:
    cfg = load_config(None, ["lr=1", "decay_epochs=3"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.decay_epochs == 3.0 and isinstance(cfg.decay_epochs, float)
    assert TrainConfig(opt_betas=(0, 0.5)).opt_betas == [0.0, 0.5]


def test_none_where_optional() -> None:
    cfg = load_config(None, ["use_gpu=null", "clip_grad=null", "aa=null", "val_batch_size=null"])
    assert cfg.use_gpu is None and cfg.clip_grad is None and cfg.aa is None and cfg.val_batch_size is None
    cfg = load_config(None, ["use_gpu=false", "clip_grad=5", "aa=rand-m9-mstd0.5", "val_batch_size=128"])
    assert (cfg.use_gpu, cfg.clip_grad, cfg.aa, cfg.val_batch_size) == (False, 5.0, "rand-m9-mstd0.5", 128)


@pytest.mark.parametrize(
    ("override", "key", "rule"),
    [
        ("epochs=0", "epochs", ">= 1"),
        ("batch_size=0", "batch_size", ">= 1"),
        ("lr=0", "lr", "> 0"),
        ("lr=-0.1", "lr", "> 0"),
        ("smoothing=1.0", "smoothing", "in [0, 1)"),
        ("smoothing=-0.1", "smoothing", "in [0, 1)"),
        ("workers=0", "workers", ">= 1"),
        ("dyrep_adjust_interval=0", "dyrep_adjust_interval", ">= 1"),
        ("dyrep_grow_topk=-1", "dyrep_grow_topk", ">= 0"),
        ("dyrep_max_depth=0", "dyrep_max_depth", ">= 1"),
        ("dyrep_init_gamma=0", "dyrep_init_gamma", "> 0"),
        ("momentum=1.5", "momentum", "in [0, 1)"),
        ("weight_decay=-1e-4", "weight_decay", ">= 0"),
        ("reprob=1.5", "reprob", "in [0, 1]"),
        ("num_data_workers=-1", "num_data_workers", ">= 0"),
        ("max_failures=-2", "max_failures", ">= -1"),
        ("keep_checkpoints=0", "keep_checkpoints", ">= 1"),
        ("clip_grad=0", "clip_grad", "> 0"),
        ("opt_betas=[0.9]", "opt_betas", "exactly 2"),
        ("opt_betas=[0.9, 1.5]", "opt_betas", "in [0, 1)"),
        ("image_std=[0.2, 0.2, 0]", "image_std", "> 0"),
        ("model=''", "model", "non-empty"),
    ],
)
def test_bad_ranges_are_one_line_and_name_the_key(override: str, key: str, rule: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert_one_line(err, f"'{key}'", rule)


@pytest.mark.parametrize(
    ("key", "bad"),
    [
        ("sched", "linear"),
        ("opt", "adam"),
        ("dyrep_metric", "fisher"),
        ("amp", "fp8"),
        ("on_nonfinite", "continue"),
        ("dataset", "mnist"),
        ("remode", "zero"),
        ("interpolation", "lanczos"),
    ],
)
def test_bad_enums_are_one_line_and_list_choices(key: str, bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}={bad}"])
    message = assert_one_line(err, f"'{key}'", repr(bad))
    assert all(choice in message for choice in CHOICES[key])


def test_enum_choices_are_complete_and_normalized() -> None:
    assert set(CHOICES["sched"]) == {"cosine", "step", "none"}
    assert set(CHOICES["opt"]) == {"sgd", "adamw"}
    assert set(CHOICES["dyrep_metric"]) == {"synflow", "snip", "grad_norm", "random"}
    assert set(CHOICES["amp"]) == {"none", "bf16", "fp16"}
    assert set(CHOICES["on_nonfinite"]) == {"skip", "stop", "ignore"}
    assert set(CHOICES["dataset"]) == {"synthetic", "cifar10", "cifar100", "imagenet", "parquet"}
    # amp with synflow/snip is refused (test_amp_refuses_sign_unstable_metrics): grad_norm here
    assert load_config(None, ["opt=AdamW", "sched=none", "amp=bf16", "dyrep_metric=grad_norm"]).opt == "adamw"


def test_enum_typo_suggests_closest_choice() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["dyrep_metric=synflw"])
    assert_one_line(err, "did you mean 'synflow'?")


def test_cross_field_rules() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["dataset=cifar10"])
    assert_one_line(err, "data_dir", "cifar10")
    with pytest.raises(ConfigError) as err:
        load_config(None, ["dataset=parquet"])
    assert_one_line(err, "parquet_train")
    with pytest.raises(ConfigError) as err:
        load_config(None, ["dataset=cifar100", "data_dir=/d", "num_classes=10"])
    assert_one_line(err, "num_classes", "100")
    with pytest.raises(ConfigError) as err:
        load_config(None, ["momentum=0"])
    assert_one_line(err, "nesterov", "momentum")
    assert load_config(None, ["momentum=0", "nesterov=false"]).momentum == 0.0
    assert load_config(None, ["dataset=parquet", "parquet_train=/p/train.parquet"]).parquet_val is None


def test_direct_construction_and_replace_validate() -> None:
    with pytest.raises(ConfigError) as err:
        TrainConfig(lr=-1.0)
    assert_one_line(err, "'lr'", "> 0")
    cfg = TrainConfig().replace(lr=0.2, epochs=3)
    assert (cfg.lr, cfg.epochs) == (0.2, 3)
    with pytest.raises(ConfigError) as err:
        cfg.replace(batch_size=0)
    assert_one_line(err, "'batch_size'")


# ----------------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------------


def test_missing_file_error_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(missing)
    assert_one_line(err, str(missing), "does not exist")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    assert_one_line(err, str(tmp_path), "directory")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("lr: [0.1\nepochs: 3\n", "not valid YAML"),
        ("lr: 0.1\n  epochs: 3\n", "not valid YAML"),
        ("\tlr: 0.1\n", "not valid YAML"),
        ("lr: 0.1\nlr: 0.2\n", "duplicate key 'lr'"),
        ("- lr\n- 0.1\n", "must contain a mapping"),
        ("just a string\n", "must contain a mapping"),
        ("", "must contain a mapping"),
        ("# only a comment\n", "must contain a mapping"),
    ],
)
def test_unparsable_or_non_mapping_file_error_names_the_file(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, "broken.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert_one_line(err, "broken.yaml", fragment)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "broken.yaml", "lr: 0.1\nepochs: [3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert_one_line(err, "line ")


def test_value_error_in_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "bad.yaml", "epochs: -1\n"))
    assert_one_line(err, "bad.yaml", "'epochs'", ">= 1")


def test_non_string_key_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "k.yaml", "on: 3\n"))  # YAML 1.1: `on` is the boolean True
    assert_one_line(err, "True", "not a string", "quote")


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=[p.name for p in EXPERIMENT_FILES])
def test_every_experiment_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    assert first_line.startswith("# ") and len(first_line) > 20
    if path.name != "default.yaml":
        assert "%" in first_line  # names the paper result it targets
        assert detect_format(yaml.safe_load(path.read_text()))[0] == "dyrep-ray"


def test_experiment_set_is_complete() -> None:
    names = {p.name for p in EXPERIMENT_FILES}
    expected = {
        "default.yaml", "cifar10_vgg16.yaml", "cifar100_vgg16.yaml", "imagenet_resnet18.yaml",
        "imagenet_resnet50.yaml", "imagenet_mobilenet_v1.yaml", "imagenet_repvgg_a2.yaml",
        "imagenet_repvgg_b2g4.yaml", "imagenet_repvgg_b3.yaml",
    }
    assert expected <= names, expected - names


def test_default_experiment_equals_builtin_default_and_lists_every_key() -> None:
    path = EXPERIMENTS / "default.yaml"
    assert load_config(path) == TrainConfig()
    assert yaml.safe_load(path.read_text()) == TrainConfig().to_dict()  # plain YAML readers agree too


def test_experiment_recipes_match_the_original_strategy_files() -> None:
    c10 = load_config(EXPERIMENTS / "cifar10_vgg16.yaml")
    c100 = load_config(EXPERIMENTS / "cifar100_vgg16.yaml")
    assert (c10.model, c10.dataset, c100.dataset) == ("vgg16_cifar", "cifar10", "cifar100")
    for c in (c10, c100):
        assert (c.epochs, c.batch_size * c.workers, c.lr, c.cutout_length) == (600, 128, 0.1, 16)
        assert (c.nesterov, c.opt_no_filter, c.dyrep_adjust_interval, c.dyrep_max_adjust_epochs) == (
            False, True, 15, 500,
        )
    # same hyper-parameters as the original files read through the original-format path
    orig = translate_original(yaml.safe_load(ORIGINAL_CIFAR_YAML))
    assert all(getattr(c10, k) == v for k, v in orig.items()), {
        k: (getattr(c10, k), v) for k, v in orig.items() if getattr(c10, k) != v
    }
    orig = translate_original(yaml.safe_load(ORIGINAL_RESNET_YAML))
    for name, model in (("imagenet_resnet18.yaml", "resnet18"), ("imagenet_resnet50.yaml", "resnet50")):
        cfg = load_config(EXPERIMENTS / name)
        assert cfg.model == model and cfg.workers == 8 and cfg.batch_size == 32 and cfg.use_gpu is True
        assert all(getattr(cfg, k) == v for k, v in orig.items()), name
    mbv1 = load_config(EXPERIMENTS / "imagenet_mobilenet_v1.yaml")
    assert (mbv1.model, mbv1.dyrep_adjust_interval, mbv1.dyrep_max_adjust_epochs) == ("mobilenet_v1", 5, 70)
    a2 = load_config(EXPERIMENTS / "imagenet_repvgg_a2.yaml")
    assert a2.model == "timm/repvgg_a2" and a2.dyrep_recal_bn_every_epoch is True
    for name in ("imagenet_repvgg_b2g4.yaml", "imagenet_repvgg_b3.yaml"):
        strong = load_config(EXPERIMENTS / name)
        assert strong.model.startswith("timm/repvgg_b") and strong.dyrep_recal_bn_every_epoch is True
        assert strong.aa == "rand-m9-mstd0.5" and strong.reprob > 0 and strong.remode == "pixel"


# ----------------------------------------------------------------------------------------------------------------
# original DyRep strategy files
# ----------------------------------------------------------------------------------------------------------------


def test_original_cifar_strategy_file_maps_correctly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, "cifar.yaml", ORIGINAL_CIFAR_YAML)
    with caplog.at_level(logging.INFO, logger="dyrep_ray.engine.config"):
        cfg = load_config(path, ["model=vgg16_cifar", "data_dir=data/cifar"])
    assert "original DyRep strategy file" in caplog.text
    assert cfg.nesterov is False  # sgd_no_nesterov: True
    assert cfg.num_data_workers == 4  # original `workers` = DataLoader workers
    assert cfg.workers == TrainConfig().workers  # Ray workers untouched
    assert cfg.opt_no_filter is True
    assert (cfg.dataset, cfg.epochs, cfg.batch_size, cfg.lr, cfg.min_lr) == ("cifar10", 600, 128, 0.1, 1e-6)
    assert (cfg.cutout_length, cfg.remode, cfg.decay_rate, cfg.decay_by_epoch) == (16, "const", 0.967, False)
    assert (cfg.dyrep_adjust_interval, cfg.dyrep_max_adjust_epochs, cfg.dyrep_recal_bn_every_epoch) == (15, 500, False)
    assert cfg.drop_rate == 0.0 and cfg.model == "vgg16_cifar" and cfg.dyrep is True


def test_original_resnet_strategy_file_with_hyphenated_key(tmp_path: Path) -> None:
    path = write(tmp_path, "resnet.yaml", ORIGINAL_RESNET_YAML)
    cfg = load_config(path, ["model=resnet18", "data_dir=/data/imagenet", "workers=8", "use_gpu=true"])
    assert (cfg.model, cfg.dataset, cfg.workers, cfg.num_data_workers) == ("resnet18", "imagenet", 8, 4)
    assert cfg.nesterov is True and cfg.opt_no_filter is False  # keys absent in resnet.yaml keep dyrep-ray defaults
    assert (cfg.color_jitter, cfg.min_lr, cfg.dyrep_adjust_interval) == (0.06, 1e-7, 5)
    assert cfg.drop_path_rate == 0.0


def test_original_dataset_fixes_data_dir_and_image_size_like_the_original(tmp_path: Path) -> None:
    cifar = load_config(write(tmp_path, "cifar.yaml", ORIGINAL_CIFAR_YAML))
    assert (cifar.data_dir, cifar.image_size) == ("data/cifar", 32)
    imagenet = load_config(write(tmp_path, "resnet.yaml", ORIGINAL_RESNET_YAML))
    assert (imagenet.data_dir, imagenet.image_size) == ("data/imagenet", 224)
    custom = load_config(write(tmp_path, "r2.yaml", ORIGINAL_RESNET_YAML + "data_path: /mnt/in1k\n"))
    assert custom.data_dir == "/mnt/in1k"
    assert load_config(write(tmp_path, "r3.yaml", ORIGINAL_RESNET_YAML + "data_path: ''\n")).data_dir == "data/imagenet"
    assert load_config(write(tmp_path, "r4.yaml", ORIGINAL_RESNET_YAML), ["data_dir=/x"]).data_dir == "/x"


def test_original_file_without_model_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, "cifar.yaml", ORIGINAL_CIFAR_YAML)
    with caplog.at_level(logging.WARNING, logger="dyrep_ray.engine.config"):
        cfg = load_config(path, ["data_dir=d"])
    assert cfg.model == TrainConfig().model
    assert "names no model" in caplog.text


def test_original_format_detection_and_marker(tmp_path: Path) -> None:
    assert detect_format({"sgd_no_nesterov": True})[0] == ORIGINAL_FORMAT
    assert detect_format({"drop-path-rate": 0.0})[0] == ORIGINAL_FORMAT
    assert detect_format({"lr": 0.1, "workers": 4})[0] == "dyrep-ray"  # ambiguous keys: dyrep-ray meaning
    assert detect_format({"format": "dyrep-original", "workers": 4})[0] == ORIGINAL_FORMAT
    assert {"sgd_no_nesterov", "drop", "clip_grad_norm", "model_config"} <= ORIGINAL_ONLY_KEYS
    assert "workers" not in ORIGINAL_ONLY_KEYS and "lr" not in ORIGINAL_ONLY_KEYS
    # without a marker `workers` is Ray workers; with it, DataLoader workers
    plain = load_config(write(tmp_path, "a.yaml", "workers: 3\n"))
    assert (plain.workers, plain.num_data_workers) == (3, 0)
    marked = load_config(write(tmp_path, "b.yaml", "format: dyrep-original\nworkers: 3\n"))
    assert (marked.workers, marked.num_data_workers) == (2, 3)
    native = load_config(write(tmp_path, "c.yaml", "format: dyrep-ray\nworkers: 3\n"))
    assert native.workers == 3
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "d.yaml", "format: timm\n"))
    assert_one_line(err, "'format'", "dyrep-original")


def test_original_key_map_is_explicit() -> None:
    assert ORIGINAL_KEY_MAP["workers"].field == "num_data_workers"
    assert ORIGINAL_KEY_MAP["sgd_no_nesterov"][:2] == ("nesterov", "negate")
    assert ORIGINAL_KEY_MAP["drop"].field == "drop_rate"
    assert ORIGINAL_KEY_MAP["drop_path_rate"].field == "drop_path_rate"
    assert ORIGINAL_KEY_MAP["data_path"].field == "data_dir"
    assert ORIGINAL_KEY_MAP["experiment"].action == "ignore"
    field_names = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, entry in ORIGINAL_KEY_MAP.items():
        assert "-" not in key
        assert entry.action in {"copy", "negate", "convert", "ignore", "off-only"}, key
        if entry.action in {"copy", "negate", "convert"}:
            assert entry.field in field_names, key
        if entry.action == "off-only":
            assert entry.neutral, key
    # every key of the original strategy files is covered
    for text in (ORIGINAL_CIFAR_YAML, ORIGINAL_RESNET_YAML):
        for key in yaml.safe_load(text):
            assert key.replace("-", "_") in ORIGINAL_KEY_MAP, key


def test_original_conversions() -> None:
    out = translate_original(
        {
            "model": "timm_repvgg_a2",
            "amp": True,
            "clip_grad_norm": True,
            "clip_grad_max_norm": 2.0,
            "batch_size": 64,
            "val_batch_size_multiplier": 2.0,
            "data_path": "/data/imagenet",
            "decay_rate": None,  # original default None: keep ours
            "dbb": False,
            "mixup": 0.0,
            "kd": "",
            "local-rank": 0,
        }
    )
    assert out["model"] == "timm/repvgg_a2"
    assert out["amp"] == "fp16"
    assert out["clip_grad"] == 2.0
    assert out["val_batch_size"] == 128
    assert out["data_dir"] == "/data/imagenet"
    assert "decay_rate" not in out
    assert translate_original({"clip_grad_norm": False, "clip_grad_max_norm": 5})["clip_grad"] is None
    assert translate_original({"amp": False})["amp"] == "none"
    vgg = translate_original({"model": "nas_model", "model_config": "configs/models/VGG/vgg16_cifar100.yaml"})
    assert vgg["model"] == "vgg16_cifar"
    assert translate_original({"model_config": "configs/models/VGG/vgg16_cifar10.yaml"})["model"] == "vgg16_cifar"


def test_original_ignored_keys_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dyrep_ray.engine.config"):
        out = translate_original({"experiment": "dyrep_cifar10_vgg16", "slurm": False, "lr": 0.1})
    assert out == {"lr": 0.1}
    assert "experiment" in caplog.text and "slurm" in caplog.text


@pytest.mark.parametrize(
    ("raw", "fragments"),
    [
        ({"mixup": 0.2}, ("'mixup'", "not supported", "mixup")),
        ({"dbb": "yes"}, ("'dbb'", "bool")),  # dbb is supported (test_original_dbb_file_is_the_dbb_baseline)
        ({"kd": "dist"}, ("'kd'", "not supported")),
        ({"resume": "exp/last.pth.tar"}, ("'resume'", "storage_path")),
        (
            {"model": "nas_model", "model_config": "configs/models/MobileNetV2/MobileNetV2.yaml"},
            ("nas_model", "--set model="),
        ),
        ({"sgd_no_nesterov": "yes please"}, ("'sgd_no_nesterov'", "true or false")),
        ({"workers": -1}, ("'workers'", "num_data_workers", ">= 0")),
        ({"opt": "rmsprop"}, ("'opt'", "rmsprop")),
        ({"sgd_no_nesterov": True, "lrr": 0.1}, ("unknown original DyRep key 'lrr'", "did you mean 'lr'?")),
        ({"sgd_no_nesterov": True, "use_gpu": True}, ("'use_gpu'", "dyrep-ray key", "--set use_gpu")),
        ({"drop-path-rate": 0.1, "drop_path_rate": 0.2}, ("'drop_path_rate'", "twice")),
    ],
)
def test_original_unsupported_or_bad_values_are_one_line_errors(raw: dict, fragments: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as err:
        translate_original(raw, source="config file 'x.yaml'")
    assert_one_line(err, "x.yaml", *fragments)


def test_original_file_errors_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "strong.yaml", ORIGINAL_CIFAR_YAML + "mixup: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["data_dir=d"])
    assert_one_line(err, "strong.yaml", "'mixup'")


def test_overrides_beat_original_file_values(tmp_path: Path) -> None:
    path = write(tmp_path, "cifar.yaml", ORIGINAL_CIFAR_YAML)
    cfg = load_config(path, ["data_dir=d", "nesterov=true", "num_data_workers=0", "epochs=2"])
    assert (cfg.nesterov, cfg.num_data_workers, cfg.epochs) == (True, 0, 2)


# ----------------------------------------------------------------------------------------------------------------
# round trip
# ----------------------------------------------------------------------------------------------------------------


def test_round_trip_to_dict_from_dict_and_yaml(tmp_path: Path) -> None:
    cfg = load_config(
        EXPERIMENTS / "imagenet_repvgg_b3.yaml",
        ["opt_betas=[0.9, 0.99]", "image_mean=[0.5, 0.5, 0.5]", "clip_grad=1", "storage_path=/tmp/runs"],
    )
    data = cfg.to_dict()
    assert list(data) == [f.name for f in dataclasses.fields(TrainConfig)]
    assert TrainConfig.from_dict(data) == cfg
    data["opt_betas"].append(1.0)  # to_dict returns copies
    assert cfg.opt_betas == [0.9, 0.99]
    path = write(tmp_path, "dump.yaml", cfg.to_yaml())
    assert load_config(path) == cfg
    assert yaml.safe_load(cfg.to_yaml()) == cfg.to_dict()
    assert TrainConfig.from_dict({}) == TrainConfig()


def test_from_dict_rejects_non_mapping() -> None:
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict([("lr", 0.1)])  # type: ignore[arg-type]
    assert_one_line(err, "mapping")


# ----------------------------------------------------------------------------------------------------------------
# declarations, enums, new keys
# ----------------------------------------------------------------------------------------------------------------


def test_every_key_declares_its_rules_with_option() -> None:
    from dyrep_ray.engine.config import RULE_KEY, STRUCTURAL_KEYS

    for f in dataclasses.fields(TrainConfig):
        assert RULE_KEY in f.metadata, f"{f.name} has no option() declaration"
    assert set(STRUCTURAL_KEYS) == {"model", "dataset", "num_classes", "image_size", "opt", "dyrep", "dbb",
                                    "dbb_convert", "dyrep_block"}


def test_enum_values_are_strings_and_serialize_plainly(tmp_path: Path) -> None:
    import json

    from dyrep_ray.engine.config import ConfigEnum

    cfg = TrainConfig(opt="AdamW", dyrep_metric="grad_norm", dyrep_cut_mode="Absorb")
    assert isinstance(cfg.opt, ConfigEnum) and cfg.opt == "adamw" and f"{cfg.opt}" == "adamw"
    assert cfg.dyrep_cut_mode == "absorb" and repr(cfg.sched) == "'cosine'"
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["opt"] == "adamw" and type(cfg.to_dict()["opt"]) is str
    assert "!!python" not in cfg.to_yaml() and yaml.safe_load(cfg.to_yaml())["dyrep_cut_mode"] == "absorb"
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert set(CHOICES["dyrep_cut_mode"]) == {"reset", "absorb"} and set(CHOICES["dyrep_block"]) == {"bn", "online"}


def test_new_keys_defaults_follow_the_original() -> None:
    cfg = TrainConfig()
    assert cfg.dyrep_cut_lone_branch is False and cfg.dyrep_cut_mode == "reset" and cfg.dbb is False
    assert cfg.dyrep_recal_bn_every_epoch_iters == 200 and cfg.dyrep_block == "bn"
    assert cfg.checkpoint_every_steps == 0 and cfg.lr_scale_with_workers is False
    assert cfg.mlflow_tracking_uri is None and cfg.tensorboard is True


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("dyrep_recal_bn_every_epoch_iters=0", ("'dyrep_recal_bn_every_epoch_iters'", ">= 1")),
        ("checkpoint_every_steps=-1", ("'checkpoint_every_steps'", ">= 0")),
        ("dyrep_cut_mode=fold", ("'dyrep_cut_mode'", "reset", "absorb")),
        ("dyrep_block=orepa", ("'dyrep_block'", "bn", "online")),
        ("dyrep_cut_lone_branch=1", ("'dyrep_cut_lone_branch'", "bool")),
        ("mlflow_tracking_uri=''", ("'mlflow_tracking_uri'", "non-empty")),
        ("tensorboard=null", ("'tensorboard'", "bool")),
        ("workers=[4, 2]", ("'workers'", "[min, max]", "min <= max", "[4, 2]")),
        ("workers=[0, 2]", ("'workers'", "1 <= min")),
        ("workers=[1, 2, 3]", ("'workers'", "list [min, max]")),
        ("workers=[1, true]", ("'workers'", "list [min, max]")),
    ],
)
def test_new_keys_reject_bad_values_in_one_line(override: str, fragments: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert_one_line(err, *fragments)


def test_elastic_workers_range() -> None:
    cfg = load_config(None, ["workers=[2, 4]", "lr_scale_with_workers=true"])
    assert cfg.workers == [2, 4] and (cfg.min_workers, cfg.max_workers, cfg.elastic) == (2, 4, True)
    assert TrainConfig(workers=(1, 1)).workers == [1, 1]
    fixed = TrainConfig(workers=3)
    assert (fixed.min_workers, fixed.max_workers, fixed.elastic) == (3, 3, False)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_dbb_baseline_refuses_dyrep() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["dbb=true"])  # dyrep defaults to true
    assert_one_line(err, "'dbb'", "'dyrep'", "dyrep: false")
    cfg = load_config(None, ["dbb=true", "dyrep=false"])
    assert cfg.dbb is True and cfg.dyrep is False


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("metric", ["synflow", "snip"])
def test_amp_refuses_sign_unstable_metrics(amp: str, metric: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"amp={amp}", f"dyrep_metric={metric}"])
    assert_one_line(err, "'amp'", "'dyrep_metric'", metric, "dyrep_metric: grad_norm", "amp: none")
    assert load_config(None, [f"amp={amp}", "dyrep_metric=grad_norm"]).amp == amp
    assert load_config(None, [f"amp={amp}", f"dyrep_metric={metric}", "dyrep=false"]).dyrep is False
    assert load_config(None, [f"dyrep_metric={metric}"]).amp == "none"


def test_original_dyrep_false_file_warns_once_with_the_fix(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = ORIGINAL_CIFAR_YAML.replace("# dyrep\n", "# dyrep\ndyrep: False\n")
    path = write(tmp_path, "cifar.yaml", text)
    with caplog.at_level(logging.WARNING, logger="dyrep_ray.engine.config"):
        cfg = load_config(path, ["model=vgg16_cifar"])
    assert cfg.dyrep is False
    notices = [r for r in caplog.records if r.name == "dyrep_ray.engine.config" and "dyrep: False" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0].getMessage()
    assert "--set dyrep=true" in notices[0].getMessage() and "cifar.yaml" in notices[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dyrep_ray.engine.config"):
        assert load_config(path, ["model=vgg16_cifar", "dyrep=true"]).dyrep is True  # enabled: no notice
        load_config(write(tmp_path, "on.yaml", ORIGINAL_RESNET_YAML), ["model=resnet18"])  # dyrep: True
    assert "dyrep: False" not in caplog.text


def test_original_dbb_file_is_the_dbb_baseline(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert translate_original({"dbb": True}) == {"dbb": True, "dyrep": False}
    assert translate_original({"dbb": True, "dyrep": False}) == {"dbb": True, "dyrep": False}
    path = write(tmp_path, "dbb.yaml", ORIGINAL_CIFAR_YAML + "dbb: True\n")
    with caplog.at_level(logging.WARNING, logger="dyrep_ray.engine.config"):
        cfg = load_config(path, ["model=vgg16_cifar"])
    assert cfg.dbb is True and cfg.dyrep is False
    assert "dyrep: False" not in caplog.text  # a DBB baseline is meant to run without DyRep
    assert "dbb" not in ORIGINAL_ONLY_KEYS


def test_translator_lives_in_its_own_module() -> None:
    from dyrep_ray.engine import original_format

    assert translate_original is original_format.translate_original
    assert ORIGINAL_KEY_MAP is original_format.ORIGINAL_KEY_MAP


# ----------------------------------------------------------------------------------------------------------------
# resume with a changed config
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("saved_change", "key"),
    [
        ({"model": "resnet18"}, "model"),
        ({"num_classes": 7}, "num_classes"),
        ({"opt": "adamw"}, "opt"),
        ({"image_size": 64}, "image_size"),
        ({"dyrep": False}, "dyrep"),
        ({"dyrep_block": "online"}, "dyrep_block"),
    ],
)
def test_resume_refuses_structural_changes(saved_change: dict, key: str) -> None:
    from dyrep_ray.engine.config import resume_changes

    saved = {**TrainConfig().to_dict(), **saved_change}
    with pytest.raises(ConfigError) as err:
        resume_changes(saved, TrainConfig())
    assert_one_line(err, f"'{key}'", "resume", f"{key}=")


def test_resume_returns_allowed_changes() -> None:
    from dyrep_ray.engine.config import ConfigChange, resume_changes

    saved = TrainConfig(epochs=6, lr=0.05).to_dict()
    saved.pop("tensorboard")  # written by an older version: absent = today's default
    saved["retired_key"] = 1  # a key that no longer exists is ignored
    new = TrainConfig(epochs=12, lr=0.1, weight_decay=1e-4, opt="SGD")
    changes = resume_changes(saved, new)
    assert changes == [ConfigChange("epochs", 6, 12), ConfigChange("lr", 0.05, 0.1),
                       ConfigChange("weight_decay", 5e-4, 1e-4)]
    assert str(changes[1]) == "lr: 0.05 -> 0.1"
    assert resume_changes(TrainConfig().to_dict(), TrainConfig()) == []
    assert resume_changes({**TrainConfig().to_dict(), "opt": "SGD"}, TrainConfig()) == []  # normalized


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_resumed_optimizer_keeps_new_hyperparameters_and_restores_buffers(opt: str) -> None:
    import torch

    from dyrep_ray.engine.assembly import build_optimizer
    from dyrep_ray.engine.checkpoint import load_optimizer_state_by_name, optimizer_state_by_name

    def trained(cfg: TrainConfig) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        optimizer = build_optimizer(cfg, model)
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.randn(2, 3, 6, 6)).square().mean().backward()
            optimizer.step()
        return model, optimizer

    old_cfg = TrainConfig(opt=opt, weight_decay=5e-4, momentum=0.9, opt_eps=1e-8)
    model, old_opt = trained(old_cfg)
    saved = optimizer_state_by_name(old_opt, model)
    new_cfg = old_cfg.replace(weight_decay=1e-2, momentum=0.5, nesterov=False, opt_eps=1e-6,
                              opt_betas=[0.8, 0.9])
    new_opt = build_optimizer(new_cfg, model)
    load_optimizer_state_by_name(new_opt, model, saved)
    decays = sorted(g["weight_decay"] for g in new_opt.param_groups)
    assert decays == [0.0, 1e-2]
    for group in new_opt.param_groups:
        if opt == "sgd":
            assert group["momentum"] == 0.5 and group["nesterov"] is False
        else:
            assert group["betas"] == (0.8, 0.9) and group["eps"] == 1e-6
    buffer_keys = ("momentum_buffer",) if opt == "sgd" else ("exp_avg", "exp_avg_sq")
    for param in model.parameters():
        for key in buffer_keys:
            assert torch.equal(new_opt.state[param][key], old_opt.state[param][key]), key
    # a weight-decay change to 0 turns two groups into one: state still follows the parameters by name
    single = build_optimizer(new_cfg.replace(weight_decay=0.0), model)
    assert len(single.param_groups) == 1
    load_optimizer_state_by_name(single, model, saved)
    for param in model.parameters():
        assert torch.equal(single.state[param][buffer_keys[0]], old_opt.state[param][buffer_keys[0]])


# ----------------------------------------------------------------------------------------------------------------
# hostile YAML
# ----------------------------------------------------------------------------------------------------------------


def test_nested_alias_yaml_is_one_line_error_quickly(tmp_path: Path) -> None:
    import time

    levels = ["&l0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        levels.append(f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    text = "model: [" + ", ".join(levels) + "]\n"  # 9**9 leaves once expanded
    assert len(text.encode()) < 600
    path = write(tmp_path, "bomb.yaml", text)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert time.perf_counter() - start < 5
    assert len(assert_one_line(err, "bomb.yaml", "'model'", "str")) < 400
    with pytest.raises(ConfigError) as err:  # the same value in an original-format file
        load_config(write(tmp_path, "bomb_orig.yaml", "sgd_no_nesterov: true\n" + text.replace("model:", "opt:")))
    assert len(assert_one_line(err, "'opt'")) < 500


def test_deeply_nested_yaml_is_one_line_error(tmp_path: Path) -> None:
    path = write(tmp_path, "deep.yaml", "lr: " + "[" * 20000 + "]" * 20000 + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert_one_line(err, "deep.yaml", "too deeply")


# ----------------------------------------------------------------------------------------------------------------
# removed keys
# ----------------------------------------------------------------------------------------------------------------


def test_removed_key_in_a_yaml_file_is_refused_in_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "old.yaml", "epochs: 3\nlog_interval: 50\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = assert_one_line(err, "old.yaml", "'log_interval'", "removed", "delete it")
    assert "unknown" not in message and "original" not in message


def test_removed_key_as_set_or_base_or_dict_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["log_interval=1000"])
    assert_one_line(err, "--set 'log_interval=1000'", "'log_interval'", "removed", "delete it")
    with pytest.raises(ConfigError) as err:
        load_config(None, base={"log_interval": 10})
    assert_one_line(err, "base config", "'log_interval'", "removed")
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"log_interval": 10})
    assert_one_line(err, "'log_interval'", "removed")
    assert "log_interval" not in TrainConfig().to_dict()


def test_removed_key_does_not_make_a_file_original_format(tmp_path: Path) -> None:
    assert detect_format({"lr": 0.1, "log_interval": 50})[0] == "dyrep-ray"
    assert "log_interval" not in ORIGINAL_ONLY_KEYS


def test_original_strategy_file_log_interval_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert "log_interval:" in ORIGINAL_CIFAR_YAML
    with caplog.at_level(logging.WARNING):
        cfg = load_config(write(tmp_path, "cifar.yaml", ORIGINAL_CIFAR_YAML), ["model=vgg16_cifar"])
    assert cfg.epochs == 600
    ignored = [r.getMessage() for r in caplog.records if "ignoring original DyRep keys" in r.getMessage()]
    assert len(ignored) == 1 and "log_interval" in ignored[0], ignored


@pytest.mark.parametrize("how", ["yaml", "set"])
def test_cli_refuses_removed_key_with_one_line_and_exit_2(tmp_path: Path, how: str) -> None:
    import subprocess

    path = write(tmp_path, "old.yaml", "log_interval: 50\n")
    extra = ["-c", str(path)] if how == "yaml" else ["--set", "log_interval=50"]
    done = subprocess.run([sys.executable, "-m", "dyrep_ray.cli", "train", "--output", str(tmp_path), *extra],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("dyrep-ray: error:")]
    assert len(errors) == 1 and "'log_interval' was removed" in errors[0] and "delete it" in errors[0], done.stderr


# ----------------------------------------------------------------------------------------------------------------
# module layering: each config module imports only those below it; original_format sits above the schema
# ----------------------------------------------------------------------------------------------------------------

ENGINE = Path(__file__).resolve().parents[1] / "dyrep_ray" / "engine"
# bottom to top: a module may import (at any level of its code) only modules listed before it
CONFIG_LAYERS = ("config_rules", "config_values", "config_checks", "original_keys", "config_schema",
                 "original_format", "config", "config_reference")


def _engine_imports(module: str) -> set[str]:
    """The dyrep_ray.engine modules ``module`` imports anywhere in its code (type-checking blocks included)."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse((ENGINE / f"{module}.py").read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 1:
                found |= {base} if base else {alias.name for alias in node.names}
            elif base.startswith("dyrep_ray.engine."):
                found.add(base.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("dyrep_ray.engine.")}
    return found


def test_config_modules_import_only_modules_below_them() -> None:
    for i, module in enumerate(CONFIG_LAYERS):
        above = set(CONFIG_LAYERS[i:])
        assert not _engine_imports(module) & above, f"{module} imports {_engine_imports(module) & above}"
    # the format dispatch is the entry point's: nothing the schema builds on knows the original format
    for module in ("config_rules", "config_values", "config_checks", "config_schema"):
        assert "original_format" not in _engine_imports(module)
    assert "config" not in _engine_imports("original_format")


def test_original_format_imports_first_in_a_fresh_interpreter() -> None:
    import subprocess

    code = ("import dyrep_ray.engine.original_format as o, dyrep_ray.engine.config as c; "
            "assert c.translate_original is o.translate_original and c.ORIGINAL_KEY_MAP is o.ORIGINAL_KEY_MAP")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_every_key_has_one_line_of_help() -> None:
    from dyrep_ray.engine.config import field_names, field_rule

    for f in dataclasses.fields(TrainConfig):
        text = field_rule(f).help
        assert text.strip() and "\n" not in text and len(text) <= 160, f"{f.name}: help {text!r}"
    assert len(field_names()) == len(dataclasses.fields(TrainConfig))
