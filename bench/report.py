"""Turn benchmark results into table rows (markdown, pasteable into docs/benchmarks.md)."""

from __future__ import annotations


def _x(v: float, digits: int = 2) -> str:
    return f"{v:.{digits}f}x"


def _status(met) -> str:
    return "n/a" if met is None else ("met" if met else "MISSED")


def rows_dyrep(r: dict) -> list[tuple]:
    return [
        ("1", f"DyRep recording on/off, {r['model']} b{r['batch']} step time",
         f"{_x(r['ratio_on_off'], 3)} wall, {_x(r['cpu_ratio_on_off'], 3)} CPU "
         f"({r['step_s_off'] * 1e3:.0f} ms/step; record_metrics {r['record_metrics_s'] * 1e3:.1f} ms)", "report", None),
        ("1", "DyRep host syncs / collectives per step (record_metrics)",
         f"{r['syncs_per_step']} / {r['collectives_per_step']} (decision time: {r['decision_time_syncs']} / "
         f"{r['decision_time_collectives']})", "0 / 0", r["met"]),
    ]


def rows_dbb(r: dict) -> list[tuple]:
    rows = []
    for name, e in r["shapes"].items():
        rows.append(("2", f"bn block 7-branch fwd+bwd time, fused / faithful original, {name}",
                     f"{_x(e['fused_over_original_time'])} wall, {_x(e['fused_over_original_cpu_time'])} CPU "
                     f"(the original's convs alone: {_x(e['convs_only_over_original_time'])}; fused = "
                     f"{_x(e['fused_over_conv_time'], 1)} conv+BN)", f"<= {r['goal_time']}x", e["met_time"]))
        rows.append(("2", f"bn block peak fwd+bwd memory, fused / faithful original, {name}",
                     f"{_x(e['fused_over_original_peak_mem'])} ({e['peak_bytes']['dbb_fused'] / 2**20:.1f} vs "
                     f"{e['peak_bytes']['dbb_original'] / 2**20:.1f} MiB; conv+BN "
                     f"{e['peak_bytes']['conv_bn'] / 2**20:.1f} MiB)", f"<= {r['goal_mem']}x", e["met_mem"]))
        rows.append(("2", f"bn block bytes saved for backward, fused / faithful original, {name}",
                     f"{_x(e['fused_over_original_saved_mem'])} ({e['saved_bytes']['dbb_fused'] / 2**20:.1f} vs "
                     f"{e['saved_bytes']['dbb_original'] / 2**20:.1f} MiB)", f"<= {r['goal_mem']}x",
                     e["met_saved"]))
    return rows


def rows_schedule(r: dict) -> list[tuple]:
    s, d = r["schedule"], r["deploy"]
    return [
        ("3", f"ResNet-18 32x32 b{s['batch']} step time, DyRep schedule mean / all-DBB",
         f"{_x(s['schedule_over_all_dbb'])} wall, {_x(s['schedule_over_all_dbb_cpu'])} CPU (all-DBB = "
         f"{_x(s['all_dbb_over_plain'])} plain, schedule = {_x(s['schedule_over_plain'])} plain)", "<= 0.6x",
         s["met"]),
        ("4", "Deployed params == plain params",
         f"{d['params_deployed']:,} vs {d['params_plain']:,} (trained {d['params_trained']:,}; "
         f"max|diff| {d['max_abs_output_diff']:.1e})", "equal", d["params_equal"]),
        ("4", f"Deployed / plain eval latency, b{d['batch']}",
         f"{_x(d['latency_ratio'], 3)} wall, {_x(d['latency_cpu_ratio'], 3)} CPU", "1.00 +- 0.03",
         abs(d["latency_ratio"] - 1) <= 0.03),
    ]


def rows_adjust(r: dict) -> list[tuple]:
    return [("5", f"Adjust (grow + recal {r['recal_batches']} batches + DDP re-wrap), {r['model']} b{r['batch']}",
             f"{r['adjust_in_steps']:.1f} steps ({r['adjust_s']:.2f} s: recal {r.get('recal_s', 0):.2f}, "
             f"re-wrap {r['ddp_rewrap_s']:.3f}, rest {r['plan_apply_surgery_other_s']:.2f})", "<= 30 steps",
             r["met"])]


def rows_ray(r: dict) -> list[tuple]:
    return [
        ("6", "Ray TorchTrainer (1 worker) / --local, per-epoch time",
         f"{_x(r['epoch_ratio'], 3)} epoch, {_x(r['train_ratio'], 3)} train loop "
         f"({r['epoch_s_ray']:.2f} vs {r['epoch_s_local']:.2f} s)", "<= 1.05x", r["met"]),
        ("6", "Start-up (outside epochs)",
         f"Ray run {r['startup_s_ray']:.1f} s + ray.init {r['ray_init_s']:.1f} s; local {r['startup_s_local']:.1f} s",
         "report", None),
    ]


def rows_data(r: dict) -> list[tuple]:
    c = r["consumption"]
    rows = []
    for name, lr in r["loaders"].items():
        rows.append(("7", f"Data: {name} images/s vs vgg16_cifar b{c['batch']} training",
                     f"{lr['images_per_s']:.0f} vs {c['images_per_s']:.1f} img/s = {_x(r['ratios'][name], 1)}",
                     "> 1x", r["ratios"][name] > 1))
    return rows


def rows_upload(r: dict) -> list[tuple]:
    if "skipped" in r:
        return [("8", "Checkpoint upload: seconds blocked in ray.train.report, async / sync", r["skipped"], "", None)]
    return [("8", f"Checkpoint upload to S3 (moto), {r['checkpoint_mb']} MiB: blocked in ray.train.report, "
             "async / sync",
             f"{_x(r['async_over_sync'], 3)} ({r['async_blocked_s']:.3f} vs {r['sync_blocked_s']:.2f} s per "
             f"checkpoint; sync {r['sync_mb_per_s']:.0f} MiB/s)", f"<= {r['goal']}x", r["met"])]


ROW_BUILDERS = {"dyrep_overhead": rows_dyrep, "dbb_block": rows_dbb, "schedule": rows_schedule,
                "adjust": rows_adjust, "ray_overhead": rows_ray, "data_path": rows_data,
                "checkpoint_upload": rows_upload}


def markdown_table(rows: list[tuple]) -> str:
    lines = ["| # | measurement | result | goal | status |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {what} | {value} | {goal} | {_status(met)} |" for n, what, value, goal, met in rows]
    return "\n".join(lines)
