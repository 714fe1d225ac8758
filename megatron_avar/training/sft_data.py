"""The SFT data loader: packed rows of a conversation dataset, per optimizer step and data-parallel rank.

Order of everything, all deterministic in (dataset, processor settings, seq_length, seed):
1. `load_or_compute_stats`: every sample's token count, checked once before training (bad samples fail
   loudly, all named together).
2. Epoch e: the sample indexes are permuted with numpy's generator seeded (seed, e), cut into buffers of
   ``packing_buffer`` samples, each packed first-fit-decreasing into rows of ``seq_length`` tokens; the
   epoch's rows are then permuted with the same generator (so long and short rows mix).
3. The rows of all epochs form one stream; optimizer step k takes the next ``global_batch_size`` rows of
   it (a step may span an epoch boundary: no row is dropped or repeated). The step's rows are numbered
   0..G-1; data-parallel rank r takes rows [r*G/dp, (r+1)*G/dp) and cuts them into micro-batches of
   ``micro_batch_size`` rows. So the union over ranks is the step's global batch whatever dp_size is.
4. Rows are rendered (images decoded, processed) lazily, in this process or in DataLoader workers.

Resume: `state_dict()` holds the position after the last step handed out; `load_state_dict` on a fresh
loader continues with exactly the microbatches an uninterrupted run would have produced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_avar import platform
from megatron_avar.training.checkpointing import ignore_stop_signals
from megatron_avar.training.packing import PackedBatch, PackedRow, collate_rows, first_fit_decreasing, pack_row
from megatron_avar.training.sample_plan import SampleStats, load_or_compute_stats

__all__ = ["SFTDataConfig", "SFTStep", "SFTDataLoader", "pack_epoch", "build_processor"]


@dataclass(frozen=True)
class SFTDataConfig:
    """What the SFT trainer reads and how it is packed. Validated on construction."""

    path: str
    """A conversation dataset: .jsonl/.json/.parquet file, a folder of them, or a saved canonical dataset
    (see `megatron_avar.data.conversations.load_conversations`)."""
    seq_length: int = 4096
    """Tokens per packed row (>= 16); every sample must fit (see ``truncate``)."""
    micro_batch_size: int = 1
    """Packed rows per micro-batch (>= 1)."""
    truncate: bool = False
    """Cut samples longer than seq_length to seq_length instead of failing. A cut never falls inside or
    before the end of an image, and a cut sample must keep a response token (else: error)."""
    seed: int = 0
    """Seed of the per-epoch sample and row permutations (>= 0)."""
    packing_buffer: int = 4096
    """Samples packed together (first-fit-decreasing) per buffer (>= 1): larger packs tighter, smaller
    keeps more of the shuffle's randomness between rows."""
    min_pixels: int | None = None
    """Lower pixel bound of the image processor (None: the processor's own, 56*56 for Qwen2.5-VL)."""
    max_pixels: int | None = None
    """Upper pixel bound (None: the processor's own, 28*28*16384). Lower it to shorten image-heavy samples."""
    reasoning_tokens: bool = True
    """Add <think>, </think>, <answer>, </answer> as special tokens (as the paper trains)."""
    processor_path: str | None = None
    """HF model directory whose tokenizer/processor to use; None: the offline Qwen2.5-VL default."""
    num_workers: int = 0
    """Processes for computing sample stats and rendering rows (0: the calling process, which then renders each
    step's rows while the GPU waits: on GPUs give 2-8). With workers, a whole step's micro-batches are rendered
    ahead; they reach the trainer through shared memory (/dev/shm: a container needs room for a step's pixels)."""
    cache_dir: str | None = None
    """Folder for the sample-stats cache (None: no cache; recomputed at every start)."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"data.path must be a non-empty path string, got {self.path!r}")
        bounds = {"seq_length": 16, "micro_batch_size": 1, "seed": 0, "packing_buffer": 1, "num_workers": 0}
        for name, low in bounds.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"data.{name} must be an int >= {low}, got {value!r}")
        for name in ("truncate", "reasoning_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"data.{name} must be true or false, got {getattr(self, name)!r}")
        from megatron_avar.processor import check_pixel_bounds

        check_pixel_bounds(self.min_pixels, self.max_pixels, prefix="data.")
        for name in ("processor_path", "cache_dir"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"data.{name} must be null or a path string")
        if self.cache_dir is not None and Path(self.path).is_dir() and \
                Path(self.cache_dir).resolve() == Path(self.path).resolve():
            raise ValueError(f"data.cache_dir={self.cache_dir} is the data folder (data.path): every .json file there "
                             "is read as data, the stats cache's too, so the next start would fail; give another "
                             "folder (a subfolder of it works)")


def build_processor(config: SFTDataConfig):
    """The processor the config describes (`megatron_avar.processor.load_processor`)."""
    from megatron_avar.processor import load_processor

    return load_processor(config.processor_path, min_pixels=config.min_pixels, max_pixels=config.max_pixels,
                          reasoning_tokens=config.reasoning_tokens)


def pack_epoch(lengths: list[int], *, seq_length: int, seed: int, epoch: int, buffer_size: int) -> list[list[int]]:
    """The rows (lists of sample indexes) of one epoch; see the module docstring, step 2."""
    rng = np.random.default_rng((seed, epoch))
    order = rng.permutation(len(lengths)).tolist()
    rows = first_fit_decreasing(lengths, order, seq_length, buffer_size)
    return [rows[k] for k in rng.permutation(len(rows)).tolist()]


@dataclass
class SFTStep:
    """What one data-parallel rank trains on in one optimizer step.

    microbatches: this rank's global_batch_size / dp_size / micro_batch_size `PackedBatch`es, in order.
    step: 0-based optimizer step. epoch: the epoch of the step's first row.
    num_loss_tokens, num_samples_with_image, num_samples, num_real_tokens: over the WHOLE global batch
    (all ranks), from the plan, so losses can be normalised identically on every rank without a
    collective.
    """

    step: int
    epoch: int
    microbatches: list[PackedBatch]
    num_loss_tokens: int
    num_samples_with_image: int
    num_samples: int
    num_real_tokens: int


class _RowRenderer(torch.utils.data.Dataset):
    """Map-style dataset: (epoch, row index in epoch) -> `PackedRow` (renders images lazily). Picklable
    (DataLoader workers started with spawn/forkserver get a copy and re-pack epochs themselves)."""

    def __init__(self, dataset, processor, stats: SampleStats, config: SFTDataConfig):
        self.dataset, self.processor, self.stats, self.config = dataset, processor, stats, config
        self._epochs: dict[int, list[list[int]]] = {}

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            if len(self._epochs) >= 4:
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = pack_epoch(self.stats.lengths, seq_length=self.config.seq_length,
                                             seed=self.config.seed, epoch=epoch,
                                             buffer_size=self.config.packing_buffer)
        return self._epochs[epoch]

    def __getitem__(self, key: tuple[int, int]) -> PackedRow:
        from megatron_avar.data.conversations import to_chat_messages
        from megatron_avar.roles import render_conversation

        epoch, row = key
        indexes = self.epoch_rows(epoch)[row]
        samples = []
        for index in indexes:
            try:  # the image decodes here for the first time (the plan read only its header)
                rendered = render_conversation(to_chat_messages(self.dataset[index]), self.processor)
            except (OSError, SyntaxError, ValueError) as error:
                raise ValueError(f"sample {self.stats.ids[index]!r} of {self.config.path} cannot be rendered "
                                 f"({error}); fix or drop that record (`avar data validate` reads them all)") from error
            if len(rendered) != self.stats.full_lengths[index]:
                raise ValueError(f"sample {self.stats.ids[index]!r} renders to {len(rendered)} tokens, the plan "
                                 f"says {self.stats.full_lengths[index]}; the stats cache is stale (delete it from "
                                 f"{self.config.cache_dir}) or the processor changed")
            kept = self.stats.lengths[index]
            if kept < len(rendered):  # the plan checked the cut keeps every image and a response token
                rendered = dataclasses.replace(rendered, input_ids=rendered.input_ids[:kept],
                                               roles=rendered.roles[:kept], labels=rendered.labels[:kept])
            samples.append(rendered)
        return pack_row(samples, [self.stats.ids[i] for i in indexes], seq_length=self.config.seq_length,
                        pad_token_id=self.processor.tokenizer.pad_token_id,
                        image_token_id=self.processor.image_token_id,
                        spatial_merge_size=self.processor.image_processor.merge_size)


class SFTDataLoader:
    """Iterate `SFTStep`s for one data-parallel rank, forever (the trainer decides when to stop).

    Args:
        config: the data config. processor: a Qwen2.5-VL processor, or None to build it from the config
            (when given, its pixel bounds must equal the config's where the config sets them).
        global_batch_size: packed rows per optimizer step over all ranks; a multiple of
            dp_size * micro_batch_size. dp_rank, dp_size: this rank's data-parallel coordinates.
        dataset: the loaded canonical dataset (None: `load_conversations(config.path)`).
    """

    def __init__(self, config: SFTDataConfig, processor=None, *, global_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, dataset=None):
        from megatron_avar.data.conversations import load_conversations

        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size) with dp_size >= 1, got {dp_rank}, {dp_size}")
        if global_batch_size < 1 or global_batch_size % (dp_size * config.micro_batch_size):
            raise ValueError(f"train.global_batch_size ({global_batch_size}) must be a positive multiple of the "
                             f"data-parallel size ({dp_size}) x data.micro_batch_size ({config.micro_batch_size})")
        self.config, self.global_batch_size, self.dp_rank, self.dp_size = config, global_batch_size, dp_rank, dp_size
        self.processor = build_processor(config) if processor is None else processor
        self._check_processor()
        self.dataset = load_conversations(config.path) if dataset is None else dataset
        if len(self.dataset) == 0:
            raise ValueError(f"the dataset at {config.path} has no samples")
        self.stats, self.fingerprint, self.data_fingerprint = load_or_compute_stats(
            self.dataset, self.processor, seq_length=config.seq_length, truncate=config.truncate,
            num_workers=config.num_workers, cache_dir=config.cache_dir)
        # every sample's token count, which with the seed and the packing settings decides the rows (resumes)
        self.lengths_fingerprint = hashlib.sha256(json.dumps(self.stats.lengths).encode()).hexdigest()
        self._renderer = _RowRenderer(self.dataset, self.processor, self.stats, config)
        self._epoch, self._row, self._step = 0, 0, 0

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        """The packed rows of an epoch: lists of dataset indexes (see `pack_epoch`)."""
        return self._renderer.epoch_rows(epoch)

    def _check_processor(self) -> None:
        size = self.processor.image_processor.size
        for name, key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            wanted = getattr(self.config, name)
            if wanted is not None and size[key] != wanted:
                raise ValueError(f"the processor's {name} is {size[key]} but data.{name} is {wanted}; "
                                 "pass processor=None or a processor built with build_processor(config)")

    def packing_efficiency(self, epoch: int = 0) -> float:
        """Real tokens / (rows x seq_length) of an epoch's packing."""
        rows = self.epoch_rows(epoch)
        return sum(self.stats.lengths) / (len(rows) * self.config.seq_length)

    def steps_per_epoch(self, epoch: int = 0) -> float:
        """Optimizer steps an epoch's rows fill (fractional: steps may span epochs)."""
        return len(self.epoch_rows(epoch)) / self.global_batch_size

    def summary(self, epoch: int = 0) -> dict:
        """What to log at start-up: samples, truncated samples, rows, steps and packing efficiency of an epoch."""
        return {"num_samples": len(self.stats), "num_truncated": self.stats.num_truncated,
                "num_samples_with_image": sum(n > 0 for n in self.stats.num_images),
                "rows_per_epoch": len(self.epoch_rows(epoch)), "steps_per_epoch": self.steps_per_epoch(epoch),
                "packing_efficiency": self.packing_efficiency(epoch), "fingerprint": self.fingerprint}

    # -------------------------------------------------------------------------------- resume state
    def state_dict(self) -> dict:
        """Position after the last step handed out: {epoch, row_in_epoch, step}, and what decides the rows it
        points into: the data (``data_fingerprint``), every sample's token count (``lengths_fingerprint``), seed,
        global_batch_size, seq_length and packing_buffer (``fingerprint``: the stats' cache key)."""
        return {"epoch": self._epoch, "row_in_epoch": self._row, "step": self._step, "seed": self.config.seed,
                "fingerprint": self.fingerprint, "data_fingerprint": self.data_fingerprint,
                "lengths_fingerprint": self.lengths_fingerprint, "global_batch_size": self.global_batch_size,
                "seq_length": self.config.seq_length, "packing_buffer": self.config.packing_buffer}

    def load_state_dict(self, state: dict, *, accept_data_change: bool = False) -> None:
        """Continue from a `state_dict()`; raises ValueError when it was made with other data or settings, naming
        which (other data or token counts are accepted with ``accept_data_change``: the position is then applied
        to these rows). The same data with the same token counts resume even when the processor's fingerprint
        changed (e.g. a new version of the token-role renderer that counts the same tokens): the rows are the
        same. The position is global (rows of the whole global batch), so a run may resume with another dp_size."""
        checks = [("data.seed", self.config.seed), ("train.global_batch_size", self.global_batch_size),
                  ("data.seq_length", self.config.seq_length), ("data.packing_buffer", self.config.packing_buffer)]
        if "lengths_fingerprint" in state:
            same_data = state.get("data_fingerprint") == self.data_fingerprint
            same_rows = same_data and state["lengths_fingerprint"] == self.lengths_fingerprint
        else:  # written before the data and token counts were recorded apart
            same_data = same_rows = state.get("fingerprint") == self.fingerprint
        if not same_rows and not accept_data_change:
            if same_data:
                raise ValueError(f"the token counts of {self.config.path}'s samples differ from the checkpoint's: "
                                 "the data are the same, but the processor (tokenizer, image pixel bounds, "
                                 "data.reasoning_tokens), data.truncate or the token-role renderer of this version "
                                 "count them differently, so the packed rows are not the run's. Resume with the "
                                 "settings and version the run was started with, or pass "
                                 "checkpoint.accept_data_change=true to continue at the same position on these rows")
            raise ValueError(f"the data of {self.config.path} differ from the checkpoint's (a record, its messages "
                             "or an image's name, size or dimensions changed; moving the data does not change it"
                             + ("" if "lengths_fingerprint" in state else "; a checkpoint written before this "
                                "version also counts a changed processor or token-role renderer here") +
                             "). Resume with the data the run was started with, or pass "
                             "checkpoint.accept_data_change=true to continue at the same position on these data")
        for setting, mine in checks:
            key = setting.split(".")[1]
            if key in state and state[key] != mine:  # packing_buffer: absent from older checkpoints
                raise ValueError(f"the checkpoint's data position was made with {setting}={state[key]!r}, this run "
                                 f"has {mine!r}: its rows would not be the run's; resume with {setting}={state[key]!r}")
        if not 0 <= state["row_in_epoch"] < len(self.epoch_rows(state["epoch"])):
            raise ValueError(f"data state row_in_epoch {state['row_in_epoch']} is outside epoch {state['epoch']} "
                             f"of {self.config.path} ({len(self.epoch_rows(state['epoch']))} rows): the data changed "
                             "too much to continue at the checkpoint's position; start a new run")
        self._epoch, self._row, self._step = state["epoch"], state["row_in_epoch"], state["step"]

    # -------------------------------------------------------------------------------- iteration
    def _step_rows(self, epoch: int, row: int) -> tuple[list[tuple[int, int]], int, int]:
        """The global batch's (epoch, row) keys from a position, and the position after it."""
        keys = []
        while len(keys) < self.global_batch_size:
            rows_in_epoch = len(self.epoch_rows(epoch))
            take = min(self.global_batch_size - len(keys), rows_in_epoch - row)
            keys.extend((epoch, r) for r in range(row, row + take))
            row += take
            if row == rows_in_epoch:
                epoch, row = epoch + 1, 0
        return keys, epoch, row

    def _plan(self) -> Iterator[tuple[int, list[tuple[int, int]], list[tuple[int, int]], tuple[int, int]]]:
        """(step, global keys, this rank's keys, position after) from the current position, forever."""
        epoch, row, step = self._epoch, self._row, self._step
        per_rank = self.global_batch_size // self.dp_size
        while True:
            keys, epoch_after, row_after = self._step_rows(epoch, row)
            mine = keys[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
            yield step, keys, mine, (epoch_after, row_after)
            epoch, row, step = epoch_after, row_after, step + 1

    def __iter__(self) -> Iterator[SFTStep]:
        mbs = self.config.micro_batch_size
        per_step = self.global_batch_size // self.dp_size // mbs
        plans = self._plan()
        planned: list = []  # steps whose rows were requested from the DataLoader, oldest first

        def keys_of_rank():
            for plan in plans:
                planned.append(plan)
                yield from plan[2]

        workers = self.config.num_workers
        # The workers render the next step while this one trains: a whole step's micro-batches in flight (the
        # DataLoader's default, 2 per worker, left the rest to be rendered while the GPU waited). Pinned host
        # memory on a GPU machine, so the trainer's copies to the device are asynchronous.
        batches = iter(torch.utils.data.DataLoader(
            self._renderer, sampler=keys_of_rank(), batch_size=mbs, collate_fn=collate_rows, num_workers=workers,
            prefetch_factor=max(2, math.ceil(per_step / workers)) if workers else None,
            pin_memory=platform.cuda_available(), worker_init_fn=ignore_stop_signals))
        while True:
            microbatches = [next(batches) for _ in range(per_step)]
            step, keys, _, (epoch_after, row_after) = planned.pop(0)
            # The position moves before the step is handed out: a checkpoint saved after training on it
            # must resume with the next step.
            self._epoch, self._row, self._step = epoch_after, row_after, step + 1
            yield self._summarise(step, keys, microbatches)

    def _summarise(self, step: int, keys: list[tuple[int, int]], microbatches: list[PackedBatch]) -> SFTStep:
        samples = [index for epoch, row in keys for index in self.epoch_rows(epoch)[row]]
        return SFTStep(
            step=step, epoch=keys[0][0], microbatches=microbatches,
            num_loss_tokens=sum(self.stats.num_loss_tokens[i] for i in samples),
            num_samples_with_image=sum(self.stats.num_images[i] > 0 for i in samples),
            num_samples=len(samples), num_real_tokens=sum(self.stats.lengths[i] for i in samples))
