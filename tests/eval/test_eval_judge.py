"""`avar eval --judge`: the answer judge over real HTTP against the synthesis tests' fake OpenAI-compatible server
(a subclass that answers VLMEvalKit's judge prompts). Rule-read items never reach it, judged items are graded
by the benchmark's rules, replies are cached and recorded, failures are counted and past the share fail the
run, and results.md shows both scores. Generation is a stand-in (no model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import megatron_avar.eval.runner as runner
from megatron_avar.cli import main
from megatron_avar.eval.benchmarks import get_benchmark
from megatron_avar.eval.judge import load_judge_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "synth"))
from synth_fake_teacher import FakeTeacher, Fault  # noqa: E402

KEY_ENV, SECRET = "AVAR_JUDGE_TEST_KEY", "sk-judge-test-DO-NOT-LEAK"
BENCHMARKS = "mathvista,mathverse_vo,mmstar"

# (benchmark, sample id) -> the model's response; the comment says what the rules make of it
RESPONSES = {
    ("mathvista", "1"): "I would go with the second option here",   # no letter, no option text: judge -> B (5 cm)
    ("mathvista", "2"): "twelve",                                    # no number: judge -> 12
    ("mathvista", "3"): "\\boxed{1.5}",                              # read by rule (correct)
    ("mathvista", "4"): "<think>hmm",                                # unclosed <think>: a format failure, not judged
    ("mathverse_vo", "2"): "the second choice",                      # judge -> B
    ("mathverse_vo", "4"): "I cannot tell what the angle is from this figure",  # judge -> null: judge also failed
    ("mathverse_vo", "6"): "Honestly the length is hard to read here",          # the judge request fails (HTTP 500)
    ("mmstar", "0"): "B",                                            # read by rule (correct)
    ("mmstar", "1"): "the four-sided one",                           # judge -> B
    ("mmstar", "2"): "D",                                            # read by rule (wrong)
}
JUDGE_REPLIES = {"second option": "B", "twelve": "12", "second choice": "B", "cannot tell": "null",
                 "four-sided": " B\n"}
JUDGED = {r for (_, _), r in RESPONSES.items() if not r.startswith(("\\boxed", "<think>")) and r not in ("B", "D")}


def judged_response(prompt: str) -> str:
    """The model response inside one of VLMEvalKit's judge prompts (megatron_avar/eval/judge_prompts.py)."""
    if "\nModel respone: " in prompt:  # MathVista / MathVision
        return prompt.rsplit("\nModel respone: ", 1)[1].removesuffix("Extracted answer:")
    if prompt.endswith("'\nExtracted Answer: "):  # MathVerse
        return prompt.rsplit("\nModel response: '", 1)[1].removesuffix("'\nExtracted Answer: ")
    return prompt.rsplit("\nAnswer: ", 1)[1].removesuffix("\nYour output: ")  # multiple choice, yes/no


class FakeJudge(FakeTeacher):
    """Replies JUDGE_REPLIES[k] when k is in the judged response, else "Z"; faults match the judged response."""

    def __init__(self, **kwargs):
        super().__init__({}, **kwargs)

    def classify(self, body):
        return "judge", judged_response(body["messages"][-1]["content"])

    def answer(self, body, stage, question, seed, fault):
        assert body["temperature"] == 0.0 and body["model"] == "judge-x"
        return next((reply for key, reply in JUDGE_REPLIES.items() if key in question), "Z")


class CannedGenerator:
    def generate(self, samples):
        return [RESPONSES[(_benchmark_of(s.target), s.id)] for s in samples]


def _benchmark_of(target: dict) -> str:
    return "mathvista" if "answer_type" in target else "mathverse_vo" if "question_for_eval" in target else "mmstar"


@pytest.fixture
def judge(monkeypatch):
    monkeypatch.setattr(runner, "make_generator", lambda model, config: CannedGenerator())
    monkeypatch.setenv(KEY_ENV, SECRET)
    with FakeJudge(api_key=SECRET) as server:
        server.faults.append(Fault("judge", ["500"], match="Honestly", always=True))
        yield server


def judge_yaml(tmp_path, base_url, name="judge.yaml", cache_dir=None, **client) -> Path:
    client = {"max_retries": 1, "backoff_initial_s": 0.01, "backoff_max_s": 0.02, "max_failed_share": 0.5, **client}
    path = tmp_path / name
    path.write_text(json.dumps({"endpoint": {"base_url": base_url, "model": "judge-x", "api_key_env": KEY_ENV},
                                "client": client, "cache_dir": cache_dir}))  # JSON is YAML
    return path


def eval_argv(tmp_path, root, config, *extra) -> list[str]:
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_text('{"model_type": "qwen2_5_vl"}')  # (generation is stood in for)
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights")
    # (--score-only refuses the generating run's --model and --data-root: it would ignore them)
    generating = [] if "--score-only" in extra else ["--model", str(tmp_path / "model"), "--data-root", str(root)]
    return ["eval", *generating, "--out", str(tmp_path / "out"), "--benchmarks", BENCHMARKS, "--judge", str(config),
            *extra]


def predictions(tmp_path, name) -> dict[str, dict]:
    lines = (tmp_path / "out" / "predictions" / f"{name}.jsonl").read_text().splitlines()
    return {record["id"]: record for record in map(json.loads, lines)}


def test_the_judge_reads_only_what_the_rules_cannot_and_both_scores_are_reported(judge, tmp_path, eval_data_root):
    config = judge_yaml(tmp_path, judge.base_url)
    assert main(eval_argv(tmp_path, eval_data_root, config)) == 0

    # only rule failures reached the judge (the failing one twice: max_retries=1); each answered once
    assert {r["question"] for r in judge.requests()} == JUDGED
    assert [r["question"] for r in judge.requests(status="500")] == [RESPONSES[("mathverse_vo", "6")]] * 2
    assert judge.num_ok == len(JUDGED) - 1 and max(judge.ok_by_body.values()) == 1

    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    counts = {name: {k: v for k, v in s["judge"].items() if k != "error_reasons"}
              for name, s in scores["benchmarks"].items()}
    assert counts == {
        "mathvista": {"judged": 2, "extracted": 2, "correct": 2, "no_answer": 0, "errors": 0},
        "mathverse_vo": {"judged": 3, "extracted": 1, "correct": 1, "no_answer": 1, "errors": 1},
        "mmstar": {"judged": 1, "extracted": 1, "correct": 1, "no_answer": 0, "errors": 0}}
    both = {name: (s["score"], s["with_judge"]["score"]) for name, s in scores["benchmarks"].items()}
    assert both == {"mathvista": (25.0, 75.0), "mathverse_vo": (0.0, 33.33), "mmstar": (33.33, 66.67)}
    mathvista = scores["benchmarks"]["mathvista"]
    assert mathvista["extraction_failure_rate"] == 75.0 and mathvista["with_judge"]["extraction_failure_rate"] == 25.0
    assert scores["judge"]["model"] == "judge-x" and scores["judge"]["url"] == f"{judge.base_url}/chat/completions"

    # the predictions record which items were judged and the judge's raw reply
    records = predictions(tmp_path, "mathvista")
    assert records["1"]["judge"] == {"model": "judge-x", "reply": "B", "extracted": "B", "correct": True}
    assert records["2"]["judge"] == {"model": "judge-x", "reply": "12", "extracted": "12", "correct": True}
    assert "judge" not in records["3"] and "judge" not in records["4"]
    assert records["1"]["extracted"] is None and records["1"]["correct"] is False  # the rule judgement stays
    records = predictions(tmp_path, "mathverse_vo")
    assert records["4"]["judge"] == {"model": "judge-x", "reply": "null", "extracted": None, "correct": False}
    assert set(records["6"]["judge"]) == {"model", "error"} and "HTTP 500" in records["6"]["judge"]["error"]
    assert predictions(tmp_path, "mmstar")["1"]["judge"]["reply"] == " B\n"

    table = (tmp_path / "out" / "results.md").read_text()
    assert "| ours: model, rule | 25.0 |  | 0.0 |  |  | 33.3 |  |  |" in table
    assert "| ours: model, rule+judge | 75.0 |  | 33.3 |  |  | 66.7 |  |  |" in table
    header = "| benchmark | rule | rule+judge | sent to judge | judge extracted | judge also failed | judge errors |"
    assert header in table
    assert "| MathVerse-VO | 0.0 | 33.3 | 3 | 1 | 1 | 1 |" in table and "count as wrong in rule+judge" in table

    # the key went to the server only
    cache_files = [p for p in (tmp_path / "out" / "judge_cache").rglob("*.json")]
    assert len(cache_files) == len(JUDGED) - 1
    for path in [*cache_files, *(tmp_path / "out").rglob("*.json*"), tmp_path / "out" / "results.md"]:
        assert SECRET not in path.read_text()

    # rerun: the predictions are complete and every reply is cached; only the failed item is asked again
    before = (tmp_path / "out" / "scores.json").read_text()
    assert main(eval_argv(tmp_path, eval_data_root, config, "--score-only")) == 0
    assert judge.num_ok == len(JUDGED) - 1 and len(judge.requests(status="500")) == 4
    assert (tmp_path / "out" / "scores.json").read_text() == before

    # killed before the predictions were rewritten: the cache still answers everything that was answered
    judged_fields = {}
    for name in BENCHMARKS.split(","):
        path = tmp_path / "out" / "predictions" / f"{name}.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        judged_fields[name] = {r["id"]: r.pop("judge") for r in records if "judge" in r}
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(eval_argv(tmp_path, eval_data_root, config, "--score-only")) == 0
    assert judge.num_ok == len(JUDGED) - 1
    assert {name: {i: r["judge"] for i, r in predictions(tmp_path, name).items() if "judge" in r}
            for name in judged_fields} == judged_fields


def test_judge_failures_past_the_share_exit_non_zero(judge, tmp_path, eval_data_root, capsys, monkeypatch):
    strict = judge_yaml(tmp_path, judge.base_url, "strict.yaml", max_failed_share=0.2)  # mathverse_vo: 1 of 3 fail
    assert main(eval_argv(tmp_path, eval_data_root, strict)) == 1
    captured = capsys.readouterr()
    (error,) = [line for line in captured.err.splitlines() if line.startswith("avar eval: error: judge 'judge-x'")]
    assert "mathverse_vo: 1 of 3 judge requests failed (33%; more than client.max_failed_share=0.2)" in error
    assert "most common error (1 of 1): gave up after 2 attempts (last: HTTP 500)" in error
    assert "mathvista:" not in error and "mmstar:" not in error
    assert "mathverse_vo: 3 answers for the judge, 0 from its cache, 2 new, 1 failed" in captured.err
    assert "| MathVerse-VO | 0.0 | 33.3 | 3 | 1 | 1 | 1 |" in captured.out  # the report is written all the same

    # a URL where nothing listens: no share excuses it, and the first request that gives up stops the run
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"  # bound, not listening: connection refused
        # the folder's cache: the URL is part of a judge's cache keys, so it answers nothing for the dead server
        lenient = judge_yaml(tmp_path, dead, "dead.yaml", max_failed_share=1.0, max_retries=0)
        assert main(eval_argv(tmp_path, eval_data_root, lenient, "--score-only")) == 2
    err = capsys.readouterr().err
    assert (f"nothing answers at {dead}/chat/completions (URLError([Errno 111] Connection refused), 1 attempt, no "
            "request of this run answered); start the server, or fix endpoint.base_url") in err

    # a wrong key is a configuration error (exit 2), named without the key
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    assert main(eval_argv(tmp_path, eval_data_root, strict, "--score-only")) == 2
    err = capsys.readouterr().err
    assert "HTTP 401" in err and KEY_ENV in err and "sk-wrong" not in err


def test_judging_some_benchmarks_judges_only_those_and_keeps_the_others_scores(judge, tmp_path, eval_data_root,
                                                                              capsys):
    """Before: `--score-only --benchmarks mathvista --judge J` (and a generating run of mathvista with --judge) also
    sent the folder's other finished benchmarks to the judge, requests the user never asked for, and replaced their
    scores. Now only the named benchmarks are judged and re-scored; the others' entries in scores.json stay exactly
    as they were (judge results of the same judge included), and the report says which are not judged. Judge results
    of another judge are not passed off as this one's: that benchmark is reported with its rule score."""
    out = tmp_path / "out"
    config = judge_yaml(tmp_path, judge.base_url)
    argv = eval_argv(tmp_path, eval_data_root, config)
    rules_only = argv[:argv.index("--judge")]
    assert main(rules_only) == 0  # generate and score all three by the rules
    before = json.loads((out / "scores.json").read_text())
    others = {name: predictions(tmp_path, name) for name in ("mathverse_vo", "mmstar")}

    score_only = ["eval", "--out", str(out), "--score-only"]
    assert main([*score_only, "--benchmarks", "mathvista", "--judge", str(config)]) == 0
    mathvista = {RESPONSES[key] for key in RESPONSES if key[0] == "mathvista"}
    assert {r["question"] for r in judge.requests()} == JUDGED & mathvista  # none of the others' items
    scores = json.loads((out / "scores.json").read_text())
    assert {name: scores["benchmarks"][name] for name in others} == {name: before["benchmarks"][name]
                                                                     for name in others}
    assert scores["benchmarks"]["mathvista"]["with_judge"]["score"] == 75.0 and "average_with_judge" not in scores
    assert {name: predictions(tmp_path, name) for name in others} == others  # no judge field written into them
    table = (out / "results.md").read_text()
    assert "| ours: model, rule+judge | 75.0 |  |  |  |  |  |  |  |" in table
    assert "Not judged: MathVerse-VO, MMStar" in table and "| MathVista | 25.0 | 75.0 | 2 | 2 | 0 | 0 |" in table

    # a generating run of mmstar with the judge (nothing left to generate): mathvista's judged entry is kept
    judged_before = json.loads((out / "scores.json").read_text())["benchmarks"]
    assert main([*argv[:argv.index("--benchmarks")], "--benchmarks", "mmstar", "--judge", str(config)]) == 0
    assert {r["question"] for r in judge.requests()} == JUDGED & (mathvista | {RESPONSES[("mmstar", "1")]})
    scores = json.loads((out / "scores.json").read_text())["benchmarks"]
    assert scores["mathvista"] == judged_before["mathvista"] and scores["mathverse_vo"] == before["benchmarks"][
        "mathverse_vo"]
    assert scores["mmstar"]["with_judge"]["score"] == 66.67
    # re-scoring without a judge keeps the others' judged scores, and says whose they are
    assert main([*score_only, "--benchmarks", "mathverse_vo"]) == 0
    rescored = json.loads((out / "scores.json").read_text())
    assert rescored["benchmarks"]["mathvista"] == judged_before["mathvista"] and rescored["judge"]["model"] == "judge-x"

    # another judge (another URL): mathvista's and mmstar's judge-x results are not reported as its own
    capsys.readouterr()
    with FakeJudge(api_key=SECRET) as other:
        elsewhere = judge_yaml(tmp_path, other.base_url, "other.yaml")
        assert main([*score_only, "--benchmarks", "mathverse_vo", "--judge", str(elsewhere)]) == 0
        assert {r["question"] for r in other.requests()} == JUDGED & {RESPONSES[key] for key in RESPONSES
                                                                      if key[0] == "mathverse_vo"}
    scores = json.loads((out / "scores.json").read_text())["benchmarks"]
    assert scores["mathvista"] == before["benchmarks"]["mathvista"] and "with_judge" in scores["mathverse_vo"]
    assert "mathvista: its rule+judge score came from another judge ('judge-x') than this run's" in \
        capsys.readouterr().err
    # nor does the folder's cache answer for it (found in review: the URL was left out of the cache key, so a server
    # serving another model under the same name got judge-x's cached replies, while the scores named its URL)
    with FakeJudge(api_key=SECRET) as third:
        assert main([*score_only, "--benchmarks", "mathvista", "--judge",
                     str(judge_yaml(tmp_path, third.base_url, "third.yaml"))]) == 0
        assert {r["question"] for r in third.requests()} == JUDGED & mathvista


def test_judge_config_keeps_keys_out_of_the_file(tmp_path, monkeypatch):
    example = Path(__file__).resolve().parents[2] / "examples" / "eval" / "judge.yaml"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    config = load_judge_config(example)
    assert (config.endpoint.model, config.endpoint.temperature, config.endpoint.api_key_env) == (
        "gpt-4o-mini", 0.0, "OPENAI_API_KEY")
    # a section naming only where the judge is keeps the judge's defaults (not a synthesis teacher's)
    local = tmp_path / "local.yaml"
    local.write_text("endpoint:\n  base_url: http://localhost:8000/v1\n  model: Qwen/Qwen2.5-72B-Instruct\n"
                     "  api_key_env: null\n")
    endpoint = load_judge_config(local).endpoint
    assert (endpoint.temperature, endpoint.max_tokens, endpoint.api_key_env) == (0.0, 128, None)
    leaky = tmp_path / "leaky.yaml"
    leaky.write_text("endpoint:\n  api_key: sk-secret-in-a-file\n")
    with pytest.raises(ValueError, match="unknown config key.*endpoint.api_key") as error:
        load_judge_config(leaky)
    assert "sk-secret-in-a-file" not in str(error.value)
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ValueError, match="endpoint.api_key_env names the environment variable 'OPENAI_API_KEY'"):
        load_judge_config(example)


def test_every_benchmark_has_its_vlmevalkit_judge_prompt(eval_data_root):
    """Which prompt each benchmark sends (only MMMU's open questions get none) and that it holds the answer."""
    expected = {"mathvista": "Model respone: ", "mathvision": "Model respone: ",
                "mathverse_vo": "7.\nModel response: '",
                "mmmu": "single-choice question", "mmmu_pro": "single-choice question",
                "mmstar": "single-choice question", "hallusionbench": "two options of a question"}
    for name, marker in expected.items():
        benchmark = get_benchmark(name, mathvision_split="test")
        for sample in benchmark.samples(eval_data_root):
            prompt = benchmark.judge_prompt(sample.prompt_text, "my answer", sample.target)
            if name == "mmmu" and sample.target["open"]:
                assert prompt is None
                continue
            assert marker in prompt and judged_response(prompt) == "my answer", (name, sample.id)
    mathvista = next(get_benchmark("mathvista").samples(eval_data_root))
    prompt = get_benchmark("mathvista").judge_prompt(mathvista.prompt_text, "x", mathvista.target)
    assert prompt.endswith(f"\n{mathvista.prompt_text.removeprefix('<image>')}\nModel respone: xExtracted answer:")
    mmstar = next(get_benchmark("mmstar").samples(eval_data_root))
    prompt = get_benchmark("mmstar").judge_prompt(mmstar.prompt_text, "x", mmstar.target)
    assert prompt.endswith("Question: Which shape is shown??\nOptions: There are several options: \nA. circle\n"
                           "B. square\nC. triangle\nD. star\n\nAnswer: x\nYour output: ")
    vision = [s for s in get_benchmark("mmmu_pro").samples(eval_data_root) if s.id.startswith("vision/")][0]
    prompt = get_benchmark("mmmu_pro").judge_prompt(vision.prompt_text, "x", vision.target)
    assert "Question: Answer the following multiple-choice question in the image.?\nOptions:" in prompt


def test_a_judge_sampling_otherwise_is_another_judge(tmp_path):
    """Found in review: whether a benchmark's judged score is kept (another benchmark judged, this one not) compared
    only the model, URL, prompts and temperature; a judge with another max_tokens, top_p, seed or extra_body
    replies otherwise, yet its results were kept as this judge's. Every setting that decides the replies counts."""
    import dataclasses

    from megatron_avar.eval.judge import AnswerJudge, JudgeConfig, JudgeEndpoint, same_judge

    def described(**endpoint):
        config = JudgeConfig(endpoint=JudgeEndpoint(base_url="http://127.0.0.1:9/v1", api_key_env=None, **endpoint))
        return AnswerJudge(config, tmp_path).describe()

    base = described()
    assert same_judge(base, described())
    assert same_judge(base, described() | {"max_failed_share": 0.5})  # decides only whether the run fails
    for change in ({"max_tokens": 64}, {"top_p": 0.9}, {"seed": 1}, {"extra_body": {"top_k": 1}}):
        assert not same_judge(base, described(**change)), change
    assert not same_judge(base, {key: value for key, value in base.items() if key != "max_tokens"})  # older record
    assert {field.name for field in dataclasses.fields(JudgeEndpoint)} - set(base) == {"base_url", "api_key_env"}
