"""Every YAML file under examples/ loads and validates, read exactly as its command reads it (72B ones included).

The files are found by glob, so a new example is tested without editing this file; one in a folder with no
loader below fails, saying where to add it. What is checked:

- the command's own loading: the one config loader (types, unknown keys, missing keys) and each section's
  ``__post_init__``; ``avar eval`` / ``avar intervene`` through their command-line parsers, with placeholders only
  for what the example leaves to the command line (model, data, out); ``avar sweep`` through the check it runs
  before submitting anything (its script and base SFT config exist, and every point's SFT config loads);
- for the examples of a published Qwen2.5-VL size (``*_3b`` / ``*_7b`` / ``*_72b``, and sweeps over them): the
  parallel layout fits the model (the megatron configs build at that TP / PP; PP divides the decoder layers);
- for the examples a script under slurm/ runs by default: the job's ranks divide into TP x PP and the batch
  divides over the resulting data-parallel replicas, as the trainers require at start-up.

Not checked, because it needs files this machine does not have: that ``model.hf_path``, ``data.path`` and the
like exist (the trainers check them before writing anything). An API key that an example names by its variable
(``api_key_env``) is set to a placeholder: the key is a secret of the machine that runs the example.
"""

import re
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent / "models"))  # the published configs (tests/models)
from qwen_vl_real_configs import QWEN2_5_VL_3B, QWEN2_5_VL_7B, QWEN2_5_VL_72B  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
EXAMPLE_FILES = sorted(path.relative_to(EXAMPLES).as_posix()
                       for path in [*EXAMPLES.rglob("*.yaml"), *EXAMPLES.rglob("*.yml")])
PUBLISHED = {"3b": QWEN2_5_VL_3B, "7b": QWEN2_5_VL_7B, "72b": QWEN2_5_VL_72B}
PLACEHOLDER = "/nonexistent/placeholder"


def _sft(path: Path):
    from megatron_avar.config import load_config
    from megatron_avar.sft.config import SFTConfig

    return load_config(SFTConfig, path)


def _grpo(path: Path):
    from megatron_avar.config import load_config
    from megatron_avar.grpo.config import GRPOConfig

    return load_config(GRPOConfig, path)


def _sweep(path: Path):
    from megatron_avar.config import load_config
    from megatron_avar.sweep.cli import _checked_points
    from megatron_avar.sweep.config import SweepConfig

    config = load_config(SweepConfig, path)
    _checked_points(config)  # what `avar sweep` checks before submitting: paths are relative to the repository
    return config


def _synth(path: Path):
    from megatron_avar.config import load_config
    from megatron_avar.synth.config import SynthConfig

    return load_config(SynthConfig, path)


def _parse(argv: list[str]):
    from megatron_avar.cli import build_parser

    return build_parser().parse_args(argv)


def _eval(path: Path):
    from megatron_avar.eval.cli import resolve_config

    return resolve_config(_parse(["eval", "--config", str(path), "--model", PLACEHOLDER, "--out", PLACEHOLDER,
                                  "--data-root", PLACEHOLDER]))


def _judge(path: Path):
    from megatron_avar.eval.judge import load_judge_config

    return load_judge_config(path)


def _intervene(path: Path):
    from megatron_avar.analysis.cli import resolve_intervene_config

    return resolve_intervene_config(_parse(["intervene", "--config", str(path), "--model", PLACEHOLDER, "--data",
                                            PLACEHOLDER, "--out", PLACEHOLDER + ".json"]))


# examples/<folder>/ -> how its command loads a file; FILE_LOADERS (path under examples/) take precedence.
LOADERS = {"sft": _sft, "grpo": _grpo, "sweeps": _sweep, "synth": _synth, "eval": _eval, "vas": _intervene}
FILE_LOADERS = {"eval/judge.yaml": _judge}


def _loader(name: str):
    if name in FILE_LOADERS:
        return FILE_LOADERS[name]
    folder = name.split("/")[0] if "/" in name else ""
    if folder not in LOADERS:
        pytest.fail(f"examples/{name}: no loader for examples/{folder or '.'}/; add the config class of the command "
                    "that reads it to LOADERS (or FILE_LOADERS) in tests/test_examples.py")
    return LOADERS[folder]


def _api_key_variables(node) -> set[str]:
    if isinstance(node, dict):
        found = {node["api_key_env"]} if isinstance(node.get("api_key_env"), str) else set()
        return found.union(*(_api_key_variables(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_api_key_variables(v) for v in node))
    return set()


def _load(name: str, monkeypatch):
    path = EXAMPLES / name
    for variable in _api_key_variables(yaml.safe_load(path.read_text())):
        monkeypatch.setenv(variable, "placeholder-key")
    monkeypatch.chdir(REPO)  # examples name repository paths relative to the root, as their usage lines run them
    loader = _loader(name)
    try:
        return loader(path)
    except ValueError as error:
        pytest.fail(f"examples/{name} does not validate with {loader.__name__.lstrip('_')}'s loader: {error}\n(if it "
                    "is for another command, map it in LOADERS / FILE_LOADERS of tests/test_examples.py)")


def test_the_glob_finds_the_examples():
    assert {"sft/avar_72b.yaml", "grpo/avar_72b.yaml", "sft/quickstart.yaml", "sweeps/tiny_cpu.yaml"} <= set(
        EXAMPLE_FILES)


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_loads_and_validates(name, monkeypatch):
    assert _load(name, monkeypatch) is not None


def _published_size(name: str) -> str | None:
    match = re.search(r"_(\d+b)$", Path(name).stem.lower())
    return match.group(1) if match and match.group(1) in PUBLISHED else None


def _layouts(name: str, monkeypatch) -> list[tuple[str, str, int, int]]:
    """(what, published size, tp, pp) of every training layout the example describes."""
    config = _load(name, monkeypatch)
    if name.startswith(("sft/", "grpo/")) and (size := _published_size(name)):
        return [(name, size, config.parallel.tensor_model_parallel_size, config.parallel.pipeline_model_parallel_size)]
    if name.startswith("sweeps/") and (size := _published_size(config.sft_config)):
        from megatron_avar.sweep.grid import resolve_points

        return [(f"{name} point {p.name}", size, p.spec.tp, p.spec.pp) for p in resolve_points(config)
                if p.spec.model is None]
    return []


SIZED = [n for n in EXAMPLE_FILES if n.startswith(("sft/", "grpo/")) and _published_size(n)] + \
    [n for n in EXAMPLE_FILES if n.startswith("sweeps/")]


@pytest.mark.parametrize("name", SIZED)
def test_parallel_layout_fits_the_published_model(name, monkeypatch):
    import torch

    from megatron_avar.models.qwen2_5_vl.config import MegatronSettings, Qwen25VLConfig, build_transformer_configs

    for what, size, tp, pp in _layouts(name, monkeypatch):
        model = Qwen25VLConfig.from_hf(PUBLISHED[size])
        # megatron splits the decoder evenly over the pipeline stages (so does `avar convert --pp`).
        assert model.text.num_layers % pp == 0, f"{what}: PP={pp} does not divide the {size} model's layers"
        try:  # TP must split heads, KV groups, FFN, vocabulary and the vision tower (megatron's checks and ours)
            build_transformer_configs(model, MegatronSettings(tensor_model_parallel_size=tp,
                                                              pipeline_model_parallel_size=pp,
                                                              params_dtype=torch.bfloat16, init_on_meta_device=True))
        except (ValueError, AssertionError) as error:
            pytest.fail(f"{what}: TP={tp} PP={pp} does not fit Qwen2.5-VL-{size.upper()}: {error}")


def _slurm_jobs() -> list[tuple[str, str, int]]:
    """(script, example it runs by default, ranks of the job) for each slurm/*.sh that names its example."""
    jobs = []
    for script in sorted((REPO / "slurm").glob("*.sh")):
        text = script.read_text()
        example = re.search(r'^: "\$\{CONFIG:=examples/(\S+\.ya?ml)\}"', text, re.MULTILINE)
        nodes = re.search(r"^#SBATCH --nodes=(\d+)", text, re.MULTILINE)
        per_node = re.search(r"^#SBATCH --ntasks-per-node=(\d+)", text, re.MULTILINE)
        if example and nodes and per_node:
            jobs.append((script.name, example.group(1), int(nodes.group(1)) * int(per_node.group(1))))
    return jobs


def test_the_slurm_scripts_name_examples():
    assert {example for _, example, _ in _slurm_jobs()} >= {"sft/avar_7b.yaml", "sft/avar_72b.yaml",
                                                           "grpo/avar_7b.yaml", "grpo/avar_72b.yaml"}


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "slurm").glob("*.sh")))
def test_a_slurm_jobs_log_lands_in_the_submission_folder(script):
    """Slurm opens --output before the script runs: a log in a folder the script makes (slurm/synth.sh had
    logs/%x-%j.out) fails the job at once, with no log, on a fresh clone."""
    outputs = re.findall(r"^#SBATCH --(?:output|error)=(\S+)", (REPO / "slurm" / script).read_text(), re.MULTILINE)
    assert all("/" not in output for output in outputs), f"slurm/{script}: {outputs}"


@pytest.mark.parametrize("script, name, ranks", _slurm_jobs())
def test_slurm_job_ranks_fit_the_example(script, name, ranks, monkeypatch):
    config = _load(name, monkeypatch)
    tp, pp = config.parallel.tensor_model_parallel_size, config.parallel.pipeline_model_parallel_size
    assert ranks % (tp * pp) == 0, f"slurm/{script}: {ranks} ranks are not a multiple of TP={tp} x PP={pp}"
    dp = ranks // (tp * pp)
    if name.startswith("sft/"):  # training.sft_data.SFTDataLoader
        assert config.train.global_batch_size % (dp * config.data.micro_batch_size) == 0, (
            f"slurm/{script}: train.global_batch_size={config.train.global_batch_size} does not split over DP={dp} "
            f"x data.micro_batch_size={config.data.micro_batch_size}")
    if name.startswith("grpo/"):  # grpo.trainer.run_grpo
        per_replica, remainder = divmod(config.train.prompts_per_step, dp)
        assert remainder == 0 and per_replica % config.train.updates_per_step == 0, (
            f"slurm/{script}: train.prompts_per_step={config.train.prompts_per_step} does not split over DP={dp} "
            f"and then train.updates_per_step={config.train.updates_per_step}")
