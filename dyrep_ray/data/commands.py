"""``dyrep-ray prepare DATASET --out DIR``: export a dataset to Parquet shards for Ray Data."""

from __future__ import annotations

from .builder import DATASET_NAMES, DEFAULT_IMAGE_SIZE, DEFAULT_SYNTHETIC_TRAIN_SIZE, DEFAULT_SYNTHETIC_VAL_SIZE

BOTH_SPLITS = "both"


def register(subparsers, add_common) -> None:
    from .parquet import DEFAULT_ROWS_PER_SHARD, SPLITS

    p = subparsers.add_parser(
        "prepare", help="export a dataset (synthetic, CIFAR, ImageFolder) to Parquet shards for Ray Data",
        description="Writes <out>/<split>-00000.parquet, ... (with --split both: <out>/train/ and <out>/val/, "
                    "one split per directory) with columns image (PNG / original file bytes) and label (int64), "
                    "un-augmented; training reads them with parquet_train/parquet_val. Nothing is downloaded.")
    p.add_argument("dataset", choices=DATASET_NAMES)
    p.add_argument("--data-dir", help="dataset directory (not needed for synthetic)")
    p.add_argument("--out", required=True, help="output directory for the shards")
    p.add_argument("--split", choices=(*SPLITS, BOTH_SPLITS), default=BOTH_SPLITS)
    p.add_argument("--rows-per-shard", type=int, default=DEFAULT_ROWS_PER_SHARD)
    p.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="synthetic only")
    p.add_argument("--seed", type=int, default=0, help="synthetic only")
    p.add_argument("--synthetic-train-size", type=int, default=DEFAULT_SYNTHETIC_TRAIN_SIZE)
    p.add_argument("--synthetic-val-size", type=int, default=DEFAULT_SYNTHETIC_VAL_SIZE)
    p.add_argument("--overwrite", action="store_true", help="replace existing shards of the same split")
    add_common(p)
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args) -> int:
    from pathlib import Path

    from .errors import DatasetError
    from .parquet import SPLITS, export_parquet

    if args.rows_per_shard < 1:
        raise DatasetError(f"--rows-per-shard must be >= 1, got {args.rows_per_shard}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"--out {out} exists and is not a directory; choose another --out")
    both = args.split == BOTH_SPLITS
    splits = SPLITS if both else (args.split,)
    for split in splits:
        target = out / split if both else out  # one split per directory: never train and val mixed
        paths = export_parquet(
            args.dataset,
            args.data_dir,
            target,
            split=split,
            rows_per_shard=args.rows_per_shard,
            image_size=args.image_size,
            seed=args.seed,
            synthetic_train_size=args.synthetic_train_size,
            synthetic_val_size=args.synthetic_val_size,
            overwrite=args.overwrite,
        )
        print(f"dyrep-ray: prepare: {args.dataset} {split}: {len(paths)} shard(s) in {target}")
    return 0
