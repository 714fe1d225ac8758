"""Checkpoints move between machines: with and without Transformer Engine (through the real command line), and
between a GPU and a CPU (megatron's RNG tracker states, last test).

Transformer Engine's modules save one ``_extra_state`` entry each (FP8 metadata: an empty uint8 tensor without
FP8), megatron's local modules only for their linears (under the same names), not for norms: TE's final
``TENorm`` has one that the local model lacks. megatron checkpoints each as an object of its own. Before: a checkpoint
written on a TE cluster could not be exported or verified on a machine without TE (``avar convert`` refused the
keys), and a run could not resume on a TE machine from a checkpoint written without TE (megatron's load failed
on the entries the model asked for).

Transformer Engine cannot run here, so its entries are made the way TE makes them: the runs marked "TE-like"
give every RMSNorm a ``get_extra_state`` returning TE's empty tensor (a ``sitecustomize`` hook), so megatron saves
and requests ``..._extra_state`` objects for them exactly as for TE's modules (for more norms than TE has: the
final one, the fused ones' and the vision encoder's).
"""

import os

import pytest
import torch

from fault_runs import copy_run, exports_and_verifies, losses, output, run_sft

_TE_LIKE = '''
import torch
from megatron_avar.models.qwen2_5_vl import norm
norm.RMSNorm.get_extra_state = lambda self: torch.zeros(0, dtype=torch.uint8)
norm.RMSNorm.set_extra_state = lambda self, state: None
'''


def _te_like_env(tmp_path) -> dict:
    hooks = tmp_path / "te_hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(_TE_LIKE)
    return {"PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])}


def _extra_state_objects(checkpoint) -> int:
    """How many ``_extra_state`` objects the checkpoint's index names (each is named once per shard)."""
    return (checkpoint / ".metadata").read_bytes().count(b"_extra_state")


def _resumed(run, sft_inputs, env=None) -> dict[int, float]:
    done = run_sft(run, sft_inputs, env=env)
    assert done.returncode == 0, output(done)[-3000:]
    assert "resumed from" in done.stdout
    return losses(run)


def test_checkpoints_resume_and_export_across_transformer_engine_and_local_modules(base_run, sft_inputs, tmp_path):
    te = _te_like_env(tmp_path)
    written_with_te = tmp_path / "te_run"
    done = run_sft(written_with_te, sft_inputs, env=te)
    assert done.returncode == 0, output(done)[-3000:]
    assert losses(written_with_te) == losses(base_run)  # the entries change nothing computed
    # (megatron's local linears save an empty extra state too, under the names TE's linears use)
    local = _extra_state_objects(base_run / "checkpoints" / "step_00000000")
    for step in ("step_00000000", "step_00000001"):
        assert _extra_state_objects(written_with_te / "checkpoints" / step) > local, "no norm extra states: no test"

    # written with TE, resumed without; written without, resumed with
    assert _resumed(copy_run(written_with_te, tmp_path / "te_to_local", latest_step=0), sft_inputs)[1] == \
        losses(base_run)[1]
    assert _resumed(copy_run(base_run, tmp_path / "local_to_te", latest_step=0), sft_inputs, env=te)[1] == \
        losses(base_run)[1]
    # a TE checkpoint exported and verified without TE
    exports_and_verifies(written_with_te / "checkpoints" / "step_00000001", tmp_path / "hf")


def test_only_extra_states_may_differ_between_a_checkpoint_and_the_model(tmp_path):
    from megatron_avar.checkpoint_matching import load_module_state

    class WithExtraState(torch.nn.Linear):
        def get_extra_state(self):
            return torch.zeros(0, dtype=torch.uint8)

        def set_extra_state(self, state):
            pass

    plain, extra = torch.nn.Linear(2, 2), WithExtraState(2, 2)
    load_module_state(extra, plain.state_dict(), source=tmp_path)  # the model's extra state absent: loads
    load_module_state(plain, extra.state_dict(), source=tmp_path)  # the checkpoint's unasked for: loads
    assert torch.equal(plain.weight, extra.weight)
    without_bias = {"weight": plain.weight.detach()}
    with pytest.raises(ValueError, match=rf"{tmp_path} does not match the model: missing \['bias'\], unexpected \[\]"):
        load_module_state(plain, without_bias, source=tmp_path)


def test_a_checkpoints_extra_state_never_reaches_a_module(tmp_path):
    """Transformer Engine's set_extra_state unpickles a non-empty byte tensor without restriction (copied below):
    a crafted checkpoint's _extra_state would run code on every GPU machine that resumes, converts or measures it.
    The entries are dropped before the modules see them."""
    import os
    import pickle

    from megatron_avar.checkpoint_matching import load_module_state

    marker = tmp_path / "code ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch '{marker}'",))

    class UnpicklesItsExtraState(torch.nn.Linear):  # TransformerEngineBaseModule.set_extra_state's tensor branch
        def get_extra_state(self):
            return torch.zeros(0, dtype=torch.uint8)

        def set_extra_state(self, state):
            if isinstance(state, torch.Tensor) and state.numel():
                pickle.loads(state.numpy().tobytes())

    module = UnpicklesItsExtraState(2, 2)
    state = {**torch.nn.Linear(2, 2).state_dict(),
             "_extra_state": torch.frombuffer(bytearray(pickle.dumps(Payload())), dtype=torch.uint8)}
    load_module_state(module, state, source=tmp_path)
    assert torch.equal(module.weight, state["weight"])
    assert not marker.exists()


def _restore_rng_written_elsewhere() -> dict:
    from megatron.core import tensor_parallel

    from megatron_avar.models.qwen2_5_vl.build import init_model_parallel
    from megatron_avar.training import checkpointing

    init_model_parallel(1, 1, seed=3)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    seeded = {name: state.clone() for name, state in tracker.get_states().items()}
    saved = checkpointing._rng_state()
    with tracker.fork():  # the streams move on after the save
        torch.rand(1)
    checkpointing._set_rng_state(saved)
    restored = all(torch.equal(t, saved[f"tracker/{name}"]) for name, t in tracker.get_states().items())
    other_device = {**saved, **{name: torch.zeros(16, dtype=torch.uint8)  # a CUDA Philox state's size
                                for name in saved if name.startswith("tracker/")}}
    checkpointing._set_rng_state(other_device)  # written on a GPU, read on this CPU
    kept = {name: state for name, state in tracker.get_states().items()}
    with tracker.fork():  # what megatron does in every forward under sequence parallelism
        torch.rand(1)
    return {"restored": restored, "kept_same_size": all(kept[n].shape == seeded[n].shape for n in seeded)}


def test_rng_states_written_on_another_kind_of_device_are_not_restored():
    """megatron's tensor-parallel RNG tracker holds CUDA generator states on a GPU and CPU ones on the CPU, of other
    sizes; restoring one into the other failed at the tracker's first use (with sequence parallelism: the first
    forward). States of this device's kind are restored; the others leave the seeded streams, with a note."""
    from megatron_avar.testing import run_on_ranks

    assert run_on_ranks(_restore_rng_written_elsewhere, 1, timeout_s=120)[0] == {"restored": True,
                                                                                 "kept_same_size": True}
