"""Ray Data adapter for :class:`~dyrep_ray.data.parquet.BatchDecoder` (imports Ray; load it lazily)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from ray.data.collate_fn import NumpyBatchCollateFn


class NumpyBatchDecoder(NumpyBatchCollateFn):
    """``collate_fn`` for ``iter_torch_batches``: numpy batch dict -> ``(images, labels)`` via a decoder."""

    def __init__(self, decoder: Callable[[Mapping[str, Any]], tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.decoder = decoder

    def __call__(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder(batch)
