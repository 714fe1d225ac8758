"""grpo.prompts: GRPO prompts are the records' questions without their answers, rendered exactly as
roles.render_conversation renders hand-built prompt messages; seeded per-epoch order, whole prompts per DP
rank, exact resume, and every bad record or setting named before training."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from megatron_avar.data.procedural import ProceduralConfig, write_dataset
from megatron_avar.grpo.prompts import DEFAULT_INSTRUCTION, GRPODataConfig, PromptLoader, prompt_messages
from megatron_avar.processor import load_processor
from megatron_avar.roles import TokenRole, render_conversation


@pytest.fixture(scope="module")
def processor():
    return load_processor(None, reasoning_tokens=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = write_dataset(ProceduralConfig(num_samples=10, image_size=(112, 84)), tmp_path_factory.mktemp("p") / "d")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return path, records


def _hand_built(record: dict, root: Path, instruction: str = DEFAULT_INSTRUCTION) -> list[dict]:
    """The prompt of a procedural record, written out here: its user turn (image, question) + instruction."""
    (user,) = [m for m in record["messages"] if m["role"] == "user"]
    image = next(item["image"] for item in user["content"] if item["type"] == "image")
    question = next(item["text"] for item in user["content"] if item["type"] == "text")
    return [{"role": "user", "content": [{"type": "image", "image": str(root / image)},
                                         {"type": "text", "text": f"{question}\n\n{instruction}"}]}]


def _loader(path, processor, *, prompts_per_step=4, dp_rank=0, dp_size=1, **fields):
    return PromptLoader(GRPODataConfig(path=str(path), **fields), processor, prompts_per_step=prompts_per_step,
                        dp_rank=dp_rank, dp_size=dp_size)


def _take(loader, num_steps):
    iterator = iter(loader)
    return [next(iterator) for _ in range(num_steps)]


def _same_batch(a, b):
    assert a.prompt_ids == b.prompt_ids and a.ground_truths == b.ground_truths
    for x, y in zip(a.input_ids + a.roles + a.pixel_values + a.image_grid_thw,
                    b.input_ids + b.roles + b.pixel_values + b.image_grid_thw):
        assert torch.equal(x, y)


def test_prompts_are_the_hand_built_questions_rendered_without_the_answer(processor, data):
    path, records = data
    loader = _loader(path, processor, prompts_per_step=10, shuffle=False)
    (step, batch), = _take(loader, 1)
    assert step == 0 and batch.prompt_ids == [r["id"] for r in records]  # shuffle=False: dataset order
    for k, record in enumerate(records):
        assert record["messages"][-1]["role"] == "assistant"  # the SFT-style answer the prompt must not show
        expected = render_conversation(_hand_built(record, path.parent), processor, add_generation_prompt=True)
        assert torch.equal(batch.input_ids[k], expected.input_ids)
        assert torch.equal(batch.roles[k], expected.roles)
        assert torch.equal(batch.pixel_values[k], expected.pixel_values)
        assert torch.equal(batch.image_grid_thw[k], expected.image_grid_thw)
        assert not bool((batch.roles[k] == TokenRole.RESPONSE).any())
        text = processor.tokenizer.decode(batch.input_ids[k])
        assert DEFAULT_INSTRUCTION in text and text.endswith("<|im_start|>assistant\n")
        assert text.count("<|im_start|>assistant") == 1
        assert record["messages"][-1]["content"] not in text
        assert batch.ground_truths[k] == record["answer"]
    summary = loader.summary()
    assert summary["num_prompts"] == summary["num_records"] == 10 and summary["num_skipped_long_prompts"] == 0


def test_system_prompt_instruction_and_turn_rules(processor, data, tmp_path):
    path, records = data
    image = str(path.parent / records[0]["messages"][0]["content"][0]["image"])
    rows = [
        {"id": "sys", "answer": "3", "messages": [
            {"role": "system", "content": "Old system."}, {"role": "user", "content": "What is 1+2?"},
            {"role": "assistant", "content": "<think>1+2</think><answer>3</answer>"}]},
        {"id": "image-only", "answer": 4, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image", "image": image}]}]},
        {"id": "multi", "answer": "B", "metadata": {"options": ["A", "B"]}, "messages": [
            {"role": "user", "content": "First?"}, {"role": "assistant", "content": "yes"},
            {"role": "user", "content": "Second?"}, {"role": "assistant", "content": "no"}]},
    ]
    data_file = tmp_path / "rows.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    batch = _take(_loader(data_file, processor, prompts_per_step=3, shuffle=False, system_prompt="Be brief.",
                          instruction="Answer in <answer></answer>."), 1)[0][1]
    expected = [
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "What is 1+2?\n\nAnswer in <answer></answer>."}],
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image", "image": image},
                                      {"type": "text", "text": "Answer in <answer></answer>."}]}],
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "First?\n\nAnswer in <answer></answer>."}],
    ]
    for k, messages in enumerate(expected):
        rendered = render_conversation(messages, processor, add_generation_prompt=True)
        assert torch.equal(batch.input_ids[k], rendered.input_ids) and torch.equal(batch.roles[k], rendered.roles)
    assert batch.ground_truths == ["3", "4", "B"]
    assert batch.pixel_values[0] is None and batch.image_grid_thw[1].shape == (1, 3)
    # instruction=None: the question as it is; the record's own system turn is kept
    plain = _take(_loader(data_file, processor, prompts_per_step=3, shuffle=False, instruction=None), 1)[0][1]
    rendered = render_conversation(rows[0]["messages"][:2], processor, add_generation_prompt=True)
    assert torch.equal(plain.input_ids[0], rendered.input_ids)
    # the caller's messages are never changed
    original = json.loads(json.dumps(rows[1]["messages"]))
    prompt_messages(rows[1]["messages"], instruction="x", system_prompt="y", record_id="image-only")
    assert rows[1]["messages"] == original


@pytest.mark.parametrize("dp_size", [2, 4])
def test_dp_ranks_take_disjoint_whole_prompts_that_make_up_the_step(processor, data, dp_size):
    path, _ = data
    full = _take(_loader(path, processor, prompts_per_step=4), 3)
    ranks = [_take(_loader(path, processor, prompts_per_step=4, dp_rank=r, dp_size=dp_size), 3)
             for r in range(dp_size)]
    for s, (step, batch) in enumerate(full):
        parts = [ranks[r][s][1] for r in range(dp_size)]
        assert all(ranks[r][s][0] == step for r in range(dp_size))
        assert all(len(p) == 4 // dp_size for p in parts)
        ids = [pid for p in parts for pid in p.prompt_ids]
        assert ids == batch.prompt_ids and len(set(ids)) == 4
        for k, x in enumerate(t for p in parts for t in p.input_ids):
            assert torch.equal(x, batch.input_ids[k])


def test_an_image_of_a_replaced_system_turn_is_not_counted(processor, tmp_path):
    """system_prompt replaces the record's system turn, and with it that turn's image: the prompt's length is
    counted from the images it keeps (it was counted with the system image's size in the user image's place)."""
    from PIL import Image

    Image.new("RGB", (448, 112), "red").save(tmp_path / "wide.png")
    Image.new("RGB", (56, 56), "blue").save(tmp_path / "small.png")
    image = lambda name: {"type": "image", "image": name}  # noqa: E731
    record = {"id": "r0", "answer": "1", "messages": [
        {"role": "system", "content": [image("wide.png"), {"type": "text", "text": "You see a logo."}]},
        {"role": "user", "content": [image("small.png"), {"type": "text", "text": "What?"}]}]}
    data_file = tmp_path / "rows.jsonl"
    data_file.write_text(json.dumps(record) + "\n")
    for system_prompt, images in ((None, 2), ("Be brief.", 1)):  # max_images counts the prompt's images
        loader = PromptLoader(GRPODataConfig(path=str(data_file), system_prompt=system_prompt), processor,
                              prompts_per_step=1, max_images=images)
        batch = loader.render_step(0)  # raised: "renders to 47 tokens but was counted as 107"
        assert batch.image_grid_thw[0].shape[0] == images


def test_resume_continues_exactly_even_with_another_dp_size(processor, data):
    path, _ = data
    uninterrupted = _take(_loader(path, processor), 6)  # 2 steps an epoch: crosses two epoch boundaries
    first = _loader(path, processor)
    _take(first, 3)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip (checkpoint metadata)
    resumed = _loader(path, processor)
    resumed.load_state_dict(state)
    for (step, batch), (expected_step, expected) in zip(_take(resumed, 3), uninterrupted[3:]):
        assert step == expected_step
        _same_batch(batch, expected)
    half = _loader(path, processor, dp_rank=1, dp_size=2)
    half.load_state_dict(state)
    step, batch = _take(half, 1)[0]
    assert step == 3 and batch.prompt_ids == uninterrupted[3][1].prompt_ids[2:]
    with pytest.raises(ValueError, match="seed"):
        _loader(path, processor, seed=1).load_state_dict(state)
    # without shuffle the seed decides nothing (and data.seed is refused there): a checkpoint of a run started
    # with shuffle=false data.seed=3 (before that refusal) resumes with the default seed. Found in review: it
    # could not resume at all, the seed compared and data.seed=3 refused.
    in_order = _loader(path, processor, shuffle=False)
    _take(in_order, 1)
    _loader(path, processor, shuffle=False).load_state_dict({**in_order.state_dict(), "seed": 3})


def test_epochs_are_seeded_permutations_each_leaving_out_another_tail(processor, data):
    path, records = data
    loader = _loader(path, processor)
    orders = [loader.epoch_order(e) for e in range(3)]
    assert all(sorted(order) == list(range(10)) for order in orders)
    assert orders[0] != orders[1] and orders[1] != orders[2]
    assert _loader(path, processor).epoch_order(1) == orders[1]
    assert _loader(path, processor, seed=5).epoch_order(1) != orders[1]
    in_order = _loader(path, processor, shuffle=False)
    # one cyclic stream: each epoch starts where the last stopped, so the 2-prompt tail is not always the same
    assert in_order.epoch_order(0) == list(range(10)) and in_order.epoch_order(1) == [8, 9, *range(8)]
    assert in_order.epoch_order(2) == [6, 7, 8, 9, *range(6)]
    trained = [prompt for step, batch in _take(in_order, 3) for prompt in batch.prompt_ids]
    assert trained == [records[i]["id"] for i in [*range(10), 0, 1]]  # every prompt before any prompt twice
    # a state of the version that repeated the dataset order: resuming in the new order would repeat or skip
    # prompts, so it is refused unless accepted
    old_state = {key: value for key, value in in_order.state_dict().items() if key != "order"}
    with pytest.raises(ValueError, match="repeated the dataset order every epoch"):
        _loader(path, processor, shuffle=False).load_state_dict(old_state)
    _loader(path, processor, shuffle=False).load_state_dict(old_state, accept_data_change=True)
    _loader(path, processor, prompts_per_step=5, shuffle=False).load_state_dict(  # no tail: the same order
        {**old_state, "prompts_per_step": 5})
    steps = _take(loader, 4)
    epoch0 = steps[0][1].prompt_ids + steps[1][1].prompt_ids
    assert epoch0 == [records[i]["id"] for i in orders[0][:8]] and len(set(epoch0)) == 8
    assert steps[2][1].prompt_ids == [records[i]["id"] for i in orders[1][:4]]
    summary = loader.summary()
    assert summary["steps_per_epoch"] == 2 and summary["num_dropped_per_epoch"] == 2


def test_long_prompts_fail_by_name_or_are_skipped_and_counted(processor, data):
    path, records = data
    lengths = {r["id"]: len(render_conversation(_hand_built(r, path.parent), processor, add_generation_prompt=True))
               for r in records}
    longest = max(lengths.values())
    assert min(lengths.values()) < longest  # the limit below splits the records
    _loader(path, processor, max_prompt_length=longest)  # the count is exact: the longest fits at its length
    too_long = sorted(i for i, n in lengths.items() if n == longest)
    with pytest.raises(ValueError, match="max_prompt_length") as error:
        _loader(path, processor, max_prompt_length=longest - 1)
    message = str(error.value)
    assert f"{too_long[0]!r}: {longest} tokens" in message and "skip_long_prompts" in message
    assert "max_pixels" in message
    skipping = _loader(path, processor, max_prompt_length=longest - 1, skip_long_prompts=True, prompts_per_step=2)
    summary = skipping.summary()
    assert sorted(summary["skipped_long_prompt_ids"]) == too_long
    assert summary["num_skipped_long_prompts"] == len(too_long) and skipping.num_prompts == 10 - len(too_long)
    seen = [pid for _, batch in _take(skipping, summary["steps_per_epoch"]) for pid in batch.prompt_ids]
    assert not set(seen) & set(too_long)


@pytest.mark.parametrize("row, match", [
    ({"id": "no-answer", "messages": [{"role": "user", "content": "q"}]}, r"'no-answer' has no answer"),
    ({"id": "blank", "answer": " ", "messages": [{"role": "user", "content": "q"}]}, r"'blank' has no answer"),
    ({"id": "no-user", "answer": "1", "messages": [{"role": "system", "content": "s"},
                                                   {"role": "assistant", "content": "a"}]}, r"'no-user' has no user"),
])
def test_unusable_records_are_named(processor, tmp_path, row, match):
    data_file = tmp_path / "rows.jsonl"
    good = {"id": "good", "answer": "1", "messages": [{"role": "user", "content": "q"}]}
    data_file.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=match):
        _loader(data_file, processor, prompts_per_step=1)


def test_an_image_damaged_after_start_up_is_named_with_its_prompt(processor, tmp_path):
    """Found in review: a step whose image no longer decoded raised PIL's raw OSError, naming no prompt."""
    Image.new("RGB", (56, 56), "red").save(tmp_path / "a.gif")
    data_file = tmp_path / "rows.jsonl"
    data_file.write_text(json.dumps({"id": "gif-1", "answer": "red", "messages": [
        {"role": "user", "content": [{"type": "image", "image": "a.gif"}, {"type": "text", "text": "Colour?"}]}]})
                         + "\n")
    loader = _loader(data_file, processor, prompts_per_step=1)
    data = (tmp_path / "a.gif").read_bytes()
    (tmp_path / "a.gif").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"prompt 'gif-1' of .*rows.jsonl cannot be rendered \(.*truncated.*\); "
                                         r"fix or drop that record"):
        loader.render_step(0)


def test_images_a_backend_cannot_take_are_named_at_start_up(processor, tmp_path):
    """More images than vLLM takes per prompt, or one transformers' resize refuses (aspect ratio over 200): named by
    record when the prompts load, not at the step that draws them (a resume would fail there again)."""
    from PIL import Image

    Image.new("RGB", (56, 56), "red").save(tmp_path / "square.png")
    Image.new("RGB", (600, 2), "red").save(tmp_path / "strip.png")
    image = lambda name: {"type": "image", "image": name}  # noqa: E731
    rows = [{"id": "good", "answer": "1", "messages": [{"role": "user", "content": [image("square.png")]}]},
            {"id": "three", "answer": "1", "messages": [{"role": "user", "content": [image("square.png")] * 3}]},
            {"id": "strip", "answer": "1", "messages": [{"role": "user", "content": [image("strip.png")]}]}]
    # the prompt is the conversation before its first answer: later turns' images are not counted nor resized
    later = [{"role": "assistant", "content": "1"}, {"role": "user", "content": [image("square.png")] * 2 +
                                                                                 [image("strip.png")]}]
    rows.append({"id": "later", "answer": "1",
                 "messages": [{"role": "user", "content": [image("square.png")] * 2}] + later})
    data_file = tmp_path / "rows.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"(?s)2 of 4 records .*'three' has 3 images in its prompt; the rollout "
                                         r"backend takes at most 2.*'strip': its image cannot be a prompt image "
                                         r"\(absolute aspect") as error:
        PromptLoader(GRPODataConfig(path=str(data_file)), processor, prompts_per_step=1, max_images=2)
    assert "'later'" not in str(error.value)
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows if row["id"] in ("good", "later")))
    loader = PromptLoader(GRPODataConfig(path=str(data_file), shuffle=False), processor, prompts_per_step=2,
                          max_images=2)
    assert [len(grid) for grid in loader.render_step(0).image_grid_thw] == [1, 2]


@pytest.mark.parametrize("field, value, match", [
    ("path", "", "path"), ("processor_path", 3, "processor_path"), ("instruction", 5, "instruction"),
    ("instruction", "see <|image_pad|>", "instruction"), ("system_prompt", " ", "system_prompt"),
    ("max_prompt_length", 0, "max_prompt_length"), ("max_prompt_length", 2.5, "max_prompt_length"),
    ("skip_long_prompts", "yes", "skip_long_prompts"), ("min_pixels", 0, "min_pixels"),
    ("max_pixels", True, "max_pixels"), ("shuffle", 1, "shuffle"), ("seed", -1, "seed"),
])
def test_config_fields_are_validated(field, value, match):
    with pytest.raises(ValueError, match=match):
        GRPODataConfig(**{"path": "data.jsonl", field: value})
    with pytest.raises(ValueError, match="min_pixels"):
        GRPODataConfig(path="d", min_pixels=10, max_pixels=5)


def test_step_layouts_and_foreign_processors_are_refused(processor, data):
    path, _ = data
    with pytest.raises(ValueError, match=r"prompts_per_step \(6\).*dp_size \(4\)"):
        _loader(path, processor, prompts_per_step=6, dp_size=4)
    with pytest.raises(ValueError, match=r"prompts_per_step \(12\) exceeds the 10"):
        _loader(path, processor, prompts_per_step=12)
    with pytest.raises(ValueError, match="dp_rank"):
        _loader(path, processor, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="max_pixels"):
        _loader(path, processor, max_pixels=100_000)
