"""The toy checkpoint reads back like a real Qwen2.5-VL directory: real token ids, real processor, HF model."""

import pytest
import torch

from megatron_avar.models.qwen2_5_vl.toy import ToyModelConfig, write_toy_checkpoint
from megatron_avar.processor import load_processor


def test_toy_checkpoint_round_trips_through_transformers_and_our_processor(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = write_toy_checkpoint(tmp_path / "toy", ToyModelConfig(num_layers=2))
    processor = load_processor(path)
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert tokenizer.convert_tokens_to_ids("<answer>") == 151667
    assert processor.image_processor.size["longest_edge"] == 112 * 112
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    assert model.config.image_token_id == 151655 and model.config.text_config.num_hidden_layers == 2
    assert model.config.text_config.vocab_size > len(tokenizer)
    ids = torch.tensor([tokenizer("hello world")["input_ids"]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_toy_checkpoint_refuses_to_overwrite(tmp_path):
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        write_toy_checkpoint(tmp_path / "toy")
    assert (tmp_path / "toy" / "keep.txt").read_text() == "mine"
