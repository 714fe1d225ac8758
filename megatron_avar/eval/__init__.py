"""Evaluation on the seven AVAR benchmarks (docs/evaluation.md): `avar eval`.

benchmarks/  one adapter per benchmark: reading its split, prompt, answer extraction, scoring
answers.py   the benchmarks' shared rules (VLMEvalKit's can_infer, cue answers, last numbers), over the text
             of the harness policy (`megatron_avar.grading.EVAL_HARNESS`; grading has boxes, numbers, math-verify)
data.py      reading a split with `datasets` from a local copy (or the hub)
generation.py HF generate backend (CPU/GPU); vllm_backend.py the vLLM backend (GPU only)
runner.py    the resumable loop and scoring; report.py scores.json and the results table
judge.py     --judge: a chat model reads what the rules could not (VLMEvalKit's judge); judge_prompts.py its prompts
"""
