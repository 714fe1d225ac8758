"""Sweep plots (matplotlib, Agg backend: no display needed).

throughput_vs_gpus.png: tokens/s/GPU against the number of GPUs, one line per series (model, TP, PP, sequence
length, AGTO); a flat line is perfect scaling — weak scaling when the sweep grows the global batch with DP
(global_batch_per_dp), strong scaling when it keeps it fixed. agto_overhead.png: per layout, the step-time
overhead of AGTO on over AGTO off, in percent (the 5% target drawn as a dashed line).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_scaling", "plot_agto_overhead"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scaling(rows: list[dict], path: Path) -> None:
    plt = _pyplot()
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if row["state"] == "ok" and row["tokens_per_second_per_gpu"] is not None:
            label = (f"{row['model'] or 'base'} tp{row['tp']} pp{row['pp']} seq{row['seq_length'] or 'base'} "
                     f"agto-{'on' if row['agto'] else 'off'}")
            series.setdefault(label, []).append((row["num_gpus"], row["tokens_per_second_per_gpu"]))
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, points in sorted(series.items()):
        points.sort()
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    axes.set_xlabel("GPUs (ranks)")
    axes.set_ylabel("tokens / s / GPU (median after warmup)")
    axes.set_title("Throughput vs GPUs (flat = linear scaling)")
    if series:
        axes.set_xscale("log", base=2)
        axes.legend(fontsize=7)
    else:
        axes.text(0.5, 0.5, "no finished points", ha="center", transform=axes.transAxes)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_agto_overhead(overhead: list[dict], path: Path) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 0.5 + 0.5 * max(len(overhead), 2)))
    labels = [row["layout"] for row in overhead]
    values = [100 * row["step_time_overhead"] for row in overhead]
    axes.barh(range(len(values)), values)
    axes.set_yticks(range(len(values)), labels, fontsize=7)
    axes.axvline(5, linestyle="--", color="gray", label="5% target")
    axes.set_xlabel("step time, AGTO on vs off (%)")
    axes.set_title("AGTO overhead per layout")
    if not overhead:
        axes.text(0.5, 0.5, "no layout with both AGTO on and off finished", ha="center", transform=axes.transAxes)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
