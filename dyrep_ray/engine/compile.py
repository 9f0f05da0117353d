"""``compile: true``: the training forward runs under ``torch.compile``, compiled again once per structure change.

DyRep changes the model's structure only at adjust points.  Dynamo guards on module identity and shapes, so a
changed model would otherwise be recompiled frame by frame until ``recompile_limit`` is hit and then run
*eagerly* with one warning.  Instead, every (re)wrap clears dynamo's caches on purpose
(``torch._dynamo.reset()``) and compiles the new wrapper, with ``fail_on_recompile_limit_hit`` set, so a run
that would fall back to eager fails loudly instead.  One log line per compile.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .config_rules import ConfigError

logger = logging.getLogger(__name__)

#: torch.compile backend of ``compile: true`` (tests use "aot_eager": the same graph capture, no codegen).
BACKEND = "inductor"
#: Compiles allowed per structure: every frame's guards (train mode, input shape: the epoch's last, partial
#: batch is one more shape) stay well below it; past it the run fails instead of falling back to eager.
RECOMPILE_LIMIT = 8


def check_compile_supported() -> None:
    """Refuse ``compile: true`` (one line) where torch.compile cannot run."""
    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError("compile: true needs torch.compile, which this Python/torch build does not support; "
                          "set compile=false")


def compile_model(module: nn.Module, reason: str) -> nn.Module:
    """``module`` under torch.compile, with dynamo's caches cleared first (see the module docstring)."""
    check_compile_supported()
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    logger.info("torch.compile (%s backend): compiling the model %s", BACKEND, reason)
    return torch.compile(module, backend=BACKEND)  # type: ignore[return-value]
