"""The rollout backends that ``rollout.backend`` names: a registry of name -> factory.

    backend = build_backend(config, processor, layout)    # on every rank
    backend.finish_generation()                           # release what it holds until the first step
    per step: update_weights -> prepare_generation -> generate -> finish_generation
    backend.close()                                       # at the end of the run

A factory builds THIS rank's :class:`~megatron_avar.grpo.interfaces.GenerationBackend`, and decides where
generation runs, so the GRPO loop calls every rank's backend the same way whatever its name:
- "local" (:class:`~megatron_avar.grpo.local_backend.LocalGenerationBackend`, HF with a KV cache) runs on the
  first rank of each model-parallel group; the group's other ranks hold a :class:`SourceRankBackend` without
  a generator, which joins the weight walk (a collective) and receives the rollouts by broadcast — or the
  source's error, so every rank of the group fails together and none is left waiting in a collective.
- "vllm" (:class:`~megatron_avar.grpo.vllm_backend.VLLMGenerationBackend`) runs in every rank, one engine per
  group at the trainer's tensor parallelism, colocated with the actor and asleep while it trains.

Under context parallelism the ranks of a CP group train on the same rollouts, and share their generation: every
CP rank's model-parallel group builds the backend and generates a contiguous share of the step's prompts, and a
:class:`PromptShareBackend` all-gathers the shares over the CP group, in prompt order. A rollout depends only on
its weights, prompt and per-sample seed (``local_backend.sample_seed``), not on which rank generated it, so the
rollouts are those one rank would generate, in 1/CP of the time.

A new backend: implement the interface, then ``@register_backend("name")`` a factory here
(docs/architecture.md, 'A new rollout backend'). ``rollout.backend`` accepts the registered names. A factory
declares the ``rollout.*`` fields only its backend reads (``settings``); a config that sets one of them away from
its default for another backend is refused (``RolloutConfig``): the run would ignore it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist

from megatron_avar.grpo.interfaces import GenerationBackend, PromptBatch, Rollout, SamplingParams

if TYPE_CHECKING:
    from megatron_avar.grpo.config import GRPOConfig
    from megatron_avar.training.megatron_setup import RankLayout

__all__ = ["BACKENDS", "BACKEND_SETTINGS", "BackendFactory", "register_backend", "backend_names",
           "backends_reading", "build_backend", "SourceRankBackend", "PromptShareBackend", "prompt_share",
           "on_model_parallel_source", "model_parallel_source", "SourceRankGenerationError"]

BackendFactory = Callable[["GRPOConfig", Any, "RankLayout"], GenerationBackend]
"""(config, processor, layout) -> this rank's backend. processor: the one that rendered the prompts
(``grpo.prompts.build_prompt_processor``); layout: the rank layout of ``init_distributed``. Raises ValueError
naming the fix when the backend cannot run here (platform, parallel layout)."""

BACKENDS: dict[str, BackendFactory] = {}
"""Backend name -> factory, in registration order (the order ``rollout.backend``'s error lists them in)."""

BACKEND_SETTINGS: dict[str, tuple[str, ...]] = {}
"""Backend name -> the ``rollout.*`` fields (names without the section) only that backend reads."""


def register_backend(name: str, *, settings: tuple[str, ...] = ()) -> Callable[[BackendFactory], BackendFactory]:
    """Decorator: register ``factory`` as the backend ``rollout.backend=name`` builds. settings: the ``rollout.*``
    fields the factory reads that no backend reads unless it declares them too (e.g. the vLLM engine's memory
    share); ``RolloutConfig`` refuses them set away from their defaults with any other backend."""
    def register(factory: BackendFactory) -> BackendFactory:
        if name in BACKENDS:
            raise ValueError(f"rollout backend {name!r} is registered twice")
        BACKENDS[name] = factory
        BACKEND_SETTINGS[name] = tuple(settings)
        return factory
    return register


def backend_names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def backends_reading() -> dict[str, tuple[str, ...]]:
    """rollout field -> the registered backends that read it, for every field some backend declares (``settings``
    of :func:`register_backend`); the fields not listed are every backend's."""
    readers: dict[str, tuple[str, ...]] = {}
    for name, settings in BACKEND_SETTINGS.items():
        for setting in settings:
            readers[setting] = (*readers.get(setting, ()), name)
    return readers


def build_backend(config: GRPOConfig, processor, layout: RankLayout) -> GenerationBackend:
    """This rank's backend, built by the factory ``config.rollout.backend`` names (collective: every rank of
    the run calls it)."""
    name = config.rollout.backend
    if name not in BACKENDS:
        raise ValueError(f"rollout.backend={name!r}: allowed {', '.join(BACKENDS)}")
    if getattr(layout, "cp", 1) == 1:  # (a layout without CP coordinates holds whole rows)
        return BACKENDS[name](config, processor, layout)
    from megatron.core import parallel_state

    return PromptShareBackend(BACKENDS[name](config, processor, layout),
                              group=parallel_state.get_context_parallel_group(), serves="context-parallel group")


class SourceRankGenerationError(RuntimeError):
    """Generation failed on a rank that generates for its group; raised on every rank of the group."""


class SourceRankBackend:
    """A backend that generates on one rank of a process group (the source) for all of its ranks.

    inner: the backend on the source rank, None on the others. group / source: the process group (the
    model-parallel group, or the context-parallel group) and the global rank that generates; ``serves`` names
    the group in errors. ``generate`` is collective over the group:
    the source broadcasts its rollouts, or its error (then every rank raises SourceRankGenerationError
    naming the source and the error). ``update_weights`` is called on every rank, since walking the
    policy's weights gathers tensor-parallel shards (a collective); only the source loads them."""

    def __init__(self, inner: GenerationBackend | None, *, group, source: int, serves: str = "model-parallel group"):
        self.inner, self.group, self.source, self.serves = inner, group, source, serves
        self._refit_failure: Exception | None = None  # of the last update_weights, on the source
        if (inner is not None) != (dist.get_rank() == source):
            raise ValueError(f"SourceRankBackend: rank {dist.get_rank()} must hold the backend exactly when it is "
                             f"the source ({source})")

    def prepare_generation(self) -> None:
        if self.inner is not None:
            self.inner.prepare_generation()

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Collective walk of the weights. A refit that fails on the source (a name or shape the engine refuses)
        finishes the walk first, so the group's other ranks are not left waiting in its gathers; the error then
        reaches every rank of the group at the next ``generate``, as a generation error would."""
        walk = iter(named_tensors)
        self._refit_failure = None
        if self.inner is not None:
            try:
                self.inner.update_weights(walk)
            except Exception as error:  # noqa: BLE001 — reported to the whole group by generate
                self._refit_failure = error
        for _ in walk:  # the walk is collective: join it (the rest of it, after a failed refit), load nothing
            pass

    def generate(self, prompts: PromptBatch, n: int, sampling: SamplingParams) -> list[Rollout]:
        if dist.get_world_size(self.group) == 1:
            assert self.inner is not None, "a group of one rank is its own source rank"
            if self._refit_failure is not None:
                raise self._refit_failure
            return self.inner.generate(prompts, n, sampling)
        payload: list = [None]  # ("ok", rollouts) or ("error", message), broadcast from the source rank
        failure = None
        if self.inner is not None:
            try:
                if self._refit_failure is not None:
                    raise RuntimeError(f"the refit of its weights failed ({type(self._refit_failure).__name__}: "
                                       f"{self._refit_failure})") from self._refit_failure
                payload = [("ok", self.inner.generate(prompts, n, sampling))]
            except Exception as error:  # noqa: BLE001 — any failure must reach every rank of the group
                payload, failure = [("error", f"{type(error).__name__}: {error}")], error
        dist.broadcast_object_list(payload, src=self.source, group=self.group)
        status, value = payload[0]
        if status == "error":
            raise SourceRankGenerationError(f"rank {self.source}, which generates for its {self.serves}, "
                                            f"failed: {value}") from failure
        return value

    def finish_generation(self) -> None:
        if self.inner is not None:
            self.inner.finish_generation()

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()


def prompt_share(count: int, size: int, rank: int) -> tuple[int, int]:
    """[first, end) of the ``count`` prompts that rank ``rank`` of ``size`` generates: contiguous, the first
    ``count % size`` ranks one more (a rank may get none)."""
    base, extra = divmod(count, size)
    first = rank * base + min(rank, extra)
    return first, first + base + (rank < extra)


class PromptShareBackend:
    """A backend whose process group shares the generation of every step: each rank generates its
    :func:`prompt_share` of the prompts with ``inner`` and the group all-gathers the rollouts, in prompt order.

    ``generate`` is collective over ``group``; a failure on any rank reaches every rank (then each raises
    SourceRankGenerationError naming the failed ranks and their errors), so none is left waiting. The inner
    backend sees only its share; its other calls (prepare, the weight walk, finish, close) are every rank's own."""

    def __init__(self, inner: GenerationBackend, *, group, serves: str):
        self.inner, self.group, self.serves = inner, group, serves

    def prepare_generation(self) -> None:
        self.inner.prepare_generation()

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.inner.update_weights(named_tensors)

    def generate(self, prompts: PromptBatch, n: int, sampling: SamplingParams) -> list[Rollout]:
        size, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        first, end = prompt_share(len(prompts), size, rank)
        payload: tuple = ("ok", [])
        failure = None
        if end > first:
            try:
                payload = ("ok", self.inner.generate(prompts.subset(first, end), n, sampling))
            except Exception as error:  # noqa: BLE001 — any failure must reach every rank of the group
                payload, failure = ("error", f"{type(error).__name__}: {error}"), error
        shares: list = [None] * size
        dist.all_gather_object(shares, (dist.get_rank(), *payload), group=self.group)
        errors = [f"rank {source}: {value}" for source, status, value in shares if status == "error"]
        if errors:
            raise SourceRankGenerationError(f"generation shared by the {self.serves} failed on "
                                            f"{'; '.join(errors)}") from failure
        return [rollout for _, _, share in shares for rollout in share]

    def finish_generation(self) -> None:
        self.inner.finish_generation()

    def close(self) -> None:
        self.inner.close()


def model_parallel_source() -> tuple[dist.ProcessGroup, int]:
    """(this rank's model-parallel group, the global rank of its first member)."""
    from megatron.core import parallel_state

    # megatron's getter is unannotated (its global also holds other types); initialised, it is a ProcessGroup
    group = cast(dist.ProcessGroup, parallel_state.get_model_parallel_group())
    return group, dist.get_process_group_ranks(group)[0]


def on_model_parallel_source(build: Callable[[], GenerationBackend]) -> SourceRankBackend:
    """``build()`` on the first rank of this rank's model-parallel group only, wrapped for the whole group."""
    group, source = model_parallel_source()
    return SourceRankBackend(build() if dist.get_rank() == source else None, group=group, source=source)


@register_backend("local", settings=("batch_size",))
def _local(config: GRPOConfig, processor, layout: RankLayout) -> GenerationBackend:
    from megatron_avar import platform

    def build() -> GenerationBackend:
        from megatron_avar.grpo.local_backend import LocalGenerationBackend

        use_bf16 = config.train.precision == "bf16" and platform.cuda_available()
        return LocalGenerationBackend(config.model.hf_path, processor, device=platform.current_device(),
                                      dtype=torch.bfloat16 if use_bf16 else torch.float32,
                                      batch_size=config.rollout.batch_size)

    return on_model_parallel_source(build)


@register_backend("vllm", settings=("vllm_gpu_memory_utilization", "vllm_enable_sleep"))
def _vllm(config: GRPOConfig, processor, layout: RankLayout) -> GenerationBackend:
    from megatron_avar import platform

    if not platform.vllm_available():  # the layout and sampling it cannot run: GRPOConfig refuses them
        raise ValueError("rollout.backend=vllm needs CUDA and vLLM (pip install -e .[gpu]); use "
                         "rollout.backend=local on this machine")
    from megatron_avar.grpo.vllm_backend import VLLMGenerationBackend

    return VLLMGenerationBackend(config.model.hf_path, processor, tensor_parallel_size=layout.tp,
                                 gpu_memory_utilization=config.rollout.vllm_gpu_memory_utilization,
                                 max_model_len=config.seq_length, seed=config.rollout.seed,
                                 enable_sleep_mode=config.rollout.vllm_enable_sleep)
