"""What every benchmark records beside its numbers (the commit it measured), and where it writes them.

On a machine that received the working tree without its git directory (a lent GPU machine), the caller
passes the commit in MEGATRON_AVAR_COMMIT; otherwise git is asked. "+dirty" marks uncommitted changes to
the files that decide the measurement.

Results are named ``<benchmark>_<device>_<date>`` (``results_stem``); a second run on the same day gets
``..._<date>-2`` and so on, never the earlier run's files.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMIT_ENV = "MEGATRON_AVAR_COMMIT"


def results_stem(directory: str | Path, name: str) -> Path:
    """``directory / name`` (the directory created), or ``name-2``, ``name-3``, ... if results of that name
    (.md or .json) are there already: an earlier run's results are never replaced."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem, index = directory / name, 1
    while any((directory / f"{stem.name}{suffix}").exists() for suffix in (".md", ".json")):
        index += 1
        stem = directory / f"{name}-{index}"
    return stem


def git_commit(*paths: str | Path) -> str:
    """Short commit of the measured tree ('unknown' without git), with '+dirty' if ``paths`` have changes."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", *map(str, paths)],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty else "")
