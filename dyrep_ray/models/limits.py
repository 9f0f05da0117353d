"""Refuse a model too large to build before a byte of it is allocated.

A checkpoint's meta, a deployed model's JSON sidecar or a config can name any timm model and any ``num_classes``:
``timm/vit_gigantic_patch14_clip_224`` (1.8e9 parameters, 7.4 GB of float32) or a ResNet-18 with 1e7 classes
(5.1e9) would be allocated (and initialized) by a plain build, killing the process for lack of memory.  The
model is first built on PyTorch's ``meta`` device, which records shapes and allocates nothing, and refused above
:data:`MAX_MODEL_PARAMS`.
"""

from __future__ import annotations

import logging

import torch

from ..errors import UserError
from .registry import build_model

logger = logging.getLogger(__name__)

#: 1e9 parameters: 4 GB of float32 weights, ~16 GB with gradients and two AdamW moments -- beyond what one of this
#: project's workers trains, and 40x ResNet-50 (the largest network of the DyRep paper); the largest timm convnets
#: (convnext_xxlarge, 846M) still fit under it.
MAX_MODEL_PARAMS = 1_000_000_000


class ModelTooLargeError(UserError, ValueError):
    """The named model (with its classifier) has more parameters than :data:`MAX_MODEL_PARAMS`."""


def meta_param_count(name: str, num_classes: int, **kwargs) -> int | None:
    """Parameters of ``build_model(name, num_classes, **kwargs)``, counted on the meta device (None if a builder
    cannot run there; the caller then builds it for real, as before)."""
    try:
        with torch.device("meta"):
            model = build_model(name, num_classes, **kwargs)
    except UserError:
        raise
    except (RuntimeError, NotImplementedError, TypeError) as exc:  # an init that needs real data
        logger.debug("cannot build %s on the meta device (%s); not size-checked", name, exc)
        return None
    return sum(p.numel() for p in model.parameters())


def check_model_size(name: str, num_classes: int, where: str, **kwargs) -> None:
    """Raise :class:`ModelTooLargeError` (one line naming ``where`` the model was named) above the cap."""
    count = meta_param_count(name, int(num_classes), **kwargs)
    if count is not None and count > MAX_MODEL_PARAMS:
        raise ModelTooLargeError(f"{where} names {name} with {num_classes} classes: {count:,} parameters, more "
                                 f"than dyrep-ray builds ({MAX_MODEL_PARAMS:,}); check the model name and "
                                 "num_classes")
