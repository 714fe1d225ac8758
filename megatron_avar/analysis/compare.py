"""`avar vas compare`: several VAS reports side by side, and VAS against accuracy (Pearson r, p, scatter).

The first report is the reference for the relative change column (the Lazy Attention Localization
comparison: base, then multimodal cold-start, then text-only cold-start). Accuracies come from a JSON
object {name: accuracy} or a CSV with columns ``name,accuracy``; a key is the path given on the command line or
a report's ``name`` (the model folder's name unless `avar vas --name` set it).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_avar import atomic_files

__all__ = ["load_report", "load_accuracies", "compare_reports", "run_setting"]

_COLUMNS = ("name", "vas", "vas_no_sink", "delta_vs_first", "ratio_of_means", "image_share", "system_share",
            "num_samples", "accuracy")


def load_report(path: str | Path, *, shard_without_samples: bool = False) -> tuple[str, dict]:
    """(argument, report) of a report.json or a folder holding one; ValueError if it is not a VAS report.
    shard_without_samples: also accept the state a shard with no VAS query writes (what `avar vas merge` reads)."""
    path = Path(path)
    file = path / "report.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{path}: no VAS report found (pass report.json files or the folders `avar vas --out` wrote)")
    try:
        report = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: not valid JSON ({error})") from error
    if not isinstance(report, dict):
        raise ValueError(f"{file}: not a VAS report (a JSON {type(report).__name__}, not an object)")
    if report.get("num_samples") == 0 and "accumulator_state" in report:
        if shard_without_samples:
            return str(path), report
        raise ValueError(f"{file}: a shard without VAS samples; merge the run's shards (`avar vas merge`) first")
    required = ("vas", "vas_per_layer", "ratio_of_means", "image_share", "num_samples")
    missing = [key for key in required if key not in report]
    if missing:
        raise ValueError(f"{file}: not a VAS report (missing {missing})")
    report.setdefault("name", file.parent.name)
    return str(path), report


def run_setting(config: dict, key: str):
    """Setting ``key`` of a report's config as the run used it, so that equal settings compare equal: ``data`` as
    an absolute path (``data_resolved``; reports that lack it: ``data`` resolved against the current directory),
    ``layers`` as the layer indexes (``layers_resolved``: "all" and "0-1" of a 2-layer model alike); else as given."""
    if key == "data" and config.get("data") is not None:
        return config.get("data_resolved") or str(Path(config["data"]).resolve())
    if key == "layers" and "layers_resolved" in config:
        return config["layers_resolved"]
    return config.get(key)


def load_accuracies(path: str | Path) -> dict[str, float]:
    """{name: accuracy} from a JSON object or a CSV file with a header ``name,accuracy``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--accuracy {path}: file not found")
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"name", "accuracy"} <= set(reader.fieldnames):
                raise ValueError(f"--accuracy {path}: a CSV needs the columns 'name' and 'accuracy'")
            raw = {row["name"]: row["accuracy"] for row in reader}
    else:
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"--accuracy {path}: not valid JSON ({error}); "
                             'use {"name": accuracy} or a CSV') from error
        if not isinstance(raw, dict):
            raise ValueError(f"--accuracy {path}: the JSON must be an object {{\"name\": accuracy}}")
    accuracies = {}
    for name, value in raw.items():
        try:
            accuracies[str(name)] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"--accuracy {path}: accuracy of {name!r} is {value!r}, not a number") from None
        if not math.isfinite(accuracies[str(name)]):  # a NaN made Pearson r 1.0 with p = 0
            raise ValueError(f"--accuracy {path}: accuracy of {name!r} is {value!r}, not a finite number")
    return accuracies


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return str(value)


COMPARE_FILES = ("compare.md", "compare.json", "vas_vs_accuracy.png")  # the report, its table, its plot


def _refuse_repeated_reports(paths: Sequence[str]) -> None:
    """A report given twice would be a row twice (and a point twice in Pearson r): refused, naming it."""
    seen: dict[Path, str] = {}
    for path in paths:
        resolved = (Path(path) / "report.json" if Path(path).is_dir() else Path(path)).resolve()
        if resolved in seen:
            raise ValueError(f"{path} and {seen[resolved]} are the same report: give each report once")
        seen[resolved] = path


def _check_accuracy_keys(accuracy_file: str, accuracies: dict[str, float], loaded: list) -> None:
    """Every key of --accuracy names a report (its path as given, or its name), and the accuracies share one
    scale (all fractions or all percentages): a typo or a mixed file would correlate against the wrong numbers."""
    known = {argument for argument, _ in loaded} | {report["name"] for _, report in loaded}
    unknown = sorted(set(accuracies) - known)
    if unknown:
        raise ValueError(f"--accuracy {accuracy_file}: {unknown} name no report given here (the reports are "
                         f"{sorted(known)}); remove them or fix their names")
    values = list(accuracies.values())
    if any(v > 1 for v in values) and any(0 < v < 1 for v in values):
        raise ValueError(f"--accuracy {accuracy_file}: the accuracies mix fractions and percentages ({values}); "
                         "give all of them on one scale")


def compare_reports(paths: Sequence[str], accuracy_file: str | None = None, out: str | None = None, *,
                    overwrite: bool = False) -> dict:
    """Build the comparison; write compare.md / compare.json (and vas_vs_accuracy.png) into ``out`` if given
    (an earlier comparison there is replaced only with ``overwrite``). Returns {"rows": [...], "markdown": str,
    "pearson": {r, p_value, n} (r and p_value None, with "undefined" saying why, when the VAS or the accuracy is
    the same for every report) or None without accuracies}."""
    from megatron_avar.analysis.run_vas import refuse_existing_outputs
    from megatron_avar.analysis.stats import pearson

    if not paths:
        raise ValueError("avar vas compare needs at least one report")
    if out is not None:
        refuse_existing_outputs([Path(out) / name for name in COMPARE_FILES], overwrite=overwrite,
                                what="a VAS comparison")
    loaded = [load_report(p) for p in paths]
    _refuse_repeated_reports(paths)
    accuracies = load_accuracies(accuracy_file) if accuracy_file else {}
    if accuracy_file:
        _check_accuracy_keys(accuracy_file, accuracies, loaded)
    rows = []
    first_vas = loaded[0][1]["vas"]
    for argument, report in loaded:
        excluded = (report.get("variants") or {}).get("sink_excluded")
        accuracy = accuracies.get(argument)
        if accuracy is None and report["name"] in accuracies:
            if sum(r["name"] == report["name"] for _, r in loaded) > 1:
                raise ValueError(f"several reports are named {report['name']!r}: key --accuracy by the report paths "
                                 "instead, or give each run its own `avar vas --name`")
            accuracy = accuracies[report["name"]]
        if accuracy_file and accuracy is None:
            raise ValueError(f"--accuracy {accuracy_file}: no accuracy for report {report['name']!r} ({argument}); "
                             f"names there: {sorted(accuracies)}")
        rows.append(dict(name=report["name"], path=argument, vas=report["vas"],
                         vas_no_sink=None if excluded is None else excluded["vas"],
                         delta_vs_first=(report["vas"] - first_vas) / first_vas if first_vas else None,
                         ratio_of_means=report["ratio_of_means"], image_share=report["image_share"],
                         system_share=report.get("system_share"), num_samples=report["num_samples"],
                         accuracy=accuracy, exclude_sink=report.get("exclude_sink", False)))
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    names = [row["name"] for row in rows]
    for row in rows:
        if names.count(row["name"]) > 1:  # same model folder name: tell the rows apart by their paths
            row = dict(row, name=f"{row['name']} ({row['path']})")
        cells = [_fmt(row[c]) if c != "delta_vs_first" or row[c] is None else f"{100 * row[c]:+.1f}%" for c in _COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    correlation: dict[str, Any] | None = None  # r, p_value (None for n = 2), n
    if accuracy_file:
        if len(rows) < 2:
            raise ValueError("a correlation needs at least two reports with accuracies")
        constant = [what for what in ("accuracy", "vas") if len({row[what] for row in rows}) == 1]
        if constant:  # (found in review: all-zero accuracies of early models stopped the comparison, no table)
            what = "accuracy" if constant[0] == "accuracy" else "VAS"
            correlation = dict(r=None, p_value=None, n=len(rows), undefined=f"the {what} is the same for every report")
            lines += ["", f"Pearson r (VAS vs accuracy): undefined, the {what} is the same "
                          f"({_fmt(rows[0][constant[0]])}) for every report, n = {len(rows)}"]
        else:
            r, p = pearson([row["vas"] for row in rows], [row["accuracy"] for row in rows])
            correlation = dict(r=r, p_value=p, n=len(rows))
            lines += ["", f"Pearson r (VAS vs accuracy) = {r:.4f}, p = {_fmt(p)}, n = {len(rows)}"
                      + (" (p undefined for n = 2)" if p is None else "")]
    if any(row["exclude_sink"] for row in rows) and not all(row["exclude_sink"] for row in rows):
        lines += ["", "warning: the reports mix --exclude-sink settings; compare the vas_no_sink column instead"]
    for key, what in (("data", "--data"), ("layers", "--layers")):
        values = {json.dumps(run_setting(report.get("config") or {}, key), sort_keys=True) for _, report in loaded}
        if len(values) > 1:
            lines += ["", f"warning: the reports were computed with different {what} ({', '.join(sorted(values))}); "
                          "their VAS are comparable only on the same samples and layers"]
    # the samples measured, not --num-samples (200 and 500 of a 100-record dataset measure the same ones)
    measured = {tuple(sorted(str(sample.get("id")) for sample in report.get("samples") or [])) for _, report in loaded}
    if len(measured) > 1:
        counts = ", ".join(str(n) for n in sorted({len(ids) for ids in measured}))
        lines += ["", f"warning: the reports measured different samples ({counts} samples); their VAS are comparable "
                      "only on the same samples and layers"]
    markdown = "\n".join(lines) + "\n"
    result = dict(rows=rows, markdown=markdown, pearson=correlation)
    if out is not None:
        _write_comparison(Path(out), result)
    return result


def _write_comparison(folder: Path, result: dict) -> None:
    """compare.md last, after compare.json and the plot (figures.publish): never beside an earlier comparison's
    files; an earlier comparison's plot goes when this one has none."""
    from megatron_avar.analysis.figures import plot_vas_vs_accuracy, publish

    rows, correlation = result["rows"], result["pearson"]

    def plot(path: Path) -> None:
        plot_vas_vs_accuracy([row["name"] for row in rows], [row["vas"] for row in rows],
                             [row["accuracy"] for row in rows], correlation["r"], correlation["p_value"], path)

    table = atomic_files.json_text(dict(rows=rows, pearson=correlation))
    report, data, figure = (folder / name for name in COMPARE_FILES)
    publish(report, result["markdown"], {data: lambda path: path.write_text(table, encoding="utf-8"),
                                         figure: None if correlation is None or correlation["r"] is None else plot})
