"""A built-in, deterministic, learnable image-classification dataset (no files, no downloads).

Each class has a smooth random RGB template (low-resolution noise upsampled bilinearly). A sample is its class
template, randomly shifted (circularly), flipped, scaled in contrast and brightness, blended with a smooth
random distractor pattern and pixel noise, then quantized to uint8 pixels. A small CNN learns it clearly above
chance within a few epochs, but it is not trivially separable.

Everything derives from ``seed`` through ``torch.Generator`` on the CPU, so every process (e.g. every Ray
worker) that builds the dataset with the same arguments gets bit-identical tensors.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .errors import DatasetError

logger = logging.getLogger(__name__)

SYNTHETIC_NUM_CLASSES = 10
SYNTHETIC_CHANNELS = 3
SYNTHETIC_MEAN = (0.5, 0.5, 0.5)
SYNTHETIC_STD = (0.2, 0.2, 0.2)

TEMPLATE_GRID = 4            # low-resolution side of a class template before upsampling
DISTRACTOR_GRID = 4          # low-resolution side of the per-sample distractor pattern
MAX_SHIFT_FRACTION = 0.125   # circular shift of up to 1/8 of the image side in each direction
CONTRAST_RANGE = (0.6, 1.4)  # per-sample multiplier of the template
BRIGHTNESS_STD = 0.35        # per-sample, per-channel additive offset (in template units)
DISTRACTOR_WEIGHT = 1.0      # weight of the class-independent smooth distractor
PIXEL_NOISE_STD = 0.7        # i.i.d. pixel noise (in template units)
PIXEL_SCALE = 0.12           # template units -> [0, 1] pixel intensity around 0.5
_PIXEL_CENTER = 0.5
_UINT8_MAX = 255

# independent random streams derived from one seed
_TEMPLATE_STREAM = 0
_TRAIN_STREAM = 1
_VAL_STREAM = 2
_SEED_STRIDE = 1_000_003


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed * _SEED_STRIDE + stream)


def _smooth_noise(count: int, grid: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` smooth random RGB patterns of shape (3, size, size), unit-ish scale."""
    low = torch.randn(count, SYNTHETIC_CHANNELS, grid, grid, generator=generator)
    high = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return high / high.flatten(1).std(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)


def class_templates(seed: int, image_size: int, num_classes: int = SYNTHETIC_NUM_CLASSES) -> torch.Tensor:
    """The per-class templates (num_classes, 3, image_size, image_size) of the dataset built from ``seed``."""
    return _smooth_noise(num_classes, TEMPLATE_GRID, image_size, _generator(seed, _TEMPLATE_STREAM))


def _generate_pixels(
    templates: torch.Tensor, size: int, image_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` uint8 NHWC images and their int64 labels (balanced: label = index mod num_classes, permuted)."""
    num_classes = templates.shape[0]
    labels = torch.arange(size) % num_classes
    labels = labels[torch.randperm(size, generator=generator)]
    max_shift = max(1, int(image_size * MAX_SHIFT_FRACTION))
    shifts = torch.randint(-max_shift, max_shift + 1, (size, 2), generator=generator)
    flips = torch.rand(size, generator=generator) < 0.5
    low, high = CONTRAST_RANGE
    contrast = low + (high - low) * torch.rand(size, 1, 1, 1, generator=generator)
    brightness = BRIGHTNESS_STD * torch.randn(size, SYNTHETIC_CHANNELS, 1, 1, generator=generator)
    distractor = _smooth_noise(size, DISTRACTOR_GRID, image_size, generator)
    noise = torch.randn(size, SYNTHETIC_CHANNELS, image_size, image_size, generator=generator)

    base = templates[labels]
    shifted = torch.empty_like(base)
    for index in range(size):
        image = torch.roll(base[index], shifts=(int(shifts[index, 0]), int(shifts[index, 1])), dims=(1, 2))
        shifted[index] = torch.flip(image, dims=(2,)) if flips[index] else image
    signal = contrast * shifted + brightness + DISTRACTOR_WEIGHT * distractor + PIXEL_NOISE_STD * noise
    pixels = (_PIXEL_CENTER + PIXEL_SCALE * signal).clamp(0.0, 1.0)
    pixels = torch.round(pixels * _UINT8_MAX).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous(), labels.to(torch.int64)


def normalize_uint8_nhwc(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 NHWC pixels -> float32 NCHW, scaled to [0, 1] then normalized per channel."""
    images = pixels.permute(0, 3, 1, 2).to(torch.float32) / _UINT8_MAX
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


class SyntheticImageDataset(Dataset):
    """In-memory split of the synthetic dataset.

    Attributes: ``images`` float32 (N, 3, S, S) normalized; ``pixels`` uint8 (N, S, S, 3) (what a PNG export
    stores); ``targets`` list of int labels; ``classes`` class names.
    """

    def __init__(
        self,
        pixels: torch.Tensor,
        labels: torch.Tensor,
        classes: list[str],
        mean: tuple[float, ...] = SYNTHETIC_MEAN,
        std: tuple[float, ...] = SYNTHETIC_STD,
    ) -> None:
        self.pixels = pixels
        self.images = normalize_uint8_nhwc(pixels, mean, std)
        self.labels = labels
        self.targets = [int(label) for label in labels]
        self.classes = classes

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.targets[index]


def build_synthetic(
    *,
    image_size: int,
    seed: int,
    train_size: int,
    val_size: int,
    num_classes: int = SYNTHETIC_NUM_CLASSES,
    mean: tuple[float, ...] = SYNTHETIC_MEAN,
    std: tuple[float, ...] = SYNTHETIC_STD,
) -> tuple[SyntheticImageDataset, SyntheticImageDataset, int]:
    """Train and val splits (independent draws from the same distribution) and the number of classes.

    Images are normalized with ``mean``/``std`` (per channel, on [0, 1] pixels).
    """
    if image_size < 8:
        raise DatasetError(f"synthetic dataset: image_size must be >= 8, got {image_size}")
    if train_size < 1 or val_size < 1:
        raise DatasetError(
            f"synthetic dataset: sizes must be >= 1, got synthetic_train_size={train_size}, "
            f"synthetic_val_size={val_size}"
        )
    templates = class_templates(seed, image_size, num_classes)
    classes = [f"class_{index}" for index in range(num_classes)]
    train_pixels, train_labels = _generate_pixels(templates, train_size, image_size, _generator(seed, _TRAIN_STREAM))
    val_pixels, val_labels = _generate_pixels(templates, val_size, image_size, _generator(seed, _VAL_STREAM))
    logger.info(
        "synthetic dataset: %d train / %d val images of %dx%d, %d classes (seed %d)",
        train_size, val_size, image_size, image_size, num_classes, seed,
    )
    return (
        SyntheticImageDataset(train_pixels, train_labels, classes, mean, std),
        SyntheticImageDataset(val_pixels, val_labels, classes, mean, std),
        num_classes,
    )
