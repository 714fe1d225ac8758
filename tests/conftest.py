"""Test-wide setup and shared inputs.

TRITON_INTERPRET must be set before any module defining @triton.jit kernels is imported, so CPU tests
run the real Triton kernels under the interpreter (docs/architecture.md, 'Testing and tolerances'). Tests that need a
GPU are marked `gpu` and skipped here when CUDA is absent.
"""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # pytest restores the warning filters after importing conftests and after collection, which undoes the ones
    # `import megatron_avar` installs; installed here, they hold for the whole run (megatron_avar/console.py).
    from megatron_avar import console

    console.install_warning_filters()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def sft_inputs(tmp_path_factory):
    """A toy Qwen2.5-VL checkpoint (real tokenizer, 2 layers) and a procedural visual-reasoning dataset with
    known answers and image sizes of 4-64 patches: what the SFT, Slurm and sweep tests train on."""
    from megatron_avar.data.procedural import ProceduralConfig, write_dataset
    from megatron_avar.models.qwen2_5_vl.toy import ToyModelConfig, write_toy_checkpoint

    root = tmp_path_factory.mktemp("sft_inputs")
    model = write_toy_checkpoint(root / "toy-model", ToyModelConfig(num_layers=2))
    data = write_dataset(ProceduralConfig(num_samples=12, image_size=(112, 84)), root / "data")
    return {"hf_path": str(model), "data_path": str(data)}
