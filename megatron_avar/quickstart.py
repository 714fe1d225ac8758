"""`avar quickstart`: the AVAR recipe end to end at toy scale on a CPU, through the same commands a cluster runs.

    data      avar data generate         procedural visual-reasoning tasks with <think>/<answer> chains
    model     toy Qwen2.5-VL checkpoint   the real tokenizer and processor, tiny random weights
    vas       avar vas                    the base model's Visual Attention Score (held-out samples)
    sft       avar sft (torchrun, TP=2)   the AVAR objective on megatron-core, checkpoints
    baseline  avar sft ... alpha=beta=0   the same run without the attention terms
    export    avar convert mcore-to-hf    both trained models as HF checkpoints
    vas       avar vas + vas compare      VAS after training, base vs AVAR vs baseline
    grpo      avar grpo (torchrun, TP=2)  GRPO with the visual reward from the AVAR SFT model, local rollouts
                                          (the visual term on every rollout: a toy model is never right)
Writes <out>/summary.json: vas_before, vas_after, vas_after_baseline, final_lm_loss, final_lm_loss_baseline,
hf_export_dir, the AVAR metrics of both runs, the GRPO reward curve (grpo) and the time of each stage.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from megatron_avar import atomic_files

__all__ = ["register", "run_quickstart"]

MARKER = "quickstart.json"
REPLACED = ".replaced"  # an earlier run while --overwrite replaces it: deleted once the new run is complete
TOY_LAYERS = 4
# what the quickstart sets itself: an override of these would send a stage elsewhere, or leave one stage's output
# where the next does not look
OWN_SETTINGS = ("out", "model.hf_path", "data.path", "parallel.tensor_model_parallel_size")
STAGE_STOP_S = 60  # a stopped stage's time to finish (a training stage saves a checkpoint) before it is killed
SFT_CONFIG = Path("examples/sft/quickstart.yaml")
GRPO_CONFIG = Path("examples/grpo/tiny.yaml")
GRPO_STEPS = 6
GRPO_CURVE = ("reward/total", "reward/accuracy", "reward/format", "reward/r_visual", "response/length_mean",
              "logprob/generator_max_abs_diff", "optim/grad_norm")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "quickstart", help="run the whole AVAR recipe at toy scale on this machine (CPU is fine)",
        description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart", help="run folder (default: runs/quickstart)")
    parser.add_argument("--nproc", type=int, default=2, help="training ranks (TP=2 needs 2; default 2)")
    parser.add_argument("--num-samples", type=int, default=48, help="procedural training samples (default 48)")
    parser.add_argument("--vas-samples", type=int, default=16, help="samples for each VAS report (default 16)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier quickstart run in --out (kept in --out/.replaced until the new one "
                             "completes, put back if it fails or is stopped)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of examples/sft/quickstart.yaml")
    parser.set_defaults(handler=lambda args: run_quickstart(
        Path(args.out), nproc=args.nproc, num_samples=args.num_samples, vas_samples=args.vas_samples,
        overwrite=args.overwrite, overrides=args.overrides))


def _avar(*args: str, nproc: int = 0) -> None:
    """Run a stage: `avar ARGS` (under torchrun with ``nproc`` ranks), in a process group of its own, so that a
    stopped quickstart stops all of it (torchrun and its ranks) rather than orphaning it (:func:`_stopping`)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = (launcher + ["-m", "megatron_avar", *args]) if nproc else [sys.executable, "-m", "megatron_avar", *args]
    print("+ " + " ".join(command), flush=True)
    if code := _run_stage(command):
        raise ValueError(f"stage `avar {args[0]}` failed with exit code {code} (output above)")


def _run_stage(command: list[str]) -> int:
    """``command``'s exit code; it runs in a process group of its own, stopped with it on an exception."""
    stage = subprocess.Popen(command, process_group=0)
    try:
        return stage.wait()
    except BaseException:  # Ctrl-C, or SIGTERM / SIGHUP (see _stopping)
        _stop(stage)
        raise


def _stop(stage: subprocess.Popen) -> None:
    """SIGTERM to the stage's process group (torchrun passes it on; a training rank saves a checkpoint and stops),
    SIGKILL to what is left after STAGE_STOP_S; not cut short by another Ctrl-C or SIGTERM (held until it returns),
    so the stage is gone before the earlier run is put back."""
    with _signals_held():
        with suppress(ProcessLookupError):
            os.killpg(stage.pid, signal.SIGTERM)
        try:
            stage.wait(timeout=STAGE_STOP_S)
        except subprocess.TimeoutExpired:
            pass
        with suppress(ProcessLookupError):
            os.killpg(stage.pid, signal.SIGKILL)
        stage.wait()


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_holding = {"depth": 0, "pending": False}  # _signals_held's state: blocks open, and a stop that arrived in one


def _interrupt(signum, frame) -> None:
    if _holding["depth"]:
        _holding["pending"] = True
        return
    raise KeyboardInterrupt


@contextmanager
def _signals_held() -> Iterator[None]:
    """Under :func:`_stopping`: Ctrl-C, SIGTERM and SIGHUP held back for the block (raised as KeyboardInterrupt
    once it ends), so what moves a run aside or back, or stops a stage, is not left half done by a stop."""
    _holding["depth"] += 1
    try:
        yield
    finally:
        _holding["depth"] -= 1
    if not _holding["depth"] and _holding["pending"]:
        _holding["pending"] = False
        raise KeyboardInterrupt


@contextmanager
def _stopping() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP (a closed terminal, `kill`) stop the quickstart alike: the running stage is
    stopped and the earlier run, if one is being replaced, is put back."""
    previous = {signum: signal.signal(signum, _interrupt) for signum in _STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _holding["pending"] = False


# While --overwrite replaces a run, the earlier run waits in out/.replaced. Two marks in there tell a later run what
# a SIGKILL interrupted: MOVED (written once the whole earlier run is aside: without it, the move aside was cut short,
# and every entry of out is still the earlier run's) and RESTORING (written before the earlier run is moved back:
# the new run's entries are gone by then, so every entry of out is the earlier run's).
MOVED, RESTORING = ".moved", ".restoring"


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Check ``out`` (held under its run lock) and, with ``overwrite``, move an earlier run into ``out/.replaced``:
    :func:`_replaced_run_kept` deletes it once the new run is complete, or puts it back. What a killed replacing
    run left (module comment above MOVED) is sorted out first."""
    aside = out / REPLACED
    if _entries(out) or aside.exists():
        if not overwrite:
            raise ValueError(f"{out} is not empty; pass --overwrite to replace an earlier quickstart run")
        if not (out / MARKER).is_file() and not (aside / MARKER).is_file():
            raise ValueError(f"{out} is not empty and was not written by `avar quickstart`: refusing to delete it")
    with _signals_held():
        if (aside / RESTORING).exists():  # killed putting the earlier run back: finish that first
            _move_back(out)
        if aside.exists() and not (aside / MOVED).exists():  # killed moving it aside: every entry is the earlier run's
            _move_aside(out)
        elif aside.exists() and (out / "summary.json").is_file():  # killed as the replacing run finished: keep the new
            shutil.rmtree(aside)
        elif aside.exists():  # killed while replacing: what it wrote is not a run
            for entry in _entries(out):
                _remove(entry)
        if _entries(out):
            _move_aside(out)
    atomic_files.write_json(out / MARKER, {"written_by": "avar quickstart"})


def _move_aside(out: Path) -> None:
    aside = out / REPLACED
    aside.mkdir(exist_ok=True)
    for entry in _entries(out):
        entry.rename(aside / entry.name)
    atomic_files.write_text(aside / MOVED, "")


def _move_back(out: Path) -> None:
    aside = out / REPLACED
    atomic_files.write_text(aside / RESTORING, "")
    for entry in aside.iterdir():
        if entry.name not in (MOVED, RESTORING):
            entry.rename(out / entry.name)
    shutil.rmtree(aside)


@contextmanager
def _replaced_run_kept(out: Path) -> Iterator[None]:
    """The run in ``out/.replaced`` (if any) deleted when the block ends well, else put back in place of what the
    block wrote."""
    aside = out / REPLACED
    try:
        yield
    except BaseException:
        if aside.is_dir():
            with _signals_held():
                for entry in _entries(out):
                    _remove(entry)
                _move_back(out)
            print(f"avar quickstart: the earlier run in {out} is back in place", file=sys.stderr)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _entries(out: Path) -> list[Path]:
    """What a run wrote in ``out``: all but its lock file and the run being replaced."""
    from megatron_avar.training.run_lock import LOCK_FILE

    return [entry for entry in out.iterdir() if entry.name not in (LOCK_FILE, REPLACED)]


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()


def _check_stages(overrides: list[str], *, nproc: int, tp: str) -> None:
    """ValueError naming a bad override of the SFT stages (unknown key, wrong type), as `avar sft` would, or an
    --nproc the layouts and batches of the SFT and GRPO stages cannot split over."""
    from megatron_avar.config import load_config
    from megatron_avar.grpo.config import GRPOConfig
    from megatron_avar.sft.config import SFTConfig

    own = [override for override in overrides if override.partition("=")[0] in OWN_SETTINGS]
    if own:
        raise ValueError(f"{', '.join(own)}: the quickstart sets {', '.join(OWN_SETTINGS)} itself (--out for the run "
                         "folder, --nproc for the ranks); run `avar sft` for a run of your own")
    unused = ["out=unused", "model.hf_path=unused", "data.path=unused", f"parallel.tensor_model_parallel_size={tp}"]
    sft = load_config(SFTConfig, SFT_CONFIG, [*unused, *overrides])
    sft.avar.layer_indexes(TOY_LAYERS)  # the toy model's layers, checked before the stages that would find out
    grpo = load_config(GRPOConfig, GRPO_CONFIG, [*unused, f"train.steps={GRPO_STEPS}"])
    for stage, config, batch, per_rank in (
            ("SFT", sft, ("train.global_batch_size", sft.train.global_batch_size), sft.data.micro_batch_size),
            ("GRPO", grpo, ("train.prompts_per_step", grpo.train.prompts_per_step), 1)):
        parallel = config.parallel
        model_parallel = (parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size
                          * parallel.context_parallel_size)
        if nproc % model_parallel:
            raise ValueError(f"--nproc {nproc} is not a multiple of the {stage} stages' TP x PP x CP = "
                             f"{model_parallel}")
        (name, value), dp = batch, nproc // model_parallel
        if value % (dp * per_rank):
            unit = f"{dp} data-parallel ranks" + (f" x data.micro_batch_size {per_rank}" if per_rank > 1 else "")
            raise ValueError(f"the {stage} stages' {name} ({value}) does not split over the {unit} of --nproc "
                             f"{nproc}: pass an --nproc of TP x PP x CP ({model_parallel}) times a divisor of "
                             f"{value // per_rank}, or set {name}")


def run_quickstart(out: Path, *, nproc: int, num_samples: int, vas_samples: int, overwrite: bool,
                   overrides: list[str]) -> int:
    from megatron_avar.training.run_lock import holding_run_lock

    if not SFT_CONFIG.is_file() or not GRPO_CONFIG.is_file():
        raise ValueError(f"{SFT_CONFIG} not found: run `avar quickstart` from the repository root")
    for flag, value in (("--nproc", nproc), ("--num-samples", num_samples), ("--vas-samples", vas_samples)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the quickstart's runs")
    tp = "2" if nproc % 2 == 0 else "1"  # tensor parallelism of the training stages
    # before anything is written or an earlier run replaced: a typo must not cost it, nor the stages before sft
    _check_stages(overrides, nproc=nproc, tp=tp)
    conflict = "two quickstarts on one --out would delete each other's files; wait for it to end, or pass another --out"
    with holding_run_lock(out, conflict=conflict), _stopping():
        _prepare_out(out, overwrite)
        with _replaced_run_kept(out):
            _run_stages(out, nproc=nproc, num_samples=num_samples, vas_samples=vas_samples, overrides=overrides,
                        tp=tp)
    return 0


def _run_stages(out: Path, *, nproc: int, num_samples: int, vas_samples: int, overrides: list[str],
                tp: str) -> None:
    from megatron_avar.data.procedural import ProceduralConfig, write_dataset
    from megatron_avar.models.qwen2_5_vl.toy import ToyModelConfig, write_toy_checkpoint

    seconds: dict[str, float] = {}

    def stage(name: str, fn):
        print(f"\n=== {name} ===", flush=True)
        started = time.monotonic()
        result = fn()
        seconds[name] = round(time.monotonic() - started, 1)
        return result

    data, held_out = out / "data" / "data.jsonl", out / "held-out" / "data.jsonl"
    model = out / "toy-model"
    stage("data", lambda: write_dataset(ProceduralConfig(num_samples=num_samples, image_size=(112, 84)), data.parent))
    stage("held_out", lambda: write_dataset(ProceduralConfig(num_samples=vas_samples, seed=1, image_size=(112, 84)),
                                            held_out.parent))
    stage("model", lambda: write_toy_checkpoint(model, ToyModelConfig(num_layers=TOY_LAYERS)))

    def vas(checkpoint: Path, name: str) -> dict:
        _avar("vas", "--model", str(checkpoint), "--data", str(held_out), "--num-samples", str(vas_samples),
              "--name", name, "--out", str(out / f"vas-{name}"))
        return json.loads((out / f"vas-{name}" / "report.json").read_text())

    def train(name: str, extra: list[str]) -> dict:
        run = out / name
        _avar("sft", "--config", str(SFT_CONFIG), f"out={run}", f"model.hf_path={model}", f"data.path={data}",
              f"parallel.tensor_model_parallel_size={tp}", *overrides, *extra, nproc=nproc)  # the baseline's α=β=0 last
        latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
        _avar("convert", "mcore-to-hf", "--mcore-path", str(latest), "--out", str(out / f"{name}-hf"))
        return json.loads((run / "summary.json").read_text())["history"]

    reports = {"base": stage("vas_base", lambda: vas(model, "base"))}
    histories = {"avar": stage("sft", lambda: train("sft", [])),
                 "baseline": stage("sft_baseline", lambda: train("sft-baseline", ["avar.alpha=0", "avar.beta=0"]))}
    reports["avar"] = stage("vas_avar", lambda: vas(out / "sft-hf", "avar-sft"))
    reports["baseline"] = stage("vas_baseline", lambda: vas(out / "sft-baseline-hf", "plain-sft"))
    stage("vas_compare", lambda: _avar("vas", "compare", *(str(out / f"vas-{n}") for n in
                                                           ("base", "avar-sft", "plain-sft")),
                                       "--out", str(out / "vas-compare")))

    def grpo() -> list[dict]:
        run = out / "grpo"
        # A toy model never answers right, so the paper's correctness gate would zero every reward (and every
        # advantage): here the visual term is added to every rollout (reward.gate_visual_on_correct=false, the
        # ablation flag), so the groups' rewards differ and the policy is updated.
        _avar("grpo", "--config", str(GRPO_CONFIG), f"out={run}", f"model.hf_path={out / 'sft-hf'}",
              f"data.path={data}", f"parallel.tensor_model_parallel_size={tp}", f"train.steps={GRPO_STEPS}",
              "reward.gate_visual_on_correct=false", "optim.lr=1e-3", "checkpoint.interval=0", nproc=nproc)
        return [{"step": h["step"], **{k: h[k] for k in GRPO_CURVE}}
                for h in json.loads((run / "summary.json").read_text())["history"]]

    grpo_curve = stage("grpo", grpo)
    picked = ("loss/lm", "avar/l_enh", "avar/l_sup", "avar/vas", "avar/image_share")
    summary = {
        "vas_before": reports["base"]["vas"], "vas_after": reports["avar"]["vas"],
        "vas_after_baseline": reports["baseline"]["vas"],
        "final_lm_loss": histories["avar"][-1]["loss/lm"],
        "final_lm_loss_baseline": histories["baseline"][-1]["loss/lm"],
        "hf_export_dir": str(out / "sft-hf"), "hf_export_dir_baseline": str(out / "sft-baseline-hf"),
        "image_share": {name: report["image_share"] for name, report in reports.items()},
        "training": {name: {"steps": len(h), "first": {k: h[0].get(k) for k in picked},
                            "last": {k: h[-1].get(k) for k in picked}} for name, h in histories.items()},
        "grpo": grpo_curve,
        "seconds": seconds,
    }
    atomic_files.write_json(out / "summary.json", summary)
    print(f"\nquickstart done in {sum(seconds.values()):.0f} s: {out / 'summary.json'}\n"
          f"  VAS on held-out samples: {summary['vas_before']:.3f} (base) -> {summary['vas_after']:.3f} (AVAR SFT) "
          f"vs {summary['vas_after_baseline']:.3f} (plain SFT)\n"
          f"  final LM loss: {summary['final_lm_loss']:.3f} (AVAR SFT), {summary['final_lm_loss_baseline']:.3f} "
          f"(plain SFT)\n"
          f"  GRPO: reward {[round(h['reward/total'], 3) for h in grpo_curve]}, r_visual of the rollouts "
          f"{[round(h['reward/r_visual'], 3) for h in grpo_curve]}", flush=True)
