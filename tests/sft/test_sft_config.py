"""`avar sft`'s config refuses a bad value with one line naming the setting, before any process starts."""

from pathlib import Path

import pytest

from megatron_avar.cli import main
from megatron_avar.config import load_config
from megatron_avar.sft.config import SFTConfig

EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "sft" / "avar_7b.yaml")


@pytest.mark.parametrize("seed", [-5, 2**63, 99999999999999999999999])
def test_a_seed_torch_cannot_take_is_refused_naming_it(tmp_path, capsys, seed):
    """Before: a seed past int64 failed as "avar sft: error: Overflow when unpacking long long" (torch's words, naming
    no setting), and train.seed=-5 was accepted where data.seed must be >= 0."""
    assert main(["sft", "--config", EXAMPLE, f"out={tmp_path / 'run'}", f"train.seed={seed}"]) == 2
    error = capsys.readouterr().err
    assert f"train.seed must be in [0, 2**63), got {seed}" in error and error.count("\n") == 1, error
    assert not (tmp_path / "run").exists()


def test_the_seeds_torch_takes_are_accepted():
    for seed in (0, 2**63 - 1):
        assert load_config(SFTConfig, EXAMPLE, [f"train.seed={seed}"]).train.seed == seed
