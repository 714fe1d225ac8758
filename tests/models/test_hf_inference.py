"""megatron_avar.models.hf_inference: the HF inference pieces eval, the local rollout backend and intervene share
(stop and pad ids, left-padded collation with mm_token_type_ids, dtypes); the end-to-end behaviour is tested
through its users (tests/eval, tests/grpo/test_local_backend.py, tests/analysis)."""

from types import SimpleNamespace

import pytest
import torch

from megatron_avar.models import hf_inference

IM_END, ENDOFTEXT, IMAGE = 151645, 151643, 151655


class _Tokenizer:
    unk_token_id = None

    def __init__(self, eos=IM_END, pad=ENDOFTEXT, has_im_end=True):
        self.eos_token_id, self.pad_token_id, self.has_im_end = eos, pad, has_im_end

    def convert_tokens_to_ids(self, token):
        return IM_END if token == "<|im_end|>" and self.has_im_end else None


def test_stop_ids_join_generation_eos_tokenizer_eos_and_end_of_turn():
    generation = SimpleNamespace(eos_token_id=[ENDOFTEXT], pad_token_id=None)
    assert hf_inference.stop_token_ids(_Tokenizer(eos=None), generation) == [ENDOFTEXT, IM_END]
    assert hf_inference.stop_token_ids(_Tokenizer(eos=7), SimpleNamespace(eos_token_id=None)) == [7, IM_END]
    assert hf_inference.stop_token_ids(_Tokenizer()) == [IM_END]
    with pytest.raises(ValueError, match="no <\\|im_end\\|> token"):
        hf_inference.stop_token_ids(_Tokenizer(has_im_end=False))


def test_pad_falls_back_from_generation_config_to_tokenizer_to_first_stop_id():
    assert hf_inference.pad_token_id(_Tokenizer(pad=3), SimpleNamespace(eos_token_id=None, pad_token_id=9)) == 9
    assert hf_inference.pad_token_id(_Tokenizer(pad=3), SimpleNamespace(eos_token_id=None, pad_token_id=None)) == 3
    assert hf_inference.pad_token_id(_Tokenizer(pad=None, eos=None)) == IM_END


def test_cut_at_stop():
    assert hf_inference.cut_at_stop([5, 6, IM_END, 7], {IM_END}) == [5, 6]
    assert hf_inference.cut_at_stop([5, 6], {IM_END}) == [5, 6]


def test_left_padded_collation_marks_images_and_padding():
    rendered = [SimpleNamespace(input_ids=torch.tensor([1, IMAGE, IMAGE, 2]), roles=torch.tensor([0, 1, 1, 2]),
                                pixel_values=torch.ones(8, 3), image_grid_thw=torch.tensor([[1, 2, 4]])),
                SimpleNamespace(input_ids=torch.tensor([3, 4]), roles=torch.tensor([0, 2]), pixel_values=None,
                                image_grid_thw=None)]
    inputs, roles = hf_inference.collate_left_padded(rendered, pad_token_id=IMAGE, image_token_id=IMAGE)
    assert inputs["input_ids"].tolist() == [[1, IMAGE, IMAGE, 2], [IMAGE, IMAGE, 3, 4]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    # padding is never an image token, even when the pad id equals the image id
    assert inputs["mm_token_type_ids"].tolist() == [[0, 1, 1, 0], [0, 0, 0, 0]]
    assert inputs["mm_token_type_ids"].dtype == torch.long
    assert roles.tolist() == [[0, 1, 1, 2], [-1, -1, 0, 2]]
    assert inputs["pixel_values"].shape == (8, 3) and inputs["image_grid_thw"].tolist() == [[1, 2, 4]]


def test_auto_dtype_is_bfloat16_on_cuda_only():
    assert hf_inference.resolve_dtype("auto", "cpu") == torch.float32
    assert hf_inference.resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert hf_inference.resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="dtype 'half'"):
        hf_inference.resolve_dtype("half", "cpu")
