"""Caps that more than one layer enforces, torch-free so that config checks (engine/config.py) can import them.

(models/limits.py holds the model-size cap, which needs torch to count parameters on the meta device.)
"""

from __future__ import annotations

#: The most classes a config, a checkpoint's meta or a deployed model's sidecar may name: a classifier head is
#: built from it (1e7 classes x 2048 features would be 80 GB); ImageNet-21k, the largest public label set, has 21,841.
MAX_NUM_CLASSES = 100_000
