"""Failure modes of a GRPO run end in clear errors: a rollout-engine crash fails the step on every rank of the
model-parallel group (no rank left waiting in a collective), a generated image token is refused before it
reaches the model, and config mistakes are named with their fix."""

import pytest
import torch

from megatron_avar.config import load_config
from megatron_avar.grpo.config import GRPOConfig
from megatron_avar.grpo.interfaces import Rollout
from megatron_avar.grpo.rewards import VisualAnchoredReward
from megatron_avar.grpo.rollout_batches import pack_rollouts
from megatron_avar.roles import TokenRole
from megatron_avar.testing import run_on_ranks


class _CrashingBackend:
    calls: list[str] = []  # of the one instance, on the rank that builds it

    def prepare_generation(self):
        self.calls.append("prepare_generation")

    def update_weights(self, named_tensors):
        self.calls.append(f"update_weights({len(list(named_tensors))})")

    def generate(self, prompts, n, sampling):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def finish_generation(self):
        self.calls.append("finish_generation")

    def close(self):
        self.calls.append("close")


def _engine_error(call) -> str:
    """``call()``'s RolloutEngineError message ("no error" when it returned); megatron's parallel state is torn
    down either way."""
    from megatron.core import parallel_state

    from megatron_avar.grpo.trainer import RolloutEngineError

    try:
        call()
        return "no error"
    except RolloutEngineError as error:
        return str(error)
    finally:
        parallel_state.destroy_model_parallel()


def _in_order(prompts, n):
    """A working engine's rollouts: each prompt's n samples, in prompt-major order."""
    import dataclasses

    return [dataclasses.replace(_rollout([11, 151645]), prompt_id=prompt_id, sample_index=k)
            for prompt_id in prompts.prompt_ids for k in range(n)]


def _generate_with_crashing_backend():
    from megatron_avar.grpo.backends import on_model_parallel_source
    from megatron_avar.grpo.trainer import _generate
    from megatron_avar.training.megatron_setup import init_distributed

    init_distributed(2, 1, seed=0)
    config = load_config(GRPOConfig, None, ["out=/tmp/unused", "model.hf_path=/unused", "data.path=/unused"])
    prompts = type("Prompts", (), {"prompt_ids": ["p0", "p1"]})()
    backend = on_model_parallel_source(_CrashingBackend)  # as the local backend: generated on TP rank 0 only
    walked = []
    backend.prepare_generation()
    backend.update_weights(walked.append((name, None)) or (name, torch.zeros(1)) for name in ("a", "b"))
    message = _engine_error(lambda: _generate(backend, prompts, config, 7))
    backend.finish_generation()
    backend.close()
    return message, len(walked), list(_CrashingBackend.calls)


@pytest.mark.multiprocess
def test_a_rollout_engine_crash_fails_every_rank_of_the_group():
    results = run_on_ranks(_generate_with_crashing_backend, 2, timeout_s=120)
    for message, walked, _ in results:
        assert "step 7" in message and "illegal memory access" in message and "resume" in message
        assert "rank 0, which generates for its model-parallel group, failed" in message
        assert walked == 2  # every rank joins the weight walk (a collective)
    # only the source holds the backend; the others pass the calls on to nothing
    assert results[0][2] == ["prepare_generation", "update_weights(2)", "finish_generation", "close"]
    assert results[1][2] == []


class _RefusingRefitBackend(_CrashingBackend):
    """Its refit refuses the second tensor (a name the engine does not know) without reading the rest."""

    def update_weights(self, named_tensors):
        for index, _ in enumerate(named_tensors):
            if index == 1:
                raise ValueError("update_weights: unknown tensor 'b'")

    def generate(self, prompts, n, sampling):
        raise AssertionError("generate must not run on a model left half refitted")


def _replicas_where_one_fails(failing: str):
    """DP=2 (TP=1): replica 0's backend fails (its refit or its generation), replica 1's works. Every rank must
    raise at the same step: replica 1 would otherwise wait for replica 0 in the update's collectives."""
    from megatron_avar.grpo.backends import on_model_parallel_source
    from megatron_avar.grpo.trainer import _generate
    from megatron_avar.training.megatron_setup import init_distributed

    layout = init_distributed(1, 1, seed=0)
    config = load_config(GRPOConfig, None, ["out=/tmp/unused", "model.hf_path=/unused", "data.path=/unused",
                                            "rollout.n=2"])
    prompts = type("Prompts", (), {"prompt_ids": [f"p{layout.dp_rank}"]})()
    working = type("Working", (_CrashingBackend,),
                   {"generate": lambda self, prompts, n, sampling: _in_order(prompts, n)})
    broken = _RefusingRefitBackend if failing == "refit" else _CrashingBackend
    backend = on_model_parallel_source(broken if layout.dp_rank == 0 else working)
    walked = []
    backend.update_weights(walked.append(name) or (name, torch.zeros(1)) for name in ("a", "b", "c"))
    return _engine_error(lambda: _generate(backend, prompts, config, 5)), walked


@pytest.mark.multiprocess
@pytest.mark.parametrize("failing", ["refit", "generation"])
def test_a_replica_whose_engine_fails_stops_every_replica(failing):
    (failed, walked_0), (other, walked_1) = run_on_ranks(_replicas_where_one_fails, 2, failing, timeout_s=120)
    cause = "unknown tensor 'b'" if failing == "refit" else "illegal memory access"
    assert "step 5: rollout generation failed" in failed and cause in failed
    assert other.startswith("step 5: the rollout engine failed on rank 0 (its error: RolloutEngineError: step 5: "
                            "rollout generation failed") and cause in other and "resume" in other
    assert walked_0 == walked_1 == ["a", "b", "c"]  # a refused refit still finishes the collective walk


def _replicas_where_one_fails_in_its_own_work():
    """DP=2: a failure in one replica's own work (rendering its prompts, grading its rollouts) raises there and,
    on the other replica, an error naming the failed rank and its error — not a wait in the update's collectives."""
    import dataclasses

    from megatron_avar.grpo.trainer import _graded, _step_prompts
    from megatron_avar.training.megatron_setup import init_distributed

    rank = init_distributed(1, 1, seed=0).dp_rank

    def outcome(call):
        try:
            return call()
        except Exception as error:  # noqa: BLE001 — the test compares each rank's error
            return f"{type(error).__name__}: {error}"

    def loader(fails: bool):
        if fails:
            raise ValueError("prompt 'q7': cannot open images/q7.png")
        yield 4, f"prompts of replica {rank}"

    rollouts = [dataclasses.replace(_rollout([11, 151645]), response_text="<think>2+2</think><answer>1</answer>")]
    try:
        return [outcome(lambda: _step_prompts(loader(rank == 1), 4)),
                outcome(lambda: _step_prompts(loader(False), 4)),
                outcome(lambda: _graded(4, rollouts, [float("nan") if rank == 0 else 0.5], VisualAnchoredReward())),
                outcome(lambda: [p.total for p in _graded(4, rollouts, [0.5], VisualAnchoredReward())])]
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()


@pytest.mark.multiprocess
def test_a_replica_failing_in_its_own_work_stops_every_replica_naming_the_cause():
    replica_0, replica_1 = run_on_ranks(_replicas_where_one_fails_in_its_own_work, 2, timeout_s=120)
    assert replica_1[0] == "ValueError: prompt 'q7': cannot open images/q7.png"
    assert replica_0[0] == ("ValueError: step 4: rendering the prompts failed on rank 1 (its error: ValueError: "
                            "prompt 'q7': cannot open images/q7.png)")
    assert (replica_0[1], replica_1[1]) == ("prompts of replica 0", "prompts of replica 1")
    assert replica_0[2].startswith("ValueError: r_visual must be a finite number >= 0")
    assert replica_1[2].startswith("ValueError: step 4: grading the rollouts failed on rank 0 (its error: "
                                   "ValueError: r_visual must be a finite number >= 0")
    weights = VisualAnchoredReward().config  # correct, strictly formatted, r_visual 0.5
    assert replica_0[3] == replica_1[3] == [pytest.approx(1.0 + 0.5 * weights.lambda_visual + weights.lambda_format)]


class _EngineInEveryRank(_CrashingBackend):
    """A backend in every rank (as vLLM is, at the trainer's TP): its wake-up or its release of the GPU fails.
    Its generation is a collective over the world (vLLM's tensor-parallel forward)."""

    failing = ""

    def update_weights(self, named_tensors):
        for _ in named_tensors:
            pass

    def prepare_generation(self):
        if self.failing == "wake":
            raise RuntimeError("CUDA out of memory while waking the KV cache")

    def finish_generation(self):
        if self.failing == "sleep":
            raise RuntimeError("cuMemUnmap failed")

    def generate(self, prompts, n, sampling):
        import torch.distributed as dist

        dist.all_reduce(torch.ones(1))
        return _in_order(prompts, n)


def _ranks_whose_engine_fails_around_generation(failing: str, tp: int):
    """Two ranks (two replicas, or one replica at TP=2); rank 0's engine fails to wake (or to sleep), rank 1's
    works. The policy's weight walk is a collective (a tensor-parallel gather in the real one): rank 0 must finish
    it, rank 1 must not be left inside generation, and every rank must raise."""
    import torch.distributed as dist

    from megatron_avar.grpo.trainer import _rollouts
    from megatron_avar.training.megatron_setup import init_distributed

    layout = init_distributed(tp, 1, seed=0)
    config = load_config(GRPOConfig, None, ["out=/tmp/unused", "model.hf_path=/unused", "data.path=/unused",
                                            "rollout.n=2"])
    prompts = type("Prompts", (), {"prompt_ids": [f"p{layout.dp_rank}"]})()
    walked = []

    def named_weights():
        for name in ("a", "b", "c"):
            tensor = torch.ones(1)
            dist.all_reduce(tensor)  # collective, as the real walk's gathers
            walked.append(name)
            yield name, tensor

    policy = type("Policy", (), {"named_weights": staticmethod(named_weights)})()
    backend = type("Engine", (_EngineInEveryRank,), {"failing": failing if dist.get_rank() == 0 else ""})()
    return _engine_error(lambda: _rollouts(4, prompts, policy=policy, backend=backend, config=config,
                                           timings={})), walked


@pytest.mark.multiprocess
@pytest.mark.parametrize("failing, tp", [("wake", 1), ("sleep", 1), ("wake", 2)])
def test_an_engine_that_fails_to_wake_or_sleep_on_one_rank_stops_every_rank(failing, tp):
    (failed, walked_0), (other, walked_1) = run_on_ranks(_ranks_whose_engine_fails_around_generation, 2, failing, tp,
                                                         timeout_s=120)
    cause = "CUDA out of memory while waking" if failing == "wake" else "cuMemUnmap failed"
    assert failed.startswith("step 4: the rollout engine") and cause in failed and "resume" in failed
    assert other.startswith("step 4: the rollout engine failed on rank 0 (its error: RolloutEngineError: step 4: ")
    assert cause in other and "resume" in other
    assert walked_0 == walked_1 == ["a", "b", "c"]


def test_rollouts_out_of_prompt_major_order_are_refused():
    """Groups are contiguous runs of n: a backend returning sample-major order would mix prompts' advantages."""
    import dataclasses

    from megatron_avar.grpo.trainer import RolloutEngineError, _generate

    config = load_config(GRPOConfig, None, ["out=/tmp/unused", "model.hf_path=/unused", "data.path=/unused",
                                            "rollout.n=2"])
    prompts = type("Prompts", (), {"prompt_ids": ["p0", "p1"]})()
    one = _rollout([11, 151645])
    in_order = [dataclasses.replace(one, prompt_id=p, sample_index=k) for p in ("p0", "p1") for k in (0, 1)]
    backend = type("Backend", (), {"generate": lambda self, prompts, n, sampling: list(returned)})()
    returned = in_order
    assert _generate(backend, prompts, config, 3) == in_order
    returned = [in_order[k] for k in (0, 2, 1, 3)]  # sample-major
    with pytest.raises(RolloutEngineError, match=r"step 3: the rollout backend returned 4 rollouts not in "
                                                 r"prompt-major order"):
        _generate(backend, prompts, config, 3)


def _rollout(response_ids):
    prompt = torch.tensor([151644, 8948, 151652, 151655, 151653, 151645])
    roles = torch.tensor([TokenRole.TEMPLATE, TokenRole.SYSTEM, TokenRole.TEMPLATE, TokenRole.IMAGE,
                          TokenRole.TEMPLATE, TokenRole.TEMPLATE])
    response = torch.tensor(response_ids)
    return Rollout(prompt_id="p", sample_index=0, ground_truth="1", input_ids=torch.cat([prompt, response]),
                   roles=torch.cat([roles, torch.full_like(response, int(TokenRole.RESPONSE))]),
                   prompt_length=len(prompt), response_text="", generator_logprobs=torch.zeros(len(response)),
                   finish_reason="stop", pixel_values=torch.zeros(4, 1176),
                   image_grid_thw=torch.tensor([[1, 2, 2]]))


def test_a_generated_image_token_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"generated 1 <\|image_pad\|> tokens.*forbid vision special tokens"):
        pack_rollouts([_rollout([11, 151655, 151645])], seq_length=64, pad_token_id=151643, image_token_id=151655,
                      spatial_merge_size=2)
    rows = pack_rollouts([_rollout([11, 12, 151645]), _rollout([13, 151645])], seq_length=64, pad_token_id=151643,
                         image_token_id=151655, spatial_merge_size=2)
    assert len(rows) == 1 and rows[0].response_lengths == [3, 2]


def test_a_rollout_longer_than_the_row_is_refused():
    with pytest.raises(ValueError, match="raise train.seq_length"):
        pack_rollouts([_rollout([11] * 20)], seq_length=16, pad_token_id=151643, image_token_id=151655,
                      spatial_merge_size=2)


@pytest.mark.parametrize("override, message", [
    ("rollout.n=1", "rollout.n must be an integer >= 2"),
    ("rollout.backend=sglang", "allowed local, vllm"),
    ("train.seq_length=100", "must hold the longest rollout"),
    ("train.updates_per_step=3", "multiple of train.updates_per_step"),
    ("loss.aggregation=sequence_sum_norm loss.max_len=100", "set loss.max_len=2048"),
    ("rollout.temprature=0.5", "temprature"),
    ("rollout.temperature=.inf", "finite temperature > 0"),  # HF samples uniformly then
    ("reward.epsilon=.inf", "reward.epsilon must be a finite number > 0"),  # every r_visual would be 0
])
def test_config_mistakes_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(GRPOConfig, None, ["out=/tmp/x", "model.hf_path=/m", "data.path=/d", "train.prompts_per_step=4",
                                       *override.split()])


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.seed=-5"], "train.seed must be in [0, 2**63), got -5"),
    (["train.seed=99999999999999999999999"], "train.seed must be in [0, 2**63), got 99999999999999999999999"),
    (["rollout.seed=-1"], "rollout.seed must be in [0, 2**63) with rollout.backend=local, got -1"),
    (["rollout.seed=9223372036854775808"], "rollout.seed must be in [0, 2**63) with rollout.backend=local"),
    # the vLLM engine seeds numpy with it, which takes 32-bit seeds
    (["rollout.backend=vllm", "rollout.seed=4294967296"],
     "rollout.seed must be in [0, 2**32) with rollout.backend=vllm"),
])
def test_seeds_out_of_range_are_named(overrides, message):
    """Before: a seed past int64 (or past numpy's 32 bits, for vLLM) failed once the processes or the engine had
    started ("Overflow when unpacking long long", naming no setting); negative seeds were accepted."""
    with pytest.raises(ValueError) as error:
        load_config(GRPOConfig, None, ["out=/tmp/x", "model.hf_path=/m", "data.path=/d", *overrides])
    assert message in str(error.value)


def test_the_seeds_each_backend_takes_are_accepted():
    base = ["out=/tmp/x", "model.hf_path=/m", "data.path=/d"]
    config = load_config(GRPOConfig, None, [*base, f"train.seed={2**63 - 1}", f"rollout.seed={2**63 - 1}"])
    assert config.train.seed == config.rollout.seed == 2**63 - 1
    assert load_config(GRPOConfig, None, [*base, "rollout.backend=vllm", f"rollout.seed={2**32 - 1}"]).rollout.seed == (
        2**32 - 1)
