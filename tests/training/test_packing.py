"""Packed rows hold each sample exactly as it is alone: ids, roles, shifted labels, mrope positions, pixels."""

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_avar.models.qwen2_5_vl.positions import mrope_position_ids
from megatron_avar.processor import load_processor
from megatron_avar.roles import IGNORE_INDEX, TokenRole, render_conversation
from megatron_avar.training.packing import collate_rows, first_fit_decreasing, pack_row

MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112
SEQ = 320


@pytest.fixture(scope="module")
def processor():
    return load_processor(None, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, reasoning_tokens=True)


def _image(width, height, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _conversations():
    """Text only; one image; two images of different shapes and a system turn; two assistant turns."""
    return {
        "text": [{"role": "user", "content": "What is 2+3?"},
                 {"role": "assistant", "content": "<think>2+3=5</think><answer>5</answer>"}],
        "one_image": [{"role": "user", "content": [{"type": "image", "image": _image(90, 60, 0)},
                                                   {"type": "text", "text": "Count the dots."}]},
                      {"role": "assistant", "content": "<answer>7</answer>"}],
        "two_images": [{"role": "system", "content": "You look carefully."},
                       {"role": "user", "content": [{"type": "text", "text": "Compare "},
                                                    {"type": "image", "image": _image(200, 56, 1)},
                                                    {"type": "text", "text": " with "},
                                                    {"type": "image", "image": _image(60, 130, 2)}]},
                       {"role": "assistant", "content": "The first is wider."}],
        "multi_turn": [{"role": "user", "content": [{"type": "image", "image": _image(112, 112, 3)},
                                                    {"type": "text", "text": "Colour?"}]},
                       {"role": "assistant", "content": "Red."},
                       {"role": "user", "content": "Sure?"},
                       {"role": "assistant", "content": "<think>Looking again.</think><answer>red</answer>"}],
    }


@pytest.fixture(scope="module")
def rendered(processor):
    return {name: render_conversation(messages, processor) for name, messages in _conversations().items()}


def _pack(processor, samples, ids):
    return pack_row(samples, ids, seq_length=SEQ, pad_token_id=processor.tokenizer.pad_token_id,
                    image_token_id=processor.image_token_id,
                    spatial_merge_size=processor.image_processor.merge_size)


def test_row_holds_each_sample_as_it_is_alone(processor, rendered):
    ids = ["two_images", "text", "multi_turn", "one_image"]
    samples = [rendered[name] for name in ids]
    row = _pack(processor, samples, ids)
    assert sum(len(s) for s in samples) < SEQ  # the row has a tail
    assert row.input_ids.shape == row.labels.shape == row.roles.shape == (SEQ,)
    assert row.position_ids.shape == (3, SEQ)
    assert row.cu_seqlens.dtype == torch.int32
    assert row.cu_seqlens.tolist() == np.cumsum([0] + [len(s) for s in samples]).tolist()
    assert row.num_real_tokens == sum(len(s) for s in samples)
    assert row.has_image == [True, False, True, True] and row.sample_ids == ids

    segments = row.segment_ids()
    for k, sample in enumerate(samples):
        begin, end = int(row.cu_seqlens[k]), int(row.cu_seqlens[k + 1])
        assert torch.equal(row.input_ids[begin:end], sample.input_ids)
        assert torch.equal(row.roles[begin:end], sample.roles)
        # next-token labels written out from the sample's own ids and roles, never from the next sample
        expected = [int(sample.input_ids[t + 1]) if sample.roles[t + 1] == TokenRole.RESPONSE else IGNORE_INDEX
                    for t in range(len(sample) - 1)] + [IGNORE_INDEX]
        assert row.labels[begin:end].tolist() == expected
        alone, _ = mrope_position_ids(sample.input_ids[None], sample.image_grid_thw,
                                      image_token_id=processor.image_token_id, spatial_merge_size=2)
        assert torch.equal(row.position_ids[:, begin:end], alone[:, 0])
        assert int(row.position_ids[0, begin]) == 0  # positions restart per sample
        assert (segments[begin:end] == k).all()
    tail = slice(row.num_real_tokens, SEQ)
    assert (row.input_ids[tail] == processor.tokenizer.pad_token_id).all()
    assert (row.labels[tail] == IGNORE_INDEX).all() and (row.roles[tail] == TokenRole.PAD).all()
    assert (row.position_ids[:, tail] == 0).all() and (segments[tail] == -1).all()
    assert row.num_loss_tokens == sum(int((s.roles[1:] == TokenRole.RESPONSE).sum()) for s in samples)
    image_samples = [s for s in samples if s.num_images]
    assert torch.equal(row.pixel_values, torch.cat([s.pixel_values for s in image_samples]))
    assert torch.equal(row.image_grid_thw, torch.cat([s.image_grid_thw for s in image_samples]))
    assert row.image_grid_thw.shape[0] == 4


def test_collate_rows_stacks_rows_and_flattens_boundaries(processor, rendered):
    row_a = _pack(processor, [rendered["text"], rendered["one_image"]], ["text", "one_image"])
    row_b = _pack(processor, [rendered["two_images"]], ["two_images"])
    batch = collate_rows([row_a, row_b])
    assert batch.input_ids.shape == batch.labels.shape == batch.roles.shape == batch.segment_ids.shape == (2, SEQ)
    assert batch.position_ids.shape == (3, 2, SEQ)
    assert torch.equal(batch.position_ids[:, 1], row_b.position_ids)
    assert torch.equal(batch.pixel_values, torch.cat([row_a.pixel_values, row_b.pixel_values]))
    assert batch.image_grid_thw.shape == (3, 3)
    a, b = row_a.num_real_tokens, row_b.num_real_tokens
    n_text = len(rendered["text"])
    assert batch.cu_seqlens_flat.tolist() == [0, n_text, a, SEQ, SEQ + b, 2 * SEQ]
    assert batch.num_loss_tokens == row_a.num_loss_tokens + row_b.num_loss_tokens
    assert batch.num_real_tokens == a + b and batch.num_samples_with_image == 2
    assert batch.sample_ids == [["text", "one_image"], ["two_images"]]


def test_full_row_has_no_tail_segment(processor, rendered):
    sample = rendered["text"]
    row = pack_row([sample], ["text"], seq_length=len(sample), pad_token_id=0,
                   image_token_id=processor.image_token_id, spatial_merge_size=2)
    assert row.cu_seqlens_padded().tolist() == [0, len(sample)]
    assert int(row.labels[-1]) == IGNORE_INDEX


def test_pack_row_rejects_overflow_and_image_feature_mismatch(processor, rendered):
    with pytest.raises(ValueError, match=r"'two_images'.*more than seq_length"):
        pack_row([rendered["two_images"]] * 3, ["two_images"] * 3, seq_length=100, pad_token_id=0,
                 image_token_id=processor.image_token_id, spatial_merge_size=2)
    sample = rendered["one_image"]
    bad_grid = sample.image_grid_thw.clone()
    bad_grid[0, 1] += 2  # two more patch rows than the tokens and pixels describe
    tampered = type(sample)(sample.input_ids, sample.roles, sample.labels, sample.pixel_values, bad_grid, sample.text)
    with pytest.raises(ValueError, match=r"'one_image'.*image tokens.*image_grid_thw implies"):
        _pack(processor, [tampered], ["one_image"])


def test_first_fit_decreasing_by_hand():
    # capacity 8: 5->row0 (3 left), 4->row1 (4), 3->row0 (0), 3->row1 (1), 2->row2 (6), 2->row2 (4), 1->row1 (0)
    lengths = [2, 5, 1, 3, 4, 3, 2]
    rows = first_fit_decreasing(lengths, order=list(range(7)), seq_length=8, buffer_size=7)
    assert rows == [[1, 3], [4, 5, 2], [0, 6]]
    # buffers never share a row: with buffers of 2 the rows are drawn from {0,1}, {2,3}, {4,5}, {6}
    rows = first_fit_decreasing(lengths, order=list(range(7)), seq_length=8, buffer_size=2)
    assert rows == [[1, 0], [3, 2], [4, 5], [6]]
    with pytest.raises(ValueError, match="sample 1 has 5 tokens, more than seq_length 4"):
        first_fit_decreasing(lengths, order=list(range(7)), seq_length=4, buffer_size=7)


def test_first_fit_decreasing_places_every_sample_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=500).tolist()
    order = rng.permutation(500).tolist()
    rows = first_fit_decreasing(lengths, order, seq_length=100, buffer_size=64)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    # a row never mixes samples of two shuffle buffers
    position = {index: k // 64 for k, index in enumerate(order)}
    for row in rows:
        assert len({position[i] for i in row}) == 1
    efficiency = sum(lengths) / (100 * len(rows))
    assert efficiency > 0.9, efficiency  # uniform 1..99 packs tightly with FFD
