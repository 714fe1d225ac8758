"""Shared inputs of the SFT tests: a toy Qwen2.5-VL checkpoint (real tokenizer, 2 layers) and a procedural
visual-reasoning dataset with known answers and image sizes of 4-64 patches."""

import pytest


@pytest.fixture(scope="session")
def sft_inputs(tmp_path_factory):
    from megatron_avar.data.procedural import ProceduralConfig, write_dataset
    from megatron_avar.models.qwen2_5_vl.toy import ToyModelConfig, write_toy_checkpoint

    root = tmp_path_factory.mktemp("sft_inputs")
    model = write_toy_checkpoint(root / "toy-model", ToyModelConfig(num_layers=2))
    data = write_dataset(ProceduralConfig(num_samples=12, image_size=(112, 84)), root / "data")
    return {"hf_path": str(model), "data_path": str(data)}

