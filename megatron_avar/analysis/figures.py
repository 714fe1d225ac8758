"""PNG figures of the analysis reports (matplotlib, Agg backend: no display needed), and :func:`publish`, which
writes a report with its figures."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from megatron_avar import atomic_files

__all__ = ["plot_vas_per_layer", "plot_image_share_heatmap", "plot_ratio_distribution", "plot_vas_vs_accuracy",
           "plot_accuracy_vs_alpha", "publish"]


def publish(report: Path, report_text: str, companions: Mapping[Path, Callable[[Path], object] | None]) -> None:
    """Replace ``report`` by ``report_text`` and the files drawn from it: ``companions`` maps each path to a
    function that writes that file at the path it is given, or to None for a file this report lacks (an earlier
    report's, removed).

    A report is never beside a companion of another run: every companion is written to a temporary file first (a
    failure or a signal there leaves the earlier files as they were), then the earlier report is removed, the
    companions are renamed into place and ``report`` is written last, each atomically (``atomic_files``). A run
    killed in between leaves companions without a report, which the next run replaces."""
    with contextlib.ExitStack() as renames:  # on leaving: each temporary renamed over its file, or removed on error
        for path, write in companions.items():
            if write is not None:
                write(renames.enter_context(atomic_files.replacing(path)))
        report.unlink(missing_ok=True)
        for path, write in companions.items():
            if write is None:
                path.unlink(missing_ok=True)
    atomic_files.write_text(report, report_text)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # not from the name: publish() draws into temporary files
    _pyplot().close(fig)
    return path


def plot_vas_per_layer(report: dict, path: Path) -> Path:
    """VAS of every analysed layer, one line per sink variant, the overall VAS as dashed lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for variant, label in (("sink_included", "K_sys with sink"), ("sink_excluded", "K_sys without sink")):
        stats = report["variants"].get(variant)
        if stats is None:
            continue
        line, = ax.plot(report["layers"], stats["vas_per_layer"], marker="o", label=f"{label} (VAS {stats['vas']:.3g})")
        ax.axhline(stats["vas"], color=line.get_color(), linestyle="--", linewidth=0.8)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("VAS  (mean of m_IMG / (m_SYS + eps))")
    ax.set_title(f"Visual attention score per layer ({report['num_samples']} samples)")
    lowest, highest = min(report["vas_per_layer"]), max(report["vas_per_layer"])
    ax.set_yscale("log" if lowest > 0 and highest > 50 * lowest else "linear")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_image_share_heatmap(report: dict, path: Path) -> Path:
    """Layer x head heatmap of the image share mean(m_IMG) over the VAS queries."""
    plt = _pyplot()
    share = report["image_share_per_layer_head"]
    layers = report["layers"]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.28 * len(share[0]) + 2.5), max(3.0, 0.25 * len(layers) + 1.5)))
    image = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="image share  mean(m_IMG)")
    step = max(1, len(layers) // 16)
    ax.set_yticks(range(0, len(layers), step), [str(layer) for layer in layers[::step]])
    ax.set_xlabel("head")
    ax.set_ylabel("decoder layer")
    ax.set_title("Image share per layer and head", fontsize=10)
    return _save(fig, path)


def plot_ratio_distribution(report: dict, path: Path) -> Path:
    """Histogram of the per-query ratios m_IMG / (m_SYS + eps) (all layers, heads, VAS queries), log axis."""
    plt = _pyplot()
    edges = report["ratio_histogram_log10_edges"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    used = []
    for variant, label in (("sink_included", "K_sys with sink"), ("sink_excluded", "K_sys without sink")):
        stats = report["variants"].get(variant)
        if stats is None:
            continue
        counts = stats["ratio_histogram"]
        total = max(1, sum(counts))
        # count 0 is "<= 1e-6"; count k covers (edges[k-1], edges[k]]: draw it at its right edge's bin.
        lefts = [edges[0] - (edges[1] - edges[0])] + edges[:-1]
        used += [k for k, c in enumerate(counts) if c]
        artist = ax.stairs([c / total for c in counts], lefts + [edges[-1]], label=label, linewidth=1.5)
        ax.axvline(_log10(stats["vas"]), linestyle="--", linewidth=0.8, color=artist.get_edgecolor())
    if used:  # zoom on the occupied bins
        ax.set_xlim(lefts[min(used)] - 0.5, edges[max(used)] + 0.5)
    ax.set_xlabel("log10 ratio  m_IMG / (m_SYS + eps)   (dashed: VAS, the mean ratio)")
    ax.set_ylabel("fraction of (query, layer, head)")
    ax.set_title("Distribution of per-query ratios")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _log10(value: float) -> float:
    import math

    return math.log10(value) if value > 0 else -6.0


def plot_vas_vs_accuracy(names: Sequence[str], vas: Sequence[float], accuracy: Sequence[float], r: float,
                         p: float | None, path: Path) -> Path:
    """Scatter of VAS against accuracy with the least-squares line, r and p in the title."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter(vas, accuracy)
    for name, x, y in zip(names, vas, accuracy):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    n = len(vas)
    mean_x, mean_y = sum(vas) / n, sum(accuracy) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(vas, accuracy)) / sum((x - mean_x) ** 2 for x in vas)
    xs = [min(vas), max(vas)]
    ax.plot(xs, [mean_y + slope * (x - mean_x) for x in xs], linestyle="--", linewidth=1)
    ax.set_xlabel("VAS")
    ax.set_ylabel("accuracy")
    ax.set_title(f"VAS vs accuracy: Pearson r = {r:.3f}" + ("" if p is None else f", p = {p:.2g}") + f", n = {n}")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_accuracy_vs_alpha(rows: Sequence[dict], baseline: float | None, path: Path) -> Path:
    """Accuracy against alpha_sys, one line per layer set; the no-intervention accuracy as a dashed line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for layer_set in dict.fromkeys(row["layers"] for row in rows):
        points = sorted((row["alpha_sys"], row["accuracy"]) for row in rows if row["layers"] == layer_set)
        ax.plot([a for a, _ in points], [acc for _, acc in points], marker="o", label=f"layers {layer_set}")
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", linewidth=1, label="no intervention")
    values = [row["accuracy"] for row in rows if row["accuracy"] is not None]
    values += [baseline] if baseline is not None else []
    ax.set_ylim(0, min(1.0, 1.15 * max(values)) if values and max(values) > 0 else 1.0)  # accuracy is in [0, 1]
    ax.set_xlabel("alpha_sys")
    ax.set_ylabel("accuracy")
    first = rows[0] if rows else {}
    ax.set_title(f"Intervention sweep ({first.get('mode', '')}, alpha_img = {first.get('alpha_img', '')})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
