"""The keys of original DyRep strategy files (hunto/image_classification_sota) and what each becomes here.

Pure data: the key map is read by :mod:`~dyrep_ray.engine.original_format` to translate a file and by
:mod:`~dyrep_ray.engine.config_schema` to hint, for an original key found in a dyrep-ray config, how to write it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["ORIGINAL_KEY_MAP", "OriginalKey", "original_key_hint"]


class OriginalKey(NamedTuple):
    """How one key of an original DyRep strategy file (hyphens read as underscores) becomes dyrep-ray config.

    ``action``:
      * ``"copy"``    -- the value goes to ``field`` unchanged (``null`` into a non-Optional field keeps the
        dyrep-ray default, as the original's ``None`` meant "unset");
      * ``"negate"``  -- ``field = not value`` (a bool);
      * ``"convert"`` -- translated by dedicated code (model names, AMP flag, gradient clipping pair,
        validation batch multiplier);
      * ``"ignore"``  -- accepted and dropped with one warning (launcher/bookkeeping keys with no effect);
      * ``"off-only"`` -- accepted (and dropped) only with one of the ``neutral`` values that switch the
        original feature off; any other value raises ConfigError (dyrep-ray does not implement it).
    """

    field: str | None
    action: str
    note: str = ""
    neutral: tuple[Any, ...] = ()


_OFF_STR = ("", None)

#: Every key of the original training code (argparse dests + keys seen in its strategy files) -> translation.
ORIGINAL_KEY_MAP: dict[str, OriginalKey] = {
    # dataset / model
    "dataset": OriginalKey("dataset", "copy", "also fixes image_size (224 imagenet, 32 cifar) as the original did"),
    "data_path": OriginalKey("data_dir", "convert", "'' -> data/imagenet or data/cifar, as the original did"),
    "model": OriginalKey("model", "convert", "timm_<name> -> timm/<name>; nas_model needs model_config"),
    "model_config": OriginalKey("model", "convert", "configs/models/VGG/vgg16_cifar10|100.yaml -> vgg16_cifar"),
    "batch_size": OriginalKey("batch_size", "copy", "per GPU there, per Ray worker here"),
    "val_batch_size_multiplier": OriginalKey("val_batch_size", "convert", "val_batch_size = batch_size * m"),
    "smoothing": OriginalKey("smoothing", "copy"),
    # optimizer
    "opt": OriginalKey("opt", "copy"),
    "opt_eps": OriginalKey("opt_eps", "copy"),
    "opt_betas": OriginalKey("opt_betas", "copy"),
    "opt_no_filter": OriginalKey("opt_no_filter", "copy"),
    "momentum": OriginalKey("momentum", "copy"),
    "sgd_no_nesterov": OriginalKey("nesterov", "negate"),
    "weight_decay": OriginalKey("weight_decay", "copy"),
    "clip_grad_norm": OriginalKey("clip_grad", "convert", "true -> clip_grad = clip_grad_max_norm"),
    "clip_grad_max_norm": OriginalKey("clip_grad", "convert", "used only with clip_grad_norm: true"),
    "amp": OriginalKey("amp", "convert", "true -> 'fp16' (torch.cuda.amp), false -> 'none'"),
    # LR schedule
    "sched": OriginalKey("sched", "copy"),
    "lr": OriginalKey("lr", "copy"),
    "warmup_lr": OriginalKey("warmup_lr", "copy"),
    "min_lr": OriginalKey("min_lr", "copy"),
    "epochs": OriginalKey("epochs", "copy"),
    "warmup_epochs": OriginalKey("warmup_epochs", "copy"),
    "decay_epochs": OriginalKey("decay_epochs", "copy"),
    "decay_rate": OriginalKey("decay_rate", "copy"),
    "decay_by_epoch": OriginalKey("decay_by_epoch", "copy"),
    # augmentation & regularization
    "image_mean": OriginalKey("image_mean", "copy"),
    "image_std": OriginalKey("image_std", "copy"),
    "interpolation": OriginalKey("interpolation", "copy"),
    "color_jitter": OriginalKey("color_jitter", "copy"),
    "cutout_length": OriginalKey("cutout_length", "copy"),
    "aa": OriginalKey("aa", "copy"),
    "reprob": OriginalKey("reprob", "copy"),
    "remode": OriginalKey("remode", "copy"),
    "drop": OriginalKey("drop_rate", "copy"),
    "drop_path_rate": OriginalKey("drop_path_rate", "copy"),
    "drop_path_strategy": OriginalKey(
        None, "off-only", "a linearly growing drop-path rate is not implemented", ("const", None)
    ),
    "mixup": OriginalKey(None, "off-only", "mixup is not implemented", (0, 0.0, None)),
    "cutmix": OriginalKey(None, "off-only", "cutmix is not implemented", (0, 0.0, None)),
    "cutmix_minmax": OriginalKey(None, "off-only", "cutmix is not implemented", (None,)),
    "mixup_prob": OriginalKey(None, "ignore", "only used with mixup/cutmix"),
    "mixup_switch_prob": OriginalKey(None, "ignore", "only used with mixup/cutmix"),
    "mixup_mode": OriginalKey(None, "ignore", "only used with mixup/cutmix"),
    "model_ema": OriginalKey("model_ema", "copy"),
    "model_ema_decay": OriginalKey("model_ema_decay", "copy"),
    "auxiliary": OriginalKey(None, "off-only", "auxiliary towers (NAS models) are not implemented", (False, None)),
    "auxiliary_weight": OriginalKey(None, "ignore", "only used with auxiliary towers"),
    # misc / launcher
    "seed": OriginalKey("seed", "copy"),
    "log_interval": OriginalKey(None, "ignore", "a log line every N steps: dyrep-ray logs once per epoch"),
    "workers": OriginalKey("num_data_workers", "copy", "DataLoader workers there; Ray workers are `workers` here"),
    "experiment": OriginalKey(None, "ignore", "run name: dyrep-ray names runs on the command line / storage_path"),
    "resume": OriginalKey(None, "off-only", "resume by re-running with the same storage_path and name", _OFF_STR),
    "slurm": OriginalKey(None, "ignore", "launcher flag: dyrep-ray runs on Ray"),
    "local_rank": OriginalKey(None, "ignore", "set by the launcher; Ray assigns ranks"),
    "dist_port": OriginalKey(None, "ignore", "set by the launcher; Ray sets up the process group"),
    "config": OriginalKey(None, "ignore", "the -c flag of the original command line"),
    # knowledge distillation (later versions of the original code)
    "kd": OriginalKey(None, "off-only", "knowledge distillation is not implemented", _OFF_STR),
    "teacher_model": OriginalKey(None, "ignore", "only used with kd"),
    "teacher_pretrained": OriginalKey(None, "ignore", "only used with kd"),
    "teacher_ckpt": OriginalKey(None, "ignore", "only used with kd"),
    "kd_loss_weight": OriginalKey(None, "ignore", "only used with kd"),
    "ori_loss_weight": OriginalKey(None, "ignore", "only used with kd"),
    "teacher_module": OriginalKey(None, "ignore", "only used with kd"),
    "student_module": OriginalKey(None, "ignore", "only used with kd"),
    "kd_loss_kwargs": OriginalKey(None, "ignore", "only used with kd"),
    # structural re-parameterization
    "dbb": OriginalKey("dbb", "copy", "static DBB baseline; true without a dyrep key also sets dyrep: false"),
    "dyrep": OriginalKey("dyrep", "copy"),
    "dyrep_adjust_interval": OriginalKey("dyrep_adjust_interval", "copy"),
    "dyrep_max_adjust_epochs": OriginalKey("dyrep_max_adjust_epochs", "copy"),
    "dyrep_recal_bn_iters": OriginalKey("dyrep_recal_bn_iters", "copy"),
    "dyrep_recal_bn_every_epoch": OriginalKey("dyrep_recal_bn_every_epoch", "copy"),
    "edgenn_config": OriginalKey(None, "off-only", "EdgeNN models are not implemented", _OFF_STR),
}


def original_key_hint(key: Any) -> str:
    """For a key that is not a dyrep-ray key: how to write it in dyrep-ray form if it is an original DyRep key."""
    if not isinstance(key, str):
        return ""
    entry = ORIGINAL_KEY_MAP.get(key.replace("-", "_"))
    if entry is None:
        return ""
    if entry.action == "negate":
        return f"{key!r} is an original DyRep key: write {entry.field}=false instead"
    if entry.field is not None:
        return f"{key!r} is an original DyRep key: write {entry.field!r} in dyrep-ray configs"
    return f"{key!r} is an original DyRep key that dyrep-ray does not use ({entry.note})"
