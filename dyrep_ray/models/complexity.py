"""Model size and cost: parameter count and multiply-accumulates (MACs) of one forward pass."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..rep.blocks import is_block

DEFAULT_FLOPS_INPUT_SIZE = (3, 32, 32)


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; each shared tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def _conv_macs(module: nn.Conv2d, output: torch.Tensor) -> int:
    kh, kw = module.kernel_size
    per_output = (module.in_channels // module.groups) * kh * kw
    return output.numel() * per_output


def _linear_macs(module: nn.Linear, output: torch.Tensor) -> int:
    return output.numel() * module.in_features


def _reference_tensor(model: nn.Module) -> torch.Tensor | None:
    for tensor in model.parameters():
        return tensor
    for tensor in model.buffers():
        if tensor.is_floating_point():
            return tensor
    return None


def count_macs(model: nn.Module, input_size: Sequence[int] = DEFAULT_FLOPS_INPUT_SIZE) -> int:
    """Multiply-accumulates of every ``nn.Conv2d`` and ``nn.Linear`` for one sample of shape ``input_size``.

    A block whose branch convs do not run as modules counts what its forward ran on the activations
    (:meth:`~dyrep_ray.rep.block_base.RepBlock.forward_macs`; an online block: one kxk conv on the
    assembled-kernel path).
    Runs one dummy forward (batch 1) in eval mode under ``torch.no_grad`` on the model's device and dtype,
    then restores every module's training flag. Bias additions are not counted (the usual MAC convention).
    """
    reference = _reference_tensor(model)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if is_block(module):
            total += module.forward_macs(inputs[0]) or 0  # None: its convs run as modules and count themselves
        elif isinstance(module, nn.Conv2d):
            total += _conv_macs(module, output)
        elif isinstance(module, nn.Linear):
            total += _linear_macs(module, output)

    modes = {module: module.training for module in model.modules()}
    handles = [
        module.register_forward_hook(hook)
        for module in model.modules()
        if isinstance(module, (nn.Conv2d, nn.Linear)) or is_block(module)
    ]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_size), device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    return int(total)
