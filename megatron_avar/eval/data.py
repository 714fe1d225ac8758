"""Reading a benchmark split with `datasets`, from a local copy (clusters are often offline) or the hub.

Local layout: ``DATA_ROOT/<benchmark dir>/[<config>/]`` holding the split in any of these forms, which are
what ``hf download --repo-type dataset <hub name> --local-dir DATA_ROOT/<benchmark dir>``
and ``Dataset.save_to_disk`` produce:

- parquet / jsonl / json files named after the split (``testmini.parquet``, ``validation.jsonl``) or hub
  shards of it (``data/testmini-00000-of-00001-<hash>.parquet``), anywhere below the folder; where a split
  has both parquet and json files (MathVerse ships ``testmini.parquet`` and ``testmini.json``), the parquet
  files are read (they embed the images). ``testmini_text_only.parquet`` is not the ``testmini`` split;
- files in a folder named after the split (``vision/test/0000.parquet``, the hub's parquet-converter layout);
- a ``save_to_disk`` folder named after the split (``testmini/dataset_info.json``), or the folder itself.

Image columns keep the benchmark's own schema: a `datasets.Image` (embedded bytes or a path; read undecoded,
``data.conversations.undecoded``) or, in json files, an image path (absolute, or relative to the working
directory); :func:`to_pil` decodes any of them, as one of ``roles.IMAGE_FORMATS`` only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # loaded lazily, by the functions that read data
    import datasets

__all__ = ["load_split", "read_data_files", "to_pil", "split_files"]

_SUFFIXES = (".parquet", ".jsonl", ".json")


def split_files(folder: Path, split: str) -> list[Path]:
    """Data files below ``folder`` named ``<split>.<ext>`` or ``<split>-*.<ext>``, or inside a ``<split>/`` folder
    (the hub's refs/convert/parquet layout ``<config>/<split>/0000.parquet``); parquet ones when there are any."""
    found = []
    for path in sorted(folder.rglob("*")):
        if path.suffix not in _SUFFIXES or not path.is_file() or path.name.startswith("."):
            continue
        stem = path.name[: -len(path.suffix)]
        if stem == split or stem.startswith(f"{split}-") or path.parent.name == split:
            found.append(path)
    parquet = [path for path in found if path.suffix == ".parquet"]
    return parquet or found


def read_data_files(files: list[Path], *, benchmark: str, hub_name: str, local_dir: Path) -> datasets.Dataset:
    """The rows of local parquet or json/jsonl ``files`` (one format) as one `datasets.Dataset`. A file that is
    empty, not valid JSON or not a parquet file (a download cut short, a hand edit) is a ValueError naming it and the
    download into ``local_dir`` that replaces it: `datasets` reports those as a StopIteration or a
    DatasetGenerationError naming no file."""
    import datasets
    import pyarrow
    from datasets.exceptions import DatasetGenerationError

    download = f"download it again (`hf download --repo-type dataset {hub_name} --local-dir {local_dir}`)"
    folder = files[0].parent
    empty = [path for path in files if path.stat().st_size == 0]
    if empty:
        raise ValueError(f"benchmark {benchmark}: {empty[0]} is empty; {download}")
    builder = "parquet" if files[0].suffix == ".parquet" else "json"
    try:
        return datasets.load_dataset(builder, data_files=[str(path) for path in files], split="train")
    except (StopIteration, DatasetGenerationError, pyarrow.ArrowException) as error:
        cause = error.__cause__ or error  # (datasets wraps the reader's error, which says what is wrong)
        named = files[0] if len(files) == 1 else f"one of {len(files)} files ({files[0].name}, ...) in {folder}"
        raise ValueError(f"benchmark {benchmark}: {named} cannot be read as {builder} ({type(cause).__name__}: "
                         f"{str(cause)[:300] or 'no rows'}); {download}") from None


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_info.json").is_file() and (folder / "state.json").is_file()


def load_split(*, hub_name: str, config: str | None, split: str, local_dir: Path | None, allow_hub: bool,
               benchmark: str, config_subdir: bool = True) -> datasets.Dataset:
    """The split as a `datasets.Dataset`, with the benchmark's columns untouched.

    local_dir: ``DATA_ROOT/<benchmark dir>`` (None without ``--data-root``). config_subdir: the config's data
    lives in ``local_dir/<config>/`` (required then: a benchmark with several configs must not mix them);
    False reads ``local_dir`` itself. allow_hub: fall back to ``load_dataset(hub_name, config, split=split)``.
    Raises ValueError naming the expected files and the hub name when neither source has the split.
    """
    import datasets

    from megatron_avar.data.conversations import single_split, undecoded

    if local_dir is not None:
        folder = local_dir / config if config is not None and config_subdir else local_dir
        if (folder / split).is_dir() and _is_saved_dataset(folder / split):
            return undecoded(single_split(datasets.load_from_disk(str(folder / split)), str(folder / split)))
        if _is_saved_dataset(folder):
            return undecoded(single_split(datasets.load_from_disk(str(folder)), str(folder)))
        files = split_files(folder, split) if folder.is_dir() else []
        if files:
            kinds = {path.suffix for path in files}
            if len(kinds) > 1:
                raise ValueError(f"{benchmark}: {folder} mixes {sorted(kinds)} files for split {split!r}; "
                                 "keep one format")
            return undecoded(single_split(read_data_files(files, benchmark=benchmark, hub_name=hub_name,
                                                          local_dir=local_dir), str(folder)))
    if allow_hub:
        try:
            hub_dataset = datasets.load_dataset(hub_name, config, split=split)
        except Exception as error:  # noqa: BLE001 - any hub failure becomes the same actionable message
            hub_error = f"; the hub failed too ({type(error).__name__}: {str(error)[:200]})"
        else:
            return undecoded(single_split(hub_dataset, hub_name))
    else:
        hub_error = " (pass --allow-hub to try the hub)"
    where = local_dir / config if (local_dir is not None and config is not None and config_subdir) else local_dir
    expected = (f"{where}/{split}-*.parquet (or {split}*.jsonl, or a save_to_disk folder {where}/{split}/)"
                if where is not None else "nothing: no --data-root was given")
    raise ValueError(
        f"benchmark {benchmark}: split {split!r} not found. Looked for {expected}; download it with "
        f"`hf download --repo-type dataset {hub_name} "
        f"--local-dir <DATA_ROOT>/{local_dir.name if local_dir else '<dir>'}`"
        f" (hub name {hub_name}{', config ' + repr(config) if config else ''}){hub_error}"
    )


def to_pil(image: Any, base_dir: Path | None = None):
    """A PIL RGB image (transparency on white, ``roles.to_rgb``) from a decoded PIL image (taken as it is), a
    `datasets.Image` dict ({"bytes", "path"}), raw bytes or a path (relative to ``base_dir``), the last three
    decoded upright by ``roles.read_image`` (``IMAGE_FORMATS`` only). Raises ValueError when there is no image or
    it does not decode."""
    from PIL import Image

    from megatron_avar.roles import read_image, to_rgb

    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, dict):
        if image.get("bytes"):
            return read_image(image["bytes"], "an embedded image")
        image = image.get("path")
    if isinstance(image, (bytes, bytearray)):
        return read_image(image, "an embedded image")
    if isinstance(image, str) and image:
        path = Path(image)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise ValueError(f"image file not found: {path}")
        return read_image(path, f"image file {path}")
    raise ValueError(f"no image in this field (got {type(image).__name__}); the benchmark row has no decodable image")
