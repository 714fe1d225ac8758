"""run_on_ranks: results in rank order, working collectives, prompt and informative failures."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from megatron_avar import platform
from megatron_avar.testing import RankFailedError, RanksTimedOutError, run_on_ranks

pytestmark = pytest.mark.multiprocess


def _report_rank(offset, *, scale):
    rank = dist.get_rank()
    summed = torch.tensor([float(rank + offset)])
    dist.all_reduce(summed)
    gathered = [torch.zeros(2) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, torch.tensor([rank, rank * scale], dtype=torch.float32))
    env_keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "AVAR_TEST_MARKER")
    return {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "env": {key: os.environ.get(key) for key in env_keys},
        "sum": summed.item(),
        "gathered": torch.stack(gathered),
    }


def test_results_in_rank_order_and_collectives_work():
    results = run_on_ranks(_report_rank, 3, 10, scale=3, timeout_s=120, env={"AVAR_TEST_MARKER": "x"})

    assert [r["rank"] for r in results] == [0, 1, 2]
    ports = {r["env"]["MASTER_PORT"] for r in results}
    assert len(ports) == 1 and int(ports.pop()) > 0
    for rank, r in enumerate(results):
        assert r["world_size"] == 3
        assert r["backend"] == platform.distributed_backend()
        assert r["env"]["RANK"] == r["env"]["LOCAL_RANK"] == str(rank)
        assert r["env"]["WORLD_SIZE"] == "3"
        assert r["env"]["MASTER_ADDR"] == "127.0.0.1"
        assert r["env"]["AVAR_TEST_MARKER"] == "x"
        assert r["sum"] == 10 * 3 + (0 + 1 + 2)
        torch.testing.assert_close(r["gathered"], torch.tensor([[0.0, 0.0], [1.0, 3.0], [2.0, 6.0]]))


def _init_megatron_and_record_teardown(record_dir):
    """Leaves megatron's parallel state initialised; records the harness's teardown calls in a file."""
    from megatron.core import parallel_state

    record = os.path.join(record_dir, f"rank{dist.get_rank()}")

    def recording(name, original):
        def wrapper(*args, **kwargs):
            if not args and not kwargs:  # megatron destroys its subgroups through the same function
                with open(record, "a") as f:
                    f.write(name + "\n")
            return original(*args, **kwargs)

        return wrapper

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    parallel_state.destroy_model_parallel = recording("megatron", parallel_state.destroy_model_parallel)
    dist.destroy_process_group = recording("process_group", dist.destroy_process_group)
    return parallel_state.get_tensor_model_parallel_rank()


def test_megatron_parallel_state_and_process_group_are_destroyed(tmp_path):
    assert run_on_ranks(_init_megatron_and_record_teardown, 2, str(tmp_path), timeout_s=120) == [0, 1]
    for rank in range(2):
        assert (tmp_path / f"rank{rank}").read_text().split() == ["megatron", "process_group"]


def _fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank one")
    dist.all_reduce(torch.zeros(1))  # never completes: rank 1 does not join
    return "unreachable"


def _die_on_rank_zero():
    if dist.get_rank() == 0:
        os._exit(7)  # no exception, no message: only the exit is visible
    dist.barrier()


def test_failing_rank_reports_traceback_and_others_do_not_hang():
    start = time.monotonic()
    with pytest.raises(RankFailedError) as info:
        run_on_ranks(_fail_on_rank_one, 2, timeout_s=120)
    assert time.monotonic() - start < 30, "rank 0 blocked in all_reduce must be killed, not waited for"
    err = info.value
    assert err.rank == 1 and err.exception_type == "ValueError"
    message = str(err)
    assert "rank 1 of 2" in message
    assert "deliberate failure on rank one" in message
    assert "_fail_on_rank_one" in message and "Traceback (most recent call last)" in message

    with pytest.raises(RankFailedError, match=r"rank 0 of 2 exited without a result \(exit code 7\)"):
        run_on_ranks(_die_on_rank_zero, 2, timeout_s=120)


def _hang_on_rank_one():
    if dist.get_rank() == 1:
        time.sleep(3600)
    return "done"


def test_timeout_names_unfinished_ranks_and_shows_their_stacks():
    start = time.monotonic()
    with pytest.raises(RanksTimedOutError) as info:
        run_on_ranks(_hang_on_rank_one, 2, timeout_s=2)
    assert time.monotonic() - start < 2 + 10  # + forkserver start when this test runs alone
    assert info.value.unfinished_ranks == [1]
    message = str(info.value)
    assert "ranks [1] of 2 did not finish" in message and "finished: [0]" in message
    assert "_hang_on_rank_one" in message, "the stack dump should show where rank 1 was stuck"


def _multithreaded_matmul():
    x = torch.randn(512, 512)
    for _ in range(3):
        x = torch.tanh(x @ x)
    return torch.get_num_threads()


def test_ranks_can_use_multithreaded_torch_ops():
    # A rank forked from a process whose OpenMP pool had started deadlocks in its first parallel op:
    # this fails (times out) if the harness ever forks the caller instead of using the forkserver.
    torch.matmul(torch.randn(512, 512), torch.randn(512, 512))  # start this process's thread pool
    cores = len(os.sched_getaffinity(0))
    assert run_on_ranks(_multithreaded_matmul, 1, timeout_s=30) == [cores]


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="world_size"):
        run_on_ranks(_report_rank, 0, 1, scale=1)
    with pytest.raises(ValueError, match="timeout_s"):
        run_on_ranks(_report_rank, 2, 1, scale=1, timeout_s=0)
    with pytest.raises(ValueError, match="module-level function"):
        run_on_ranks(lambda: None, 2)


def _start_a_child_process():
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(target=os.getpid)  # as megatron's checkpoint writer does
    child.start()
    child.join()
    return child.exitcode


def _bad_input_on_rank_one(error_type):
    if dist.get_rank() == 1:
        raise error_type("tensor 'x' does not match the config")
    return "ok"


def test_launch_runs_command_ranks_without_deadline_and_keeps_value_errors():
    from megatron_avar.local_ranks import launch

    assert launch(_start_a_child_process, 1) == [0], "ranks are not daemonic: they may start processes"
    with pytest.raises(ValueError) as info:
        launch(_bad_input_on_rank_one, 2, ValueError)
    assert str(info.value) == "tensor 'x' does not match the config"  # the rank's message, for the CLI's one line
    with pytest.raises(RankFailedError, match="RuntimeError"):
        launch(_bad_input_on_rank_one, 2, RuntimeError)
    assert run_on_ranks(_report_rank, 2, 0, scale=1, timeout_s=None, capture_output=False)[1]["rank"] == 1


_NAPPER = """\
import multiprocessing, os, pathlib, time
import torch.distributed as dist

def nap(folder):
    # a spawned helper, as megatron's async checkpoint writer's Manager: fork + exec, not tied to the rank by
    # the fork hook
    helper = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(300,))
    helper.start()
    pathlib.Path(folder, f"{os.getpid()}.pid").write_text("")
    pathlib.Path(folder, f"{helper.pid}.helper").write_text("")
    time.sleep(120)

def nap_or_fail(folder):
    if dist.get_rank() == 0:
        nap(folder)
    while not list(pathlib.Path(folder).glob("*.helper")):
        time.sleep(0.1)
    raise RuntimeError("rank 1 fails while rank 0 waits")
"""


def _alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _all_gone(pids, wait_s=20.0):
    deadline = time.monotonic() + wait_s
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(_alive(pid) for pid in pids)


def test_ranks_die_with_a_caller_that_is_killed(tmp_path):
    """A caller killed by a signal runs no cleanup (`avar convert` stopped with SIGTERM, or the OOM killer):
    before, its ranks worked on, for hours on a real conversion. Now each rank dies with the process that started
    it (the caller, or the forkserver, which exits with the caller), and so does what the rank spawned (found in
    review: megatron's checkpoint writer's Manager process outlived a killed `avar convert`, holding its output
    pipe open, so `avar convert ... | tee log` never ended)."""
    import signal
    import subprocess
    import sys

    (tmp_path / "napper.py").write_text(_NAPPER)
    caller = subprocess.Popen([sys.executable, "-c", (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import napper\n"
        "from megatron_avar.testing import run_on_ranks\n"
        f"run_on_ranks(napper.nap, 2, {str(tmp_path)!r}, timeout_s=None)\n")])
    deadline = time.monotonic() + 120
    while len(helpers := [int(p.stem) for p in tmp_path.glob("*.helper")]) < 2:
        assert caller.poll() is None and time.monotonic() < deadline, "the ranks never started"
        time.sleep(0.1)
    pids = [int(p.stem) for p in tmp_path.glob("*.pid")]
    caller.send_signal(signal.SIGTERM)
    caller.wait(timeout=30)
    assert _all_gone(pids), f"ranks {pids} outlived their caller"
    assert _all_gone(helpers), f"the ranks' spawned helpers {helpers} outlived them"


def test_what_a_killed_rank_spawned_dies_with_it(tmp_path):
    import sys

    (tmp_path / "napper.py").write_text(_NAPPER)
    sys.path.insert(0, str(tmp_path))
    try:
        import napper

        with pytest.raises(RankFailedError, match="rank 1 fails while rank 0 waits"):
            run_on_ranks(napper.nap_or_fail, 2, str(tmp_path), timeout_s=120)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("napper", None)
    helpers = [int(p.stem) for p in tmp_path.glob("*.helper")]
    assert len(helpers) == 1 and _all_gone(helpers, wait_s=10), "rank 0's spawned helper outlived it"


def test_a_command_with_more_ranks_than_gpus_is_refused_before_any_starts(monkeypatch):
    """Found in review: `avar convert --tp 8 --pp 4` (32 ranks) on an 8-GPU node failed inside its ranks, the
    message blaming srun's GPU binding. Refused before any rank starts, naming the CPU route."""
    from megatron_avar.local_ranks import launch

    monkeypatch.setattr(platform, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    with pytest.raises(ValueError, match=r"starts 32 ranks .* one per GPU, but this machine has 8 GPU\(s\): .* "
                                         r"CUDA_VISIBLE_DEVICES= "):
        launch(_never_called, 32)


def _never_called():
    raise AssertionError("a rank started")
