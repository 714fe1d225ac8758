"""SFT loader: token stats equal full renders, every sample once per epoch, DP-union, determinism, resume,
and loud errors for samples that cannot be trained on."""

import itertools
import json
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_avar.data.conversations import load_conversations, to_chat_messages
from megatron_avar.data.procedural import ProceduralConfig, write_dataset
from megatron_avar.processor import load_processor
from megatron_avar.roles import IGNORE_INDEX, TokenRole, render_conversation
from megatron_avar.training import sample_plan
from megatron_avar.training.packing import shift_labels
from megatron_avar.training.sft_data import SFTDataConfig, SFTDataLoader

MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112
SEQ = 512


@pytest.fixture(scope="module")
def processor():
    return load_processor(None, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, reasoning_tokens=True)


def _save_image(folder, name, width, height, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    (folder / "hand_images").mkdir(exist_ok=True)
    Image.fromarray(pixels).save(folder / "hand_images" / name)
    return f"hand_images/{name}"


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A folder with 20 procedural samples (data.jsonl) and 6 hand-made ones (hand.jsonl): text only,
    several images of different shapes, several assistant turns."""
    folder = tmp_path_factory.mktemp("sft") / "data"
    write_dataset(ProceduralConfig(num_samples=20, image_size=(200, 150), difficulty=2), folder)
    wide, tall, small = (_save_image(folder, n, w, h, s) for n, w, h, s in
                         (("wide.png", 300, 60, 1), ("tall.png", 70, 260, 2), ("small.png", 30, 40, 3)))
    user = lambda *items: {"role": "user", "content": list(items)}  # noqa: E731
    image = lambda path: {"type": "image", "image": path}  # noqa: E731
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    answer = lambda t: {"role": "assistant", "content": t}  # noqa: E731
    _write_jsonl(folder / "hand.jsonl", [
        {"id": "text-1", "messages": [user(text("What is 6*7?")), answer("<think>6*7=42</think><answer>42</answer>")]},
        {"id": "text-2", "messages": [{"role": "system", "content": "Be brief."}, user(text("Hi")), answer("Hello.")]},
        {"id": "two-images", "messages": [user(image(wide), text("vs"), image(tall)), answer("The second is taller.")]},
        {"id": "three-images", "messages": [user(image(small), image(wide), image(tall), text("Which is smallest?")),
                                            answer("<answer>A</answer>")]},
        {"id": "multi-turn", "messages": [user(image(tall), text("Colour?")), answer("Noise."), user(text("Sure?")),
                                          answer("<think>Looking at the image again.</think><answer>noise</answer>")]},
        {"id": "long-answer", "messages": [user(text("Count to forty.")), answer(" ".join(map(str, range(1, 41))))]},
    ])
    return folder


def _loader(processor, path, *, global_batch_size=4, dp_rank=0, dp_size=1, **overrides):
    fields = dict(path=str(path), seq_length=SEQ, micro_batch_size=1, min_pixels=MIN_PIXELS,
                  max_pixels=MAX_PIXELS, packing_buffer=8)
    fields.update(overrides)
    return SFTDataLoader(SFTDataConfig(**fields), processor, global_batch_size=global_batch_size,
                         dp_rank=dp_rank, dp_size=dp_size)


def _rows(step):
    """(sample ids, input_ids) of every row of a step, in microbatch order."""
    out = []
    for batch in step.microbatches:
        for b in range(batch.input_ids.shape[0]):
            out.append((batch.sample_ids[b], batch.input_ids[b]))
    return out


def test_stats_equal_full_renders(processor, data_dir):
    dataset = load_conversations(data_dir)
    stats = sample_plan.compute_sample_stats(dataset, processor, seq_length=SEQ, truncate=False)
    assert len(stats) == 26 and stats.num_truncated == 0
    for index in range(len(dataset)):
        rendered = render_conversation(to_chat_messages(dataset[index]), processor)
        assert stats.full_lengths[index] == stats.lengths[index] == len(rendered), stats.ids[index]
        assert stats.num_loss_tokens[index] == int((shift_labels(rendered.labels) != IGNORE_INDEX).sum())
        assert stats.num_images[index] == rendered.num_images


def test_one_epoch_holds_every_sample_once_as_rendered_alone(processor, data_dir):
    loader = _loader(processor, data_dir, global_batch_size=1)
    dataset = load_conversations(data_dir)
    position = {sample_id: index for index, sample_id in enumerate(dataset["id"])}
    num_rows = len(loader.epoch_rows(0))
    seen, real_tokens = [], 0
    for step in itertools.islice(loader, num_rows):
        assert step.epoch == 0 and len(step.microbatches) == 1
        batch = step.microbatches[0]
        assert batch.input_ids.shape == (1, SEQ)
        real_tokens += batch.num_real_tokens
        for k, sample_id in enumerate(batch.sample_ids[0]):
            alone = render_conversation(to_chat_messages(dataset[position[sample_id]]), processor)
            begin, end = int(batch.cu_seqlens[0][k]), int(batch.cu_seqlens[0][k + 1])
            assert torch.equal(batch.input_ids[0, begin:end], alone.input_ids)
            assert torch.equal(batch.roles[0, begin:end], alone.roles)
            seen.append(sample_id)
    assert sorted(seen) == sorted(dataset["id"])  # every sample exactly once
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["row_in_epoch"] == 0
    assert loader.packing_efficiency(0) == pytest.approx(real_tokens / (num_rows * SEQ))
    summary = loader.summary()
    assert summary["num_samples"] == 26 and summary["rows_per_epoch"] == num_rows
    assert summary["num_samples_with_image"] == 20 + 3 and summary["steps_per_epoch"] == num_rows
    # one buffer over the whole dataset: FFD's bound, at most 11/9 * OPT + 6/9 rows, OPT >= ceil(tokens / S)
    whole = _loader(processor, data_dir, global_batch_size=1, packing_buffer=len(dataset))
    optimum_bound = -(-sum(whole.stats.lengths) // SEQ)
    assert len(whole.epoch_rows(0)) <= 11 / 9 * optimum_bound + 6 / 9
    assert whole.packing_efficiency(0) >= loader.packing_efficiency(0)


def test_deterministic_and_seeded(processor, data_dir):
    first = list(itertools.islice(_loader(processor, data_dir), 2))
    again = list(itertools.islice(_loader(processor, data_dir), 2))
    for a, b in zip(first, again):
        for (ids_a, tokens_a), (ids_b, tokens_b) in zip(_rows(a), _rows(b)):
            assert ids_a == ids_b and torch.equal(tokens_a, tokens_b)
        for batch_a, batch_b in zip(a.microbatches, b.microbatches):
            assert torch.equal(batch_a.pixel_values, batch_b.pixel_values)
    reseeded = _loader(processor, data_dir, seed=1)
    base = _loader(processor, data_dir)
    assert reseeded.epoch_rows(0) != base.epoch_rows(0)
    assert base.epoch_rows(0) != base.epoch_rows(1)  # a new shuffle every epoch


@pytest.mark.parametrize("dp_size,micro_batch_size", [(2, 1), (4, 1), (2, 2)])
def test_union_over_dp_ranks_is_the_global_batch(processor, data_dir, dp_size, micro_batch_size):
    num_steps = 4  # 16 rows: crosses the epoch boundary
    reference = [_rows(step) for step in itertools.islice(_loader(processor, data_dir), num_steps)]
    per_rank = [list(itertools.islice(_loader(processor, data_dir, dp_rank=rank, dp_size=dp_size,
                                              micro_batch_size=micro_batch_size), num_steps))
                for rank in range(dp_size)]
    assert any(step.epoch == 1 for step in per_rank[0])
    for k in range(num_steps):
        union = [row for rank in range(dp_size) for row in _rows(per_rank[rank][k])]
        assert [ids for ids, _ in union] == [ids for ids, _ in reference[k]]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(union, reference[k]))
        assert all(len(per_rank[rank][k].microbatches) == 4 // dp_size // micro_batch_size for rank in range(dp_size))
        # the step's global counts (from the plan) equal what the ranks' batches hold together
        loss_tokens = sum(batch.num_loss_tokens for rank in range(dp_size) for batch in per_rank[rank][k].microbatches)
        assert per_rank[0][k].num_loss_tokens == per_rank[1][k].num_loss_tokens == loss_tokens


def test_resume_reproduces_the_uninterrupted_run(processor, data_dir):
    uninterrupted = [_rows(step) for step in itertools.islice(_loader(processor, data_dir, global_batch_size=2), 8)]
    first = _loader(processor, data_dir, global_batch_size=2)
    head = [_rows(step) for step in itertools.islice(first, 5)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    assert state["step"] == 5
    resumed = _loader(processor, data_dir, global_batch_size=2)
    resumed.load_state_dict(state)
    tail = list(itertools.islice(resumed, 3))
    assert [step.step for step in tail] == [5, 6, 7]
    assert any(step.epoch == 1 for step in tail)
    for expected, got in zip(uninterrupted, head + [_rows(step) for step in tail]):
        assert [ids for ids, _ in expected] == [ids for ids, _ in got]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(expected, got))
    # the position is global: resuming on two data-parallel ranks continues the same global batches
    ranks = []
    for rank in range(2):
        loader = _loader(processor, data_dir, global_batch_size=2, dp_rank=rank, dp_size=2)
        loader.load_state_dict(state)
        ranks.append(list(itertools.islice(loader, 3)))
    for k in range(3):
        union = _rows(ranks[0][k]) + _rows(ranks[1][k])
        assert [ids for ids, _ in union] == [ids for ids, _ in uninterrupted[5 + k]]
    with pytest.raises(ValueError, match=r"made with data.seed=0, this run has 1"):
        _loader(processor, data_dir, global_batch_size=2, seed=1).load_state_dict(state)


def test_a_resume_refuses_other_rows_and_names_what_changed(processor, data_dir):
    """Another packing buffer packs other rows: refused (it used to repeat and skip samples silently). Other
    token counts of the same data are named as such, not as a data change. The same data and counts resume
    even when the stats' fingerprint changed (a new renderer version that counts the same tokens)."""
    first = _loader(processor, data_dir, global_batch_size=2)
    next(iter(first))
    state = json.loads(json.dumps(first.state_dict()))
    with pytest.raises(ValueError, match=r"made with data.packing_buffer=8, this run has 3"):
        _loader(processor, data_dir, global_batch_size=2, packing_buffer=3).load_state_dict(state)
    counted_otherwise = {**state, "lengths_fingerprint": "other token counts", "fingerprint": "other processor"}
    with pytest.raises(ValueError, match=r"token counts of .* differ from the checkpoint's: the data are the same"):
        _loader(processor, data_dir, global_batch_size=2).load_state_dict(counted_otherwise)
    _loader(processor, data_dir, global_batch_size=2).load_state_dict({**state, "fingerprint": "another renderer"})
    older = {k: v for k, v in state.items() if k not in ("data_fingerprint", "lengths_fingerprint", "packing_buffer")}
    _loader(processor, data_dir, global_batch_size=2).load_state_dict(older)  # a checkpoint of the last version
    with pytest.raises(ValueError, match=r"differ from the checkpoint's .*written before this version"):
        _loader(processor, data_dir, global_batch_size=2).load_state_dict({**older, "fingerprint": "another"})


def test_worker_processes_give_the_same_batches(processor, data_dir):
    serial = list(itertools.islice(_loader(processor, data_dir), 2))
    workers = list(itertools.islice(_loader(processor, data_dir, num_workers=2), 2))
    for a, b in zip(serial, workers):
        assert [ids for ids, _ in _rows(a)] == [ids for ids, _ in _rows(b)]
        assert all(torch.equal(x, y) for (_, x), (_, y) in zip(_rows(a), _rows(b)))


def test_workers_render_the_next_whole_step_while_one_trains(processor, data_dir, tmp_path, monkeypatch):
    """One worker, 8 micro-batches a step: once a step is handed out, all 8 of the next are rendered while it
    trains (the DataLoader's default, 2 per worker, left 6 to be rendered while the GPU waited). The worker is
    forked with the counting renderer; each render appends a line to a file."""
    import multiprocessing
    import time

    from megatron_avar.training import sft_data

    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the counting renderer reaches the worker by fork")
    log = tmp_path / "renders.log"
    render = sft_data._RowRenderer.__getitem__

    def counted(self, key):
        with open(log, "a") as out:
            out.write(f"{key}\n")
        return render(self, key)

    monkeypatch.setattr(sft_data._RowRenderer, "__getitem__", counted)
    steps = iter(_loader(processor, data_dir / "data.jsonl", global_batch_size=8, num_workers=1))
    next(steps)
    deadline, rendered = time.monotonic() + 60, 0
    while time.monotonic() < deadline and rendered < 16:
        time.sleep(0.2)
        rendered = len(log.read_text().splitlines())
    time.sleep(1.0)  # nothing beyond the next step is asked for
    assert len(log.read_text().splitlines()) == 16


@pytest.mark.gpu
def test_batches_come_in_pinned_memory_on_a_gpu_machine(processor, data_dir):
    step = next(iter(_loader(processor, data_dir, num_workers=1)))
    for batch in step.microbatches:
        assert batch.input_ids.is_pinned() and batch.labels.is_pinned()
        assert batch.pixel_values is None or batch.pixel_values.is_pinned()


def test_row_renderer_survives_pickling(processor, data_dir):
    """Workers started with spawn/forkserver (Python 3.14's default) receive the renderer pickled."""
    renderer = _loader(processor, data_dir)._renderer
    copy = pickle.loads(pickle.dumps(renderer))
    for key in [(0, 0), (1, 2)]:
        row, copied = renderer[key], copy[key]
        assert row.sample_ids == copied.sample_ids and torch.equal(row.input_ids, copied.input_ids)


def test_stats_cache_is_used_and_a_stale_one_is_caught(processor, data_dir, tmp_path, monkeypatch):
    fresh = _loader(processor, data_dir, cache_dir=str(tmp_path))
    (cache_file,) = tmp_path.glob("sample_stats_*.json")

    def no_recompute(*args, **kwargs):
        raise AssertionError("stats recomputed although cached")

    monkeypatch.setattr(sample_plan, "compute_sample_stats", no_recompute)
    cached = _loader(processor, data_dir, cache_dir=str(tmp_path))
    assert cached.stats == fresh.stats and cached.fingerprint == fresh.fingerprint
    with pytest.raises(AssertionError, match="recomputed"):  # another seq_length is another cache entry
        _loader(processor, data_dir, cache_dir=str(tmp_path), seq_length=SEQ // 2)
    stale = json.loads(cache_file.read_text())
    stale["full_lengths"] = [n + 1 for n in stale["full_lengths"]]
    cache_file.write_text(json.dumps(stale))
    with pytest.raises(ValueError, match="stats cache is stale"):
        next(iter(_loader(processor, data_dir, cache_dir=str(tmp_path))))


@pytest.mark.parametrize("content", ["{}", "[]", "not json", '{"ids": ["x"], "full_lengths": [1], "lengths": [1], '
                                     '"num_loss_tokens": [1], "num_images": [1]}'])
def test_a_damaged_stats_cache_is_recomputed_and_replaced(processor, data_dir, tmp_path, capsys, content):
    """Found in review: a cache file holding `{}` gave a TypeError traceback, garbage a JSON error naming no file,
    and one for other ids asked the user to delete it."""
    fresh = _loader(processor, data_dir, cache_dir=str(tmp_path))
    (cache_file,) = tmp_path.glob("sample_stats_*.json")
    good = cache_file.read_text()
    cache_file.write_text(content)
    capsys.readouterr()
    again = _loader(processor, data_dir, cache_dir=str(tmp_path))
    assert again.stats == fresh.stats and cache_file.read_text() == good
    assert f"avar: {cache_file} is not a readable sample-stats cache" in capsys.readouterr().err


def test_a_stats_cache_folder_that_cannot_be_written_is_named_before_counting(processor, data_dir, tmp_path,
                                                                              monkeypatch):
    """Before: the samples were counted (minutes at 30K samples), then writing the cache raised a traceback."""
    monkeypatch.setattr(sample_plan, "compute_sample_stats", lambda *args, **kwargs: pytest.fail("counted first"))
    (tmp_path / "a_file").write_text("mine")
    for cache_dir, says in [(tmp_path / "a_file", "is a file"), (tmp_path / "a_file" / "below", "cannot be made")]:
        with pytest.raises(ValueError, match=rf"data.cache_dir={re.escape(str(cache_dir))} {says}.*; give a folder"):
            _loader(processor, data_dir, cache_dir=str(cache_dir))
    assert (tmp_path / "a_file").read_text() == "mine"


def test_a_stats_cache_in_the_data_folder_is_refused(tmp_path):
    """Found in review: data.cache_dir = the data folder started once, then every later start (a Slurm requeue)
    read the cache's sample_stats_*.json as a data file and failed."""
    (tmp_path / "data.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"data.cache_dir=.* is the data folder \(data.path\).*a subfolder of it"):
        SFTDataConfig(path=str(tmp_path), cache_dir=str(tmp_path / "." ))
    SFTDataConfig(path=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    SFTDataConfig(path=str(tmp_path / "data.jsonl"), cache_dir=str(tmp_path))  # a file is read alone


def _one_sample(tmp_path, user_text, answer_text=None, image_first=True):
    size = (112, 112)
    path = _save_image(tmp_path, "img.png", *size, seed=0)
    content = [{"type": "image", "image": path}, {"type": "text", "text": user_text}]
    messages = [{"role": "user", "content": content if image_first else content[::-1]}]
    if answer_text is not None:
        messages.append({"role": "assistant", "content": answer_text})
    return _write_jsonl(tmp_path / "one.jsonl", [{"id": "bad-sample", "messages": messages}])


LONG = " ".join(["word"] * 150)  # ~150 tokens


@pytest.mark.parametrize("case,truncate,match", [
    ("too_long", False, r"'bad-sample' has \d+ tokens, more than seq_length 128: raise data.seq_length"),
    ("cut_before_image", True, r"'bad-sample'.*would cut an image: raise data.seq_length .* data.max_pixels"),
    ("no_loss_after_cut", True, r"'bad-sample' has no response token to train on in its first 128 tokens"),
    ("no_assistant", False, r"'bad-sample' has no response token to train on: give it an assistant turn"),
])
def test_unusable_samples_fail_loudly_with_their_id(processor, tmp_path, case, truncate, match):
    path = {
        "too_long": lambda: _one_sample(tmp_path, LONG, "ok"),
        "cut_before_image": lambda: _one_sample(tmp_path, LONG, "ok", image_first=False),
        "no_loss_after_cut": lambda: _one_sample(tmp_path, LONG, "ok"),
        "no_assistant": lambda: _one_sample(tmp_path, "Describe it."),
    }[case]()
    with pytest.raises(ValueError, match=match):
        _loader(processor, path, seq_length=128, truncate=truncate, global_batch_size=1)


def test_all_bad_samples_are_named_together(processor, tmp_path):
    turn = lambda text: [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]  # noqa: E731
    path = _write_jsonl(tmp_path / "three.jsonl", [{"id": "long-a", "messages": turn(LONG)},
                                                    {"id": "fine", "messages": turn("hi")},
                                                    {"id": "long-b", "messages": turn(LONG + LONG)}])
    with pytest.raises(ValueError,
                       match=r"2 of 3 samples cannot be trained on:\n  sample 'long-a' .*\n  sample 'long-b'"):
        _loader(processor, path, seq_length=128, global_batch_size=1)


def test_truncation_keeps_a_prefix_and_never_labels_past_the_cut(processor, tmp_path):
    path = _one_sample(tmp_path, "Count.", " ".join(map(str, range(200))))
    loader = _loader(processor, path, seq_length=128, truncate=True, global_batch_size=1)
    assert loader.stats.num_truncated == 1 and loader.stats.lengths == [128]
    batch = next(iter(loader)).microbatches[0]
    full = render_conversation(to_chat_messages(load_conversations(path)[0]), processor)
    assert len(full) > 128 and batch.num_real_tokens == 128
    assert torch.equal(batch.input_ids[0], full.input_ids[:128])
    assert batch.labels[0, :127].tolist() == shift_labels(full.labels)[:127].tolist()
    assert int(batch.labels[0, 127]) == IGNORE_INDEX  # the cut token's successor is not in the row
    assert (batch.roles[0] == TokenRole.IMAGE).sum() == int(full.image_grid_thw.prod()) // 4


@pytest.mark.parametrize("field,value,match", [
    ("seq_length", 0, "seq_length must be an int >= 16"),
    ("micro_batch_size", 1.5, "micro_batch_size must be an int >= 1"),
    ("truncate", "yes", "truncate must be true or false"),
    ("max_pixels", 1000, r"data.min_pixels \(3136\) must not exceed data.max_pixels \(1000\)"),
    ("max_pixels", 100, "data.max_pixels=100: give a pixel count >= 784"),  # as the processor would refuse it
    ("path", "", "path must be a non-empty path string"),
])
def test_config_is_validated(field, value, match):
    fields = dict(path="data.jsonl", min_pixels=MIN_PIXELS)
    fields[field] = value
    with pytest.raises(ValueError, match=match):
        SFTDataConfig(**fields)


def test_loader_rejects_batch_layouts_and_foreign_processors(processor, data_dir):
    with pytest.raises(ValueError, match=r"train.global_batch_size \(6\) must be a positive multiple of the "
                                         r"data-parallel size \(4\)"):
        _loader(processor, data_dir, global_batch_size=6, dp_size=4)
    with pytest.raises(ValueError, match="the processor's max_pixels is 12544 but data.max_pixels is 50176"):
        _loader(processor, data_dir, max_pixels=224 * 224)


def test_cut_must_keep_every_image_through_vision_end_and_a_response_token():
    roles = torch.tensor([TokenRole.SYSTEM] * 5 + [TokenRole.IMAGE] * 10 + [TokenRole.TEMPLATE]
                         + [TokenRole.RESPONSE] * 20)  # image tokens 5..14, <|vision_end|> at 15
    for seq_length in (8, 12, 15):  # before the image, inside it, between its last token and <|vision_end|>
        with pytest.raises(ValueError, match="'s' has 36 tokens and its images end at token 16"):
            sample_plan.kept_length(roles, seq_length, True, "s")
    with pytest.raises(ValueError, match="no response token to train on in its first 16 tokens"):
        sample_plan.kept_length(roles, 16, True, "s")
    assert sample_plan.kept_length(roles, 17, True, "s") == 17
    assert sample_plan.kept_length(roles, 36, False, "s") == 36
