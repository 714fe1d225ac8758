"""Fixtures of the evaluation tests: the seven benchmark copies (eval_fixtures.py) and a toy checkpoint."""

import pytest

from eval_fixtures import write_all


@pytest.fixture(scope="session")
def eval_data_root(tmp_path_factory):
    """DATA_ROOT with all seven benchmarks in their hub layouts (read-only for the tests)."""
    return write_all(tmp_path_factory.mktemp("eval_data"))


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory):
    from megatron_avar.models.qwen2_5_vl.toy import ToyModelConfig, write_toy_checkpoint

    return write_toy_checkpoint(tmp_path_factory.mktemp("toy") / "toy-qwen2.5-vl", ToyModelConfig(num_layers=2))


class RecordingGenerator:
    """Answers "B" to everything and records which sample ids it was asked for."""

    def __init__(self):
        self.calls = []

    def generate(self, samples):
        self.calls.append([s.id for s in samples])
        return ["<think>looking</think><answer>B</answer>"] * len(samples)


@pytest.fixture
def fake_generator(monkeypatch):
    """The runner's model replaced by a RecordingGenerator (no model is loaded)."""
    import megatron_avar.eval.runner as runner

    generator = RecordingGenerator()
    monkeypatch.setattr(runner, "make_generator", lambda model, config: generator)
    return generator
