"""Pruning keeps the run's own newest checkpoints. After `latest` is pointed back at an earlier step (what a
refused checkpoint's message advises) the folders of higher steps, left by the abandoned attempt, used to take
`keep`'s places, and the run's previous checkpoint was deleted instead. Saves killed mid-write at a step the run
does not save again (`.step_N.partial`, a whole model and optimizer each) were never removed."""

import pytest

from megatron_avar.testing import run_on_ranks

pytestmark = pytest.mark.multiprocess


def _publish_step_4(root: str) -> list[str]:
    from pathlib import Path

    from megatron_avar.training.checkpointing import LATEST, TRAINER_STATE, _publish

    root_path = Path(root)
    # .step_00000002.partial: the save of an earlier attempt killed mid-write at a step this run does not save
    for name in ("step_00000001", "step_00000003", "step_00000005", ".step_00000004.partial",
                 ".step_00000002.partial"):
        (root_path / name).mkdir(parents=True)
        (root_path / name / TRAINER_STATE).write_text("{}")
    _publish(root_path, root_path / "step_00000004", root_path / ".step_00000004.partial", keep=2)
    return sorted(p.name for p in root_path.iterdir() if p.name != LATEST) + [(root_path / LATEST).read_text()]


def test_folders_of_higher_steps_neither_count_nor_go_and_stale_partial_saves_go(tmp_path):
    kept = run_on_ranks(_publish_step_4, 1, str(tmp_path / "checkpoints"), timeout_s=120)[0]
    assert kept == ["step_00000003", "step_00000004", "step_00000005", "step_00000004\n"]
