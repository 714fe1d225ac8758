"""`avar quickstart`: the AVAR recipe end to end at toy scale on a CPU, through the same commands a cluster runs.

    data    avar data generate         procedural visual-reasoning tasks with <think>/<answer> chains
    model   toy Qwen2.5-VL checkpoint   the real tokenizer and processor, tiny random weights
    vas     avar vas                    the base model's Visual Attention Score
    sft     avar sft (torchrun, TP=2)   the AVAR objective on megatron-core, checkpoints
    export  avar convert mcore-to-hf    the trained model as an HF checkpoint
    vas     avar vas + vas compare      VAS after training, side by side with the base model
Writes <out>/summary.json with the losses, AVAR metrics, VAS before/after and the time of each stage.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["register", "run_quickstart"]

MARKER = "quickstart.json"
SFT_CONFIG = Path("examples/sft/quickstart.yaml")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "quickstart", help="run the whole AVAR recipe at toy scale on this machine (CPU is fine)",
        description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart", help="run folder (default: runs/quickstart)")
    parser.add_argument("--nproc", type=int, default=2, help="training ranks (TP=2 needs 2; default 2)")
    parser.add_argument("--num-samples", type=int, default=48, help="procedural training samples (default 48)")
    parser.add_argument("--vas-samples", type=int, default=16, help="samples for each VAS report (default 16)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier quickstart run in --out")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of examples/sft/quickstart.yaml")
    parser.set_defaults(handler=lambda args: run_quickstart(
        Path(args.out), nproc=args.nproc, num_samples=args.num_samples, vas_samples=args.vas_samples,
        overwrite=args.overwrite, overrides=args.overrides))


def _avar(*args: str, nproc: int = 0) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = (launcher + ["-m", "megatron_avar", *args]) if nproc else [sys.executable, "-m", "megatron_avar", *args]
    print("+ " + " ".join(command), flush=True)
    result = subprocess.run(command)
    if result.returncode:
        raise ValueError(f"stage `avar {args[0]}` failed with exit code {result.returncode} (output above)")


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} is not empty; pass --overwrite to replace an earlier quickstart run")
        if not (out / MARKER).is_file():
            raise ValueError(f"{out} is not empty and was not written by `avar quickstart`: refusing to delete it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"written_by": "avar quickstart"}) + "\n")


def run_quickstart(out: Path, *, nproc: int, num_samples: int, vas_samples: int, overwrite: bool,
                   overrides: list[str]) -> int:
    from megatron_avar.data.procedural import ProceduralConfig, write_dataset
    from megatron_avar.models.qwen2_5_vl.toy import ToyModelConfig, write_toy_checkpoint

    if not SFT_CONFIG.is_file():
        raise ValueError(f"{SFT_CONFIG} not found: run `avar quickstart` from the repository root")
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    _prepare_out(out, overwrite)
    seconds: dict[str, float] = {}

    def stage(name: str, fn) -> None:
        print(f"\n=== {name} ===", flush=True)
        started = time.monotonic()
        fn()
        seconds[name] = round(time.monotonic() - started, 1)

    data = out / "data" / "data.jsonl"
    model, sft, exported = out / "toy-model", out / "sft", out / "sft-hf"
    vas_args = ["--data", str(data), "--num-samples", str(vas_samples)]
    stage("data", lambda: write_dataset(ProceduralConfig(num_samples=num_samples, image_size=(112, 84)), data.parent))
    stage("model", lambda: write_toy_checkpoint(model, ToyModelConfig(num_layers=4)))
    stage("vas_base", lambda: _avar("vas", "--model", str(model), *vas_args, "--name", "base", "--out",
                                    str(out / "vas-base")))
    tp = "2" if nproc % 2 == 0 else "1"
    stage("sft", lambda: _avar("sft", "--config", str(SFT_CONFIG), f"out={sft}", f"model.hf_path={model}",
                               f"data.path={data}", f"parallel.tensor_model_parallel_size={tp}", *overrides,
                               nproc=nproc))
    latest = sft / "checkpoints" / (sft / "checkpoints" / "latest").read_text().strip()
    stage("export", lambda: _avar("convert", "mcore-to-hf", "--mcore-path", str(latest), "--out", str(exported)))
    stage("vas_trained", lambda: _avar("vas", "--model", str(exported), *vas_args, "--name", "avar-sft", "--out",
                                       str(out / "vas-trained")))
    stage("vas_compare", lambda: _avar("vas", "compare", str(out / "vas-base"), str(out / "vas-trained"),
                                       "--out", str(out / "vas-compare")))
    history = json.loads((sft / "summary.json").read_text())["history"]
    vas = {name: json.loads((out / f"vas-{name}" / "report.json").read_text()) for name in ("base", "trained")}
    picked = ("loss/lm", "avar/l_enh", "avar/l_sup", "avar/vas", "avar/image_share")
    summary = {
        "sft": {"steps": len(history), "first": {k: history[0].get(k) for k in picked},
                "last": {k: history[-1].get(k) for k in picked},
                "tokens_per_second": history[-1].get("perf/tokens_per_second")},
        "vas": {name: {k: report[k] for k in ("vas", "ratio_of_means", "image_share", "num_samples")}
                for name, report in vas.items()},
        "seconds": seconds, "checkpoint": str(latest), "exported_hf": str(exported),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nquickstart done in {sum(seconds.values()):.0f} s: {out / 'summary.json'}\n"
          f"  LM loss {summary['sft']['first']['loss/lm']:.3f} -> {summary['sft']['last']['loss/lm']:.3f}; "
          f"VAS {vas['base']['vas']:.3f} (base) -> {vas['trained']['vas']:.3f} (AVAR SFT)", flush=True)
    return 0
