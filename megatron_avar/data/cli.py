"""`avar data generate` (procedural visual-reasoning dataset) and `avar data validate` (check a dataset)."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="generate a procedural visual-reasoning dataset, or validate a conversation dataset",
        description="Conversation datasets: the record format is described in README.md (Data format).",
    )
    commands = parser.add_subparsers(title="data commands", dest="data_command", metavar="COMMAND")

    generate = commands.add_parser(
        "generate",
        help="write a procedural visual-reasoning dataset (images + data.jsonl)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    generate.add_argument("--out", required=True, help="output folder (created; must be empty unless --overwrite)")
    generate.add_argument("--num-samples", type=int, default=64, help="number of tasks")
    generate.add_argument("--seed", type=int, default=0, help="base seed; sample i depends only on (seed, i)")
    generate.add_argument("--image-size", type=int, nargs=2, default=(224, 224), metavar=("W", "H"), help="image size")
    generate.add_argument("--difficulty", type=int, default=1, choices=(1, 2, 3), help="task difficulty")
    generate.add_argument("--kinds", default=None, help="comma-separated task kinds (default: all)")
    generate.add_argument("--no-reasoning", action="store_true", help="omit the reference <think>/<answer> turn")
    generate.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    generate.set_defaults(handler=_generate)

    validate = commands.add_parser(
        "validate",
        help="load and render every record; report counts and token lengths",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    validate.add_argument("path", help="a .jsonl/.json/.parquet file or a folder of them")
    validate.add_argument("--processor", default=None,
                          help="HF model directory for tokenizer/processor (default: offline Qwen2.5-VL)")
    validate.add_argument("--min-pixels", type=int, default=None, help="image preprocessing min_pixels")
    validate.add_argument("--max-pixels", type=int, default=None, help="image preprocessing max_pixels")
    validate.add_argument("--reasoning-tokens", action=argparse.BooleanOptionalAction, default=True,
                          help="count <think>/<answer> as single tokens, as training does by default "
                               "(data.reasoning_tokens)")
    validate.add_argument("--max-length", type=int, default=None,
                          help="report records longer than this many tokens as errors")
    validate.set_defaults(handler=_validate)
    parser.set_defaults(handler=None)


def _generate(args) -> int:
    from megatron_avar.data.procedural import TASK_KINDS, ProceduralConfig, write_dataset

    kinds = tuple(TASK_KINDS) if args.kinds is None else tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    config = ProceduralConfig(
        num_samples=args.num_samples,
        seed=args.seed,
        image_size=tuple(args.image_size),
        difficulty=args.difficulty,
        kinds=kinds,
        with_reasoning=not args.no_reasoning,
    )
    path = write_dataset(config, args.out, overwrite=args.overwrite)
    print(f"wrote {config.num_samples} tasks to {path}")
    return 0


def _validate(args) -> int:
    from megatron_avar.data.conversations import load_conversations, to_chat_messages
    from megatron_avar.processor import load_processor
    from megatron_avar.roles import TokenRole, render_conversation

    if args.max_length is not None and args.max_length < 1:
        raise ValueError(f"--max-length {args.max_length}: give a number of tokens >= 1 (a run's data.seq_length)")
    try:
        dataset = load_conversations(args.path)
    except ValueError as error:
        print(f"invalid dataset: {error}", file=sys.stderr)
        return 1
    processor = load_processor(args.processor, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                               reasoning_tokens=args.reasoning_tokens)
    lengths, image_tokens, num_images, too_long, unreadable = [], 0, 0, [], []
    for index, record_id in enumerate(dataset["id"]):
        try:  # the row's images decode when it is read (OSError, SyntaxError: PIL decoding an image)
            rendered = render_conversation(to_chat_messages(dataset[index]), processor)
        except (ValueError, OSError, SyntaxError) as error:
            unreadable.append(f"{record_id}: {error}")
            continue
        lengths.append(len(rendered))
        image_tokens += int((rendered.roles == TokenRole.IMAGE).sum())
        num_images += rendered.num_images
        if args.max_length is not None and len(rendered) > args.max_length:
            too_long.append(record_id)
    if unreadable:
        listed = "\n  ".join(unreadable[:10])
        print(f"{len(unreadable)} records cannot be rendered:\n  {listed}", file=sys.stderr)
        return 1
    lengths.sort()
    summary = {
        "records": len(dataset),
        "images": num_images,
        "image_tokens": image_tokens,
        "tokens_min": lengths[0],
        "tokens_median": lengths[len(lengths) // 2],
        "tokens_max": lengths[-1],
        "with_answer": sum(answer is not None for answer in dataset["answer"]),
    }
    print(json.dumps(summary, indent=2))
    if too_long:
        print(f"{len(too_long)} records exceed --max-length {args.max_length}: {too_long[:10]}", file=sys.stderr)
        return 1
    return 0
