"""Training from Parquet shards: Ray Data `get_dataset_shard` per worker, and the same files under --local."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from dyrep_ray.data.parquet import export_parquet, parquet_row_count
from dyrep_ray.engine.config import load_config
from dyrep_ray.engine.context import LocalContext
from dyrep_ray.engine.loop import train
from dyrep_ray.rundir.layout import METRICS_FILE

SIZES = dict(synthetic_train_size=192, synthetic_val_size=64)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("pq")
    for split in ("train", "val"):
        export_parquet("synthetic", None, root / split, split=split, rows_per_shard=64, seed=42, **SIZES)
    assert parquet_row_count(root / "train") == 192
    return root


def _overrides(root):
    return ["dataset=parquet", f"parquet_train={root / 'train'}", f"parquet_val={root / 'val'}", "epochs=2",
            "batch_size=32", "dyrep_recal_bn_iters=2", "workers=2"]


def test_parquet_local(shards, tmp_path):
    cfg = load_config(None, _overrides(shards))
    summary = train(cfg, LocalContext(torch.device("cpu"), tmp_path / "run"))
    lines = [json.loads(x) for x in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["events"] and summary["grows"] == 1


@pytest.mark.ray
def test_parquet_through_ray_data_two_workers(ray_session, shards, tmp_path):
    from dyrep_ray.distributed.trainer import run_distributed

    cfg = load_config(None, _overrides(shards))
    summary = run_distributed(cfg, tmp_path, "pq")
    lines = [json.loads(x) for x in (tmp_path / "pq" / METRICS_FILE).read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    grow_epoch = lines[0]
    assert grow_epoch["events"] and grow_epoch["replica_digests"][0] == grow_epoch["replica_digests"][1]
    assert summary["grows"] == 1
    assert lines[-1]["val_top1"] > 0.0


def test_parquet_listing_starts_a_footer_actor_per_footer_batch_not_32(shards, monkeypatch):
    """Ray Data lists Parquet shards with a pool of footer-reading actors per execution (every epoch), 32 unless
    RAY_DATA_PARQUET_FOOTER_NUM_ACTORS says otherwise: for a few shards that is 32 new processes per epoch."""
    import ray.data
    from ray.data._internal.datasource_v2.formats.parquet.footer_file_indexer import FooterFileIndexer

    from dyrep_ray.distributed import ray_data

    monkeypatch.delenv(ray_data.FOOTER_ACTORS_ENV, raising=False)
    monkeypatch.delenv(ray_data.FOOTER_BATCH_ENV, raising=False)
    # Ray sizes the pool from the variable as read_parquet builds the indexer (the plan carries it to execution)
    assert FooterFileIndexer(ignore_missing_paths=False)._num_actors == ray_data.FOOTER_MAX_ACTORS
    monkeypatch.setenv(ray_data.FOOTER_ACTORS_ENV, "3")
    assert FooterFileIndexer(ignore_missing_paths=False)._num_actors == 3
    monkeypatch.delenv(ray_data.FOOTER_ACTORS_ENV)

    seen = []
    monkeypatch.setattr(ray.data, "read_parquet", lambda paths, **kw: seen.append(
        (len(paths), os.environ.get(ray_data.FOOTER_ACTORS_ENV))))
    # Ray's module default is read at its import: a process's first listing must not import it under ours
    monkeypatch.delitem(sys.modules, FooterFileIndexer.__module__)
    ray_data.read_parquet_dataset(shards / "train")
    assert sys.modules[FooterFileIndexer.__module__]._DEFAULT_NUM_ACTORS == ray_data.FOOTER_MAX_ACTORS
    ray_data.read_parquet_dataset([f"s{i}.parquet" for i in range(25)])
    ray_data.read_parquet_dataset([f"s{i}.parquet" for i in range(1000)])
    assert seen == [(3, "1"), (25, "3"), (1000, "32")]
    assert ray_data.FOOTER_ACTORS_ENV not in os.environ  # set for the call only
    monkeypatch.setenv(ray_data.FOOTER_ACTORS_ENV, "7")  # the user's setting wins
    ray_data.read_parquet_dataset(shards / "train")
    assert seen[-1] == (3, "7") and os.environ[ray_data.FOOTER_ACTORS_ENV] == "7"
