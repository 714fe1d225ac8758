"""The platform module is the single place that knows the device stack, and it makes megatron-core run on CPU."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_avar import platform

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_avar"


def test_no_other_module_branches_on_the_device():
    # Only platform.py may probe CUDA / Transformer Engine / vLLM; everything else asks it.
    probe = re.compile(r"torch\.cuda\.is_available|import transformer_engine|import vllm"
                       r"|find_spec\(\"(transformer_engine|vllm)\"\)")
    offenders = [
        str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
        if path.name != "platform.py" and probe.search(path.read_text())
    ]
    assert offenders == []


@pytest.mark.skipif(platform.cuda_available(), reason="checks the CPU-only answers")
def test_cpu_machine_reports_no_gpu_stack():
    assert not platform.transformer_engine_available()
    assert not platform.triton_gpu_available()
    assert not platform.vllm_available()
    assert platform.distributed_backend() == "gloo"
    assert platform.device_for_local_rank(3).type == "cpu"


@pytest.mark.skipif(platform.cuda_available(), reason="the CPU compatibility layer is for machines without CUDA")
def test_megatron_runs_on_cpu_after_prepare():
    # In a subprocess: the compatibility layer is process-global by design.
    script = """
import torch
from megatron_avar import platform
platform.prepare_megatron(); platform.prepare_megatron()  # idempotent
assert platform.megatron_cpu_mode_active()
assert torch.zeros(2, device="cuda").device.type == "cpu"
assert torch.ones(1).cuda().device.type == "cpu" and torch.ones(1).to("cuda:0").device.type == "cpu"
assert torch.ones(1).type() == "torch.cuda.FloatTensor"  # what megatron's optimizer checks
# The gradient norm is exact to fp32 (megatron's fallback, an fp32 torch.norm per tensor, is ~1e-5 off here).
from megatron.core.optimizer import clip_grads
big = torch.randn(160_000, 64, generator=torch.Generator().manual_seed(0)) * 3 + 1
norm, _ = clip_grads.multi_tensor_applier(clip_grads.l2_norm_impl, torch.zeros(1, dtype=torch.int),
                                          [[big, big[:7]]], False)
exact = (big.double().square().sum() + big[:7].double().square().sum()).sqrt()
assert norm.dtype == torch.float32 and abs(float(norm) / float(exact) - 1) < 1e-7, (float(norm), float(exact))
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
store = dist.HashStore()
dist.init_process_group("gloo", store=store, rank=0, world_size=1)
parallel_state.initialize_model_parallel(1, 1)
tensor_parallel.model_parallel_cuda_manual_seed(1)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=2, use_cpu_initialization=True)
model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=64, max_sequence_length=16)
tokens = torch.randint(0, 64, (1, 8)); positions = torch.arange(8)[None]
mask = torch.triu(torch.ones(1, 1, 8, 8, dtype=torch.bool), 1)
model(tokens, positions, mask, labels=tokens).mean().backward()
print("ok", next(model.parameters()).device)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok cpu")


class _RankError(RuntimeError):
    """The error factory of the test below: what the ranks that did not fail raise."""


def _stop_together_on_two_ranks() -> list[str]:
    """Each case's outcome on this rank: "ok", or the type and message of what it raised."""
    import torch.distributed as dist

    rank = dist.get_rank()
    outcomes = []

    def fail_on(failing_rank: int):
        if rank == failing_rank:
            raise OSError(f"disk of rank {failing_rank} gone\n  traceback line\nlast line")
        return rank

    for case in (lambda: platform.agreed(lambda: rank, "nothing"),
                 lambda: platform.agreed(lambda: fail_on(1), "reading the rows"),
                 lambda: platform.stop_together(None if rank == 0 else OSError("no space"), "saving",
                                                error=_RankError)):
        try:
            outcomes.append(f"ok {case()}")
        except Exception as error:  # noqa: BLE001 — the outcome is what is compared
            outcomes.append(f"{type(error).__name__}: {error}")
    return outcomes


@pytest.mark.multiprocess
def test_a_failure_on_one_rank_stops_every_rank_naming_the_rank_and_its_error():
    from megatron_avar.testing import run_on_ranks

    rank_0, rank_1 = run_on_ranks(_stop_together_on_two_ranks, 2, timeout_s=120)
    assert rank_0[0] == "ok 0" and rank_1[0] == "ok 1"  # nothing failed: each rank's own result
    assert rank_1[1] == "OSError: disk of rank 1 gone\n  traceback line\nlast line"  # its own error, whole
    # the other rank: one line, the first and last lines of the failed rank's error
    assert rank_0[1] == ("ValueError: reading the rows failed on rank 1 (its error: OSError: disk of rank 1 gone … "
                         "last line)")
    assert rank_1[2] == "OSError: no space"
    assert rank_0[2] == "_RankError: saving failed on rank 1 (its error: OSError: no space)"


def test_a_local_rank_beyond_the_visible_gpus_is_named(monkeypatch):
    """Found in review: with per-task GPU binding (each rank sees one GPU) rank 5 asked for cuda:5 and got torch's
    raw "CUDA error: invalid device ordinal"."""
    import torch

    monkeypatch.setattr(platform, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device reached"))
    with pytest.raises(ValueError, match=r"local rank 5 needs cuda:5, but this process sees 1 GPU\(s\): .*no "
                                         r"per-task GPU binding"):
        platform.bind_device(5)
