"""How the loader tells a finished `avar synth` output from an unfinished one: the two file names both sides use.

`avar synth` writes ``<output.dir>/data/shard-*.parquet`` one shard at a time while it runs, and only at the end
``<output.dir>/manifest.json``. From before it writes its first shard until after it has written the manifest
it keeps ``<output.dir>/.synth_run.json`` (its settings, the record a resume is checked against; see
megatron_avar.synth.output_dir). So an output folder holding the record and no manifest is a run that is still
going, or was killed or failed: its data/ holds only some of the dataset's shards, each one whole, and would load
as a smaller dataset without any error. `refuse_unfinished_synthesis` makes the conversation loader refuse it.
A folder holding both (a run killed between writing its manifest and removing its record) is finished.
"""

from __future__ import annotations

from pathlib import Path

MANIFEST = "manifest.json"  # written last, by a finished run
RUN_RECORD = ".synth_run.json"  # the settings of the run in output.dir, while it is unfinished


def refuse_unfinished_synthesis(path: Path) -> None:
    """ValueError when ``path`` (a data path given to the loader: ``OUT/data``, a shard in it, or ``OUT``) is, or
    lies in, the output of an `avar synth` run that has not finished, naming the folder and the fix."""
    folder = path if path.is_dir() else path.parent
    for out in (folder, folder.parent):
        if (out / RUN_RECORD).is_file() and not (out / MANIFEST).is_file():
            raise ValueError(f"{path} is part of an unfinished `avar synth` run (output.dir {out} holds {RUN_RECORD} "
                             f"and no {MANIFEST}: the run is still going, or it was stopped or failed), so its "
                             "shards are only part of the dataset; rerun the same `avar synth` command (same config) "
                             f"to resume and finish it (cached teacher answers are reused), then load {out / 'data'}")
