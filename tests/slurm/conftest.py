"""Shared by the Slurm tests: Debian's Slurm installed (apt) when missing, or the tests skipped with the reason."""

import pytest


@pytest.fixture(scope="session")
def slurm_installed():
    from megatron_avar.testing.slurm import SlurmUnavailable, ensure_slurm_installed

    try:
        ensure_slurm_installed()
    except SlurmUnavailable as error:
        pytest.skip(f"no Slurm: {error}")
