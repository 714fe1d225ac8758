"""bf16 runs, as every GPU example trains (megatron's mixed precision: bf16 weights and activations, fp32 main
parameters and Adam states in the optimizer), checkpointed, resumed and exported, through the real command line.

Before: a bf16 run stopped at its first checkpoint inside megatron's optimizer ("Optimizer shape ((32,) does not
match model shape ((96,))" without the distributed optimizer, a buffer-size assertion with it). The norms of
megatron's local modules kept float32 weights in a bf16 model, and megatron's mixed-precision optimizers map their
states to the model's parameters as if every parameter were bf16. So no bf16 run without Transformer Engine could
save, resume or export; every test ran fp32. And `avar convert verify` compared a bf16 checkpoint in bf16, where
the two implementations' rounding alone (~5e-2 in logits) exceeds its 1e-3 tolerance.

A resume from step 0 must give steps 1 and 2 exactly: step 1 checks the restored weights, step 2 the restored
fp32 main parameters and Adam states (a resume that rebuilt them from the bf16 weights would drift there).
"""

import json

import pytest

from fault_runs import copy_run, exports_and_verifies, on_two_ranks, output, run_sft, sft_command

STEPS = 3
CHECKED = ("loss/lm", "optim/grad_norm", "avar/l_enh", "avar/l_sup")


def _records(run) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _train(out, sft_inputs, ranks: int, **settings) -> str:
    if ranks == 2:
        return on_two_ranks(sft_command(out, sft_inputs, **settings))[0]
    done = run_sft(out, sft_inputs, **settings)
    assert done.returncode == 0, output(done)[-3000:]
    return done.stdout


@pytest.mark.multiprocess
@pytest.mark.parametrize("optimizer, ranks", [("distributed", 2), ("plain", 1)])
def test_a_bf16_run_checkpoints_resumes_its_curve_exactly_and_exports(sft_inputs, tmp_path, optimizer, ranks):
    """DP=2 with the distributed optimizer (its states sharded over the two ranks), and DP=1 with megatron's
    plain mixed-precision optimizer."""
    settings = {"train.precision": "bf16", "train.steps": STEPS, "checkpoint.keep": STEPS,
                "parallel.distributed_optimizer": optimizer == "distributed"}
    straight = tmp_path / "straight"
    _train(straight, sft_inputs, ranks, **settings)
    info = json.loads((straight / "checkpoints" / "step_00000000" / "avar_checkpoint.json").read_text())
    assert info["dtype"] == "BF16"

    resumed = copy_run(straight, tmp_path / "resumed", latest_step=0)
    assert "resumed from" in _train(resumed, sft_inputs, ranks, **settings)
    before, after = _records(straight), _records(resumed)
    assert sorted(after) == list(range(STEPS))
    for step in (1, 2):
        assert {k: after[step][k] for k in CHECKED} == {k: before[step][k] for k in CHECKED}, step
    if optimizer == "distributed":  # (once: the export reads the model's weights alone)
        exports_and_verifies(resumed / "checkpoints" / f"step_{STEPS - 1:08d}", tmp_path / "hf")
