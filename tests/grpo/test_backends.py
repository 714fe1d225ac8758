"""Rollout backends come from one registry (name -> factory), and the GRPO loop drives every backend through the
same GenerationBackend calls: built, released until the first step, then per step prepare -> refit -> generate
-> finish. The vLLM backend's prepare/finish are its wake_up/sleep (checked here without vLLM)."""

from types import SimpleNamespace

import pytest
import torch

from megatron_avar.config import load_config
from megatron_avar.grpo import backends
from megatron_avar.grpo.config import GRPOConfig
from megatron_avar.grpo.interfaces import Rollout
from megatron_avar.roles import TokenRole

BASE = ["out=/tmp/unused", "model.hf_path=/unused", "data.path=/unused"]


def test_the_registry_lists_the_backends_and_the_config_accepts_exactly_those():
    assert backends.backend_names() == ("local", "vllm")
    assert load_config(GRPOConfig, None, BASE + ["rollout.backend=vllm"]).rollout.backend == "vllm"
    with pytest.raises(ValueError, match=r"^rollout.backend='sglang': allowed local, vllm"):
        load_config(GRPOConfig, None, BASE + ["rollout.backend=sglang"])


def test_an_unknown_backend_is_refused_with_the_list():
    config = SimpleNamespace(rollout=SimpleNamespace(backend="sglang"))
    with pytest.raises(ValueError, match=r"^rollout.backend='sglang': allowed local, vllm$"):
        backends.build_backend(config, processor=None, layout=None)
    with pytest.raises(ValueError, match="registered twice"):
        backends.register_backend("local")(lambda config, processor, layout: None)


def test_vllm_is_refused_with_the_fix_where_it_cannot_run(monkeypatch):
    from megatron_avar import platform

    config = load_config(GRPOConfig, None, BASE + ["rollout.backend=vllm"])
    # what vLLM cannot run is refused with the config (and by `avar plan`), not at the first rollout
    for override, message in (
            ("parallel.pipeline_model_parallel_size=2", "needs parallel.pipeline_model_parallel_size=1"),
            ("rollout.top_p=0.9", r"samples with rollout.top_p=1 and rollout.top_k=0 only \(got 0.9, 0\)"),
            ("rollout.top_k=20", r"rollout.top_k=0 only \(got 1.0, 20\)"),
            ("rollout.temperature=3", r"vLLM backend needs rollout.temperature in \[0.01, 2.0\]"),
            ("rollout.temperature=0.005", r"needs rollout.temperature in \[0.01, 2.0\]")):  # vLLM would use 0.01
        with pytest.raises(ValueError, match=message):
            load_config(GRPOConfig, None, BASE + ["rollout.backend=vllm", override])
    monkeypatch.setattr(platform, "vllm_available", lambda: False)
    with pytest.raises(ValueError, match="use rollout.backend=local on this machine"):
        backends.build_backend(config, None, SimpleNamespace(tp=1, pp=1))


class _FakeBackend:
    """Records the loop's calls; generates n one-token rollouts per prompt (or raises, with ``fail``)."""

    def __init__(self, calls: list, fail: bool = False):
        self.calls, self.fail = calls, fail

    def prepare_generation(self):
        self.calls.append("prepare_generation")

    def update_weights(self, named_tensors):
        self.calls.append(f"update_weights({len(list(named_tensors))} tensors)")

    def generate(self, prompts, n, sampling):
        self.calls.append(f"generate(n={n}, seed={sampling.seed})")
        if self.fail:
            raise RuntimeError("engine died")
        ids = torch.tensor([1, 2, 3])  # a two-token prompt, a one-token response
        roles = torch.tensor([TokenRole.TEMPLATE, TokenRole.TEMPLATE, TokenRole.RESPONSE])
        return [Rollout(prompt_id=pid, sample_index=k, ground_truth="1", input_ids=ids, roles=roles, prompt_length=2,
                        response_text="1", generator_logprobs=torch.zeros(1),
                        finish_reason="stop") for pid in prompts.prompt_ids for k in range(n)]

    def finish_generation(self):
        self.calls.append("finish_generation")

    def close(self):
        self.calls.append("close")


class _FakePolicy:
    def named_weights(self):
        yield from [("a", torch.zeros(1)), ("b", torch.zeros(1))]


def test_the_loop_drives_any_registered_backend_through_the_interface(monkeypatch):
    from megatron_avar.grpo.trainer import RolloutEngineError, _rollouts, _start_backend

    calls: list[str] = []
    monkeypatch.setitem(backends.BACKENDS, "fake", lambda config, processor, layout: _FakeBackend(calls))
    config = load_config(GRPOConfig, None, BASE + ["rollout.backend=fake", "rollout.n=2", "rollout.seed=10"])
    backend = _start_backend(config, processor=None, layout=None)
    assert calls == ["finish_generation"]  # released until the first step

    prompts = SimpleNamespace(prompt_ids=["p0", "p1"])
    timings: dict[str, float] = {}
    rollouts = _rollouts(3, prompts, policy=_FakePolicy(), backend=backend, config=config, timings=timings)
    assert [(r.prompt_id, r.sample_index) for r in rollouts] == [("p0", 0), ("p0", 1), ("p1", 0), ("p1", 1)]
    # the refit before the engine takes its KV cache back (vLLM: the weights wake alone for the copy)
    assert calls[1:] == ["update_weights(2 tensors)", "prepare_generation", "generate(n=2, seed=13)",
                         "finish_generation"]
    assert set(timings) == {"perf/refit_seconds", "perf/generate_seconds"}

    failing = _FakeBackend(calls := [], fail=True)
    with pytest.raises(RolloutEngineError, match=r"step 4: rollout generation failed \(RuntimeError: engine died\)"
                                                 r".*rerun the same command to resume"):
        _rollouts(4, prompts, policy=_FakePolicy(), backend=failing, config=config, timings={})
    assert calls == ["update_weights(2 tensors)", "prepare_generation", "generate(n=2, seed=14)"]


class _FakeLLM:
    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(f"sleep(level={level})")

    def wake_up(self, tags):
        self.calls.append(f"wake_up({tags})")


@pytest.mark.parametrize("sleep_mode", [True, False])
def test_vllm_prepare_and_finish_are_wake_up_and_sleep(sleep_mode):
    from megatron_avar.grpo.vllm_backend import VLLMGenerationBackend

    backend = object.__new__(VLLMGenerationBackend)  # no engine: vLLM does not run here
    backend._llm, backend._stale, backend._asleep, backend.enable_sleep_mode = _FakeLLM(), None, set(), sleep_mode
    backend.finish_generation()
    backend.finish_generation()  # idempotent
    backend.prepare_generation()
    backend.prepare_generation()
    expected = ["sleep(level=1)", "wake_up(['weights'])", "wake_up(['kv_cache'])"] if sleep_mode else []
    assert backend._llm.calls == expected


def test_prompt_shares_are_contiguous_balanced_and_cover_every_prompt():
    for count in range(0, 9):
        for size in (1, 2, 3, 4):
            shares = [backends.prompt_share(count, size, rank) for rank in range(size)]
            assert [first for first, _ in shares] == [0] + [end for _, end in shares[:-1]]
            assert shares[-1][1] == count and max(e - f for f, e in shares) - min(e - f for f, e in shares) <= 1


def _prompts(count: int):
    from megatron_avar.grpo.interfaces import PromptBatch

    ids = [torch.tensor([1, 2]) for _ in range(count)]
    return PromptBatch(prompt_ids=[f"p{i}" for i in range(count)], input_ids=ids,
                       roles=[torch.tensor([TokenRole.TEMPLATE, TokenRole.TEMPLATE]) for _ in range(count)],
                       pixel_values=[None] * count, image_grid_thw=[None] * count, ground_truths=["1"] * count)


def _share_generation(count: int, failing_rank: int | None):
    """Rank process: a PromptShareBackend over the world group; (what this rank's inner backend generated, what
    the group's generate returned as (prompt, sample) pairs, or the error)."""
    import torch.distributed as dist

    from megatron_avar.grpo.interfaces import SamplingParams

    calls: list[str] = []
    inner = _FakeBackend(calls, fail=dist.get_rank() == failing_rank)
    generated = []
    original = inner.generate

    def recording(prompts, n, sampling):
        generated.extend(prompts.prompt_ids)
        return original(prompts, n, sampling)

    inner.generate = recording
    backend = backends.PromptShareBackend(inner, group=dist.group.WORLD, serves="context-parallel group")
    try:
        rollouts = backend.generate(_prompts(count), 2, SamplingParams(seed=3))
        return generated, [(r.prompt_id, r.sample_index) for r in rollouts]
    except backends.SourceRankGenerationError as error:
        return generated, str(error)


@pytest.mark.multiprocess
def test_a_shared_generation_gives_every_rank_all_rollouts_in_prompt_order():
    """Context parallelism's generation: each rank generates its share of the prompts (a rank may have none) and
    every rank gets all the rollouts, in prompt order; a failure on one rank fails the step on every rank, named."""
    from megatron_avar.testing import run_on_ranks

    every = [(f"p{i}", k) for i in range(5) for k in range(2)]
    results = run_on_ranks(_share_generation, 2, 5, None, timeout_s=120)
    assert [generated for generated, _ in results] == [["p0", "p1", "p2"], ["p3", "p4"]]
    assert [rollouts for _, rollouts in results] == [every, every]
    results = run_on_ranks(_share_generation, 2, 1, None, timeout_s=120)
    assert [generated for generated, _ in results] == [["p0"], []]
    assert [rollouts for _, rollouts in results] == [[("p0", 0), ("p0", 1)]] * 2
    results = run_on_ranks(_share_generation, 2, 4, 1, timeout_s=120)
    assert [generated for generated, _ in results] == [["p0", "p1"], ["p2", "p3"]]
    for _, error in results:
        assert error == ("generation shared by the context-parallel group failed on rank 1: RuntimeError: "
                         "engine died")
