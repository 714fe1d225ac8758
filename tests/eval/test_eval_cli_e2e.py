"""`avar eval` end to end on a toy Qwen2.5-VL checkpoint (real tokenizer/processor, random weights) on CPU."""

import json

from megatron_avar.cli import main
from megatron_avar.eval.benchmarks import BENCHMARKS


def test_eval_all_seven_benchmarks_through_the_cli(toy_checkpoint, eval_data_root, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["eval", "--model", str(toy_checkpoint), "--data-root", str(eval_data_root), "--out", str(out),
            "--limit", "2", "--max-new-tokens", "6", "--batch-size", "2"]
    assert main(argv) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["benchmarks"]) == set(BENCHMARKS)
    for name, summary in scores["benchmarks"].items():
        records = [json.loads(line) for line in (out / "predictions" / f"{name}.jsonl").read_text().splitlines()]
        assert len(records) == (4 if name == "mmmu_pro" else 2) == summary["num_samples"]  # mmmu_pro: 2 per setting
        assert all(isinstance(r["response"], str) and r["prompt"].count("<image>") >= 1 for r in records)
        assert 0.0 <= summary["score"] <= 100.0
        # a random model rarely produces an answer the rules accept; the rate must be reported, not hidden
        assert 0.0 <= summary["extraction_failure_rate"] <= 100.0
    assert "average" in scores and scores["generation"]["max_new_tokens"] == 6
    table = (out / "results.md").read_text()
    assert "| AVAR-Thinker-7B (paper) |" in table and f"| ours: {toy_checkpoint.name} |" in table
    assert "Only the first 2 samples" in table
    snapshot = {p.name: p.read_text() for p in (out / "predictions").iterdir()}

    # a rerun resumes: nothing is generated again (batch size may differ for greedy runs), nothing changes
    capsys.readouterr()
    assert main(argv[:-2] + ["--batch-size", "1"]) == 0
    err = capsys.readouterr().err
    assert all(f"{name}: 0 new predictions" in err for name in BENCHMARKS)
    assert {p.name: p.read_text() for p in (out / "predictions").iterdir()} == snapshot
    assert json.loads((out / "scores.json").read_text()) == scores


def test_greedy_generation_is_deterministic_and_batch_independent(toy_checkpoint, eval_data_root):
    from megatron_avar.eval.benchmarks import get_benchmark
    from megatron_avar.eval.generation import GenerationConfig, HFGenerator

    samples = list(get_benchmark("mmmu").samples(eval_data_root))[:3]  # 1 to 3 images each, different lengths
    one = HFGenerator(str(toy_checkpoint), GenerationConfig(max_new_tokens=5))
    batched = HFGenerator(str(toy_checkpoint), GenerationConfig(max_new_tokens=5, batch_size=3))
    responses = one.generate(samples)
    assert batched.generate(samples) == responses  # left padding + mrope positions per row
    assert one.generate(samples) == responses
    assert len(set(responses)) > 1  # the images and texts matter


def test_checkpoint_generation_config_does_not_change_greedy_decoding(toy_checkpoint, eval_data_root, tmp_path):
    import shutil

    from megatron_avar.eval.benchmarks import get_benchmark
    from megatron_avar.eval.generation import GenerationConfig, HFGenerator

    # Qwen2.5-VL-Instruct ships sampling defaults and a repetition penalty in generation_config.json
    shipped = tmp_path / "shipped"
    shutil.copytree(toy_checkpoint, shipped)
    generation = json.loads((shipped / "generation_config.json").read_text())
    generation.update(do_sample=True, temperature=0.1, top_p=0.001, top_k=1, repetition_penalty=3.0)
    (shipped / "generation_config.json").write_text(json.dumps(generation))
    samples = list(get_benchmark("hallusionbench").samples(eval_data_root, limit=2))
    config = GenerationConfig(max_new_tokens=8)
    from_shipped = HFGenerator(str(shipped), config).generate(samples)
    assert from_shipped == HFGenerator(str(toy_checkpoint), config).generate(samples)


def test_intervention_during_evaluation(toy_checkpoint, eval_data_root):
    """--intervene: α = 0 leaves every response as plain generation; strong α changes some (the edit reaches
    the generated tokens through the KV cache); vLLM refuses it."""
    import pytest

    from megatron_avar.eval.benchmarks import get_benchmark
    from megatron_avar.eval.generation import GenerationConfig, HFGenerator

    samples = list(get_benchmark("mmmu").samples(eval_data_root))[:3]
    plain = HFGenerator(str(toy_checkpoint), GenerationConfig(max_new_tokens=6, batch_size=3)).generate(samples)
    identity = GenerationConfig(max_new_tokens=6, batch_size=3, intervene=True, alpha_img=0.0, alpha_sys=0.0)
    unedited = HFGenerator(str(toy_checkpoint), identity)
    assert unedited.intervention is None  # HF's own attention, as a plain run's (not the hook's kernels)
    assert unedited.generate(samples) == plain
    strong = GenerationConfig(max_new_tokens=6, batch_size=3, intervene=True, alpha_img=3.0, alpha_sys=0.9,
                              intervene_layers="all")
    assert HFGenerator(str(toy_checkpoint), strong).generate(samples) != plain
    with pytest.raises(ValueError, match="intervene needs the hf backend"):
        GenerationConfig(backend="vllm", intervene=True)
    with pytest.raises(ValueError, match="mode='scaled'"):
        GenerationConfig(intervene=True, intervene_mode="scaled")
    with pytest.raises(ValueError, match="alpha_sys"):
        GenerationConfig(intervene=True, alpha_sys=1.5)


def test_vas_on_a_subset_of_each_benchmark(toy_checkpoint, eval_data_root, tmp_path):
    """--vas-samples N: VAS of the first N prompts per benchmark in scores.json and results.md; kept on rerun."""
    import math

    import pytest

    from megatron_avar.eval.runner import EvalConfig

    out = tmp_path / "run"
    argv = ["eval", "--model", str(toy_checkpoint), "--data-root", str(eval_data_root), "--out", str(out),
            "--benchmarks", "mathvista,mmstar", "--limit", "3", "--max-new-tokens", "2", "--batch-size", "2",
            "--vas-samples", "2"]
    assert main(argv) == 0
    scores = json.loads((out / "scores.json").read_text())
    for name in ("mathvista", "mmstar"):
        vas = scores["benchmarks"][name]["vas"]
        assert vas["num_samples"] == 2 and math.isfinite(vas["vas"]) and vas["vas"] > 0
        assert 0 < vas["image_share"] < 1
        assert vas["vas_no_sink"] > vas["vas"]  # the sink's mass leaves K_sys, and every ratio grows
    assert "Visual Attention Score" in (out / "results.md").read_text()
    stored = (out / "vas" / "mathvista.json").read_text()
    assert main(argv) == 0 and (out / "vas" / "mathvista.json").read_text() == stored
    # another --vas-samples is computed again (the stored VAS of 2 samples was kept and reported before)
    assert main([*argv[:-1], "3"]) == 0
    assert json.loads((out / "scores.json").read_text())["benchmarks"]["mathvista"]["vas"]["num_samples"] == 3
    with pytest.raises(ValueError, match="vas_samples needs the hf backend"):
        EvalConfig(out=tmp_path, vas_samples=2, generation={"backend": "vllm"})


def test_the_vllm_backend_stops_where_the_hf_backend_does_and_refuses_temperatures_it_changes(toy_checkpoint,
                                                                                               monkeypatch):
    """vLLM stops only at the tokenizer's and generation_config's eos; the HF backend also at <|im_end|>, so a
    checkpoint whose eos is another token kept generating past the turn under vLLM. (vLLM is not installed here:
    its two classes are stood in for, recording what the backend passes them.) A sampling temperature vLLM would
    change (< 0.01) or refuse (> 2) is refused with the config, before any model loads."""
    import sys
    import types

    import pytest

    from megatron_avar.eval.generation import GenerationConfig
    from megatron_avar.eval.vllm_backend import VLLMGenerator
    from megatron_avar.models.hf_inference import END_OF_TURN, token_id
    from megatron_avar.processor import load_processor

    recorded = {}
    fake = types.ModuleType("vllm")
    fake.LLM = lambda **kwargs: recorded.setdefault("llm", kwargs)  # type: ignore[attr-defined]
    fake.SamplingParams = lambda **kwargs: recorded.setdefault("sampling", kwargs)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", fake)
    (toy_checkpoint / "generation_config.json").rename(toy_checkpoint / "generation_config.json.away")
    try:  # a checkpoint without generation_config.json
        VLLMGenerator(str(toy_checkpoint), GenerationConfig(backend="vllm", max_model_len=4096))
    finally:
        (toy_checkpoint / "generation_config.json.away").rename(toy_checkpoint / "generation_config.json")
    processor = load_processor(toy_checkpoint)
    tokenizer = processor.tokenizer
    assert token_id(tokenizer, END_OF_TURN) in recorded["sampling"]["stop_token_ids"]
    assert tokenizer.eos_token_id in recorded["sampling"]["stop_token_ids"]
    # no video path; pixels normalised on the CPU, as the HF path's processor does
    assert recorded["llm"]["limit_mm_per_prompt"] == {"image": 8, "video": 0}
    assert recorded["llm"]["mm_device_do_normalize"] is False and recorded["llm"]["max_model_len"] == 4096
    # the prompt: the HF path's ids with one pad per image, and the processor's pixels as images (vLLM resized
    # them with torchvision from the originals, which gives other pixels than the PIL processor's)
    import torch
    from PIL import Image

    from megatron_avar.roles import render_conversation

    content = [{"type": "image", "image": Image.new("RGB", (100, 70), (200, 30, 40))}, {"type": "text", "text": "Hi"}]
    generator = VLLMGenerator(str(toy_checkpoint), GenerationConfig(backend="vllm", max_model_len=4096))
    prompt = generator._prompt(types.SimpleNamespace(content=content))
    hf = render_conversation([{"role": "user", "content": content}], processor, add_generation_prompt=True)
    pad = int(processor.image_token_id)
    ids = hf.input_ids.tolist()
    assert prompt["prompt_token_ids"] == [t for i, t in enumerate(ids) if t != pad or ids[i - 1] != pad]
    (image,) = prompt["multi_modal_data"]["image"]
    again = processor.image_processor(images=[image], return_tensors="pt")
    assert torch.equal(again["pixel_values"], hf.pixel_values)
    for temperature in (0.005, 2.5):
        with pytest.raises(ValueError, match=r"the vLLM backend needs generation.temperature in \[0.01, 2.0\]"):
            GenerationConfig(backend="vllm", do_sample=True, temperature=temperature)
    GenerationConfig(backend="vllm", do_sample=True, temperature=0.7)
    GenerationConfig(backend="hf", do_sample=True, temperature=2.5)  # HF samples at any temperature


def test_vllm_gets_the_context_the_run_needs_and_a_prompt_that_does_not_fit_is_named(toy_checkpoint, eval_data_root,
                                                                                    tmp_path, monkeypatch, capsys):
    """Before: vLLM's LLM was built without max_model_len, so it reserved KV cache for the model's whole context (128k
    for Qwen2.5-VL), and a prompt too long for a set length failed inside vLLM naming no sample. Now the engine gets
    the longest prompt to generate + --max-new-tokens, counted from image sizes exactly as the prompts render
    (checked on every fixture sample, 1 to 3 images each); --max-model-len sets it; a prompt that does not fit with
    --max-new-tokens is one error line naming the benchmark, the sample and the fix; and, changing no response, the
    length may differ on a resume. (vLLM is not installed here: its classes are stood in for, and see no prompt.)"""
    import functools
    import sys
    import types

    import megatron_avar.processor as processor_module
    from megatron_avar import platform
    from megatron_avar.eval.benchmarks import get_benchmark
    from megatron_avar.eval.vllm_backend import prompt_length
    from megatron_avar.roles import render_conversation

    loaded = functools.cache(processor_module.load_processor)  # (the test's runs load the same processor 4 times)
    monkeypatch.setattr(processor_module, "load_processor", lambda *args, **kwargs: loaded(*args, **kwargs))
    processor = processor_module.load_processor(str(toy_checkpoint), min_pixels=None, max_pixels=None)
    lengths = {}
    for name in BENCHMARKS:
        for sample in get_benchmark(name).samples(eval_data_root):
            rendered = render_conversation([{"role": "user", "content": sample.content}], processor,
                                           add_generation_prompt=True)
            lengths[name, sample.id] = prompt_length(sample.content, processor)
            assert lengths[name, sample.id] == rendered.input_ids.numel(), (name, sample.id)

    engines = []

    class LLM:
        def __init__(self, **kwargs):
            engines.append(kwargs)

        def generate(self, prompts, sampling):
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text="<answer>B</answer>")])] * len(prompts)

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = LLM, lambda **kwargs: kwargs  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(platform, "vllm_available", lambda: True)
    argv = ["eval", "--model", str(toy_checkpoint), "--data-root", str(eval_data_root), "--benchmarks", "mmmu,mmstar",
            "--backend", "vllm", "--max-new-tokens", "6"]
    longest = max(length for (name, _), length in lengths.items() if name in ("mmmu", "mmstar"))
    assert main([*argv, "--out", str(tmp_path / "derived")]) == 0
    assert engines[-1]["max_model_len"] == longest + 6
    assert f"vLLM max_model_len {longest + 6}: the longest prompt to generate (mmmu sample" in capsys.readouterr().err

    # a length the longest prompt does not fit with --max-new-tokens: refused before vLLM sees it, naming it
    (name, sample_id), length = max(((key, n) for key, n in lengths.items() if key[0] == "mmmu"), key=lambda kv: kv[1])
    assert main([*argv, "--out", str(tmp_path / "short"), "--max-model-len", str(longest + 5)]) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert error == (f"avar eval: error: mmmu: sample {sample_id!r} has a {length}-token prompt: with --max-new-tokens "
                     f"6 it needs --max-model-len >= {length + 6}, more than the {longest + 5} vLLM was started with. "
                     "Raise --max-model-len (or leave it out: the default, 0, derives it from the data), or lower "
                     "--max-pixels or --max-new-tokens")
    # a resume with another length: the same responses, so not another setting
    assert main([*argv, "--out", str(tmp_path / "derived"), "--max-model-len", "100000"]) == 0
    assert "mmmu: 0 new predictions" in capsys.readouterr().err
    assert "max_model_len" not in json.loads((tmp_path / "derived" / "run_config.json").read_text())["generation"]


def test_a_sample_with_more_images_than_vllm_takes_is_named_before_vllm_sees_it(toy_checkpoint, eval_data_root,
                                                                                tmp_path, monkeypatch, capsys):
    """vLLM engines are started with at most vllm_inputs.MAX_IMAGES_PER_PROMPT images per prompt, and refuse a prompt
    with more naming no sample. Before: eval passed such a sample on. Now it is one error line naming the benchmark,
    the sample and the fix, whether the length is derived (before vLLM starts) or given (before the prompt is sent).
    (The limit is lowered to 1 here, below the fixture's 2- and 3-image MMMU samples; vLLM is stood in for.)"""
    import sys
    import types

    import megatron_avar.vllm_inputs as vllm_inputs
    from megatron_avar import platform
    from megatron_avar.eval.benchmarks import get_benchmark

    engines, sent = [], []

    class LLM:
        def __init__(self, **kwargs):
            engines.append(kwargs)

        def generate(self, prompts, sampling):
            sent.extend(prompts)
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text="<answer>B</answer>")])] * len(prompts)

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = LLM, lambda **kwargs: kwargs  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(platform, "vllm_available", lambda: True)
    monkeypatch.setattr(vllm_inputs, "MAX_IMAGES_PER_PROMPT", 1)
    first = next(s for s in get_benchmark("mmmu").samples(eval_data_root)
                 if sum(item["type"] == "image" for item in s.content) > 1)
    count = sum(item["type"] == "image" for item in first.content)
    expected = (f"avar eval: error: mmmu: sample {first.id!r} has {count} images; the vLLM backend takes at most 1 per "
                "prompt: use --backend hf for it")
    argv = ["eval", "--model", str(toy_checkpoint), "--data-root", str(eval_data_root), "--benchmarks", "mmmu",
            "--backend", "vllm", "--max-new-tokens", "6"]
    for extra in ([], ["--max-model-len", "100000"]):
        assert main([*argv, "--out", str(tmp_path / f"run{len(extra)}"), *extra]) == 2
        assert [line for line in capsys.readouterr().err.splitlines() if "error" in line] == [expected]
        assert len(engines) == (1 if extra else 0) and sent == []  # derived: refused before vLLM starts
