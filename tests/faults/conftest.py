"""The base run the fault tests work on: made once per session, each test takes a copy (fault_runs.copy_run)."""

import pytest

from fault_runs import output, run_sft


@pytest.fixture(scope="session")
def base_run(sft_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "base"
    done = run_sft(out, sft_inputs)
    assert done.returncode == 0, output(done)[-3000:]
    return out
