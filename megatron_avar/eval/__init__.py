"""Evaluation on the seven AVAR benchmarks (AVAR_SPEC.md §7, EVAL_BENCHMARKS.md): `avar eval`.

benchmarks/  one adapter per benchmark: reading its split, prompt, answer extraction, scoring
answers.py   shared extraction rules (`<think>/<answer>`, VLMEvalKit's can_infer, numbers, math-verify)
data.py      reading a split with `datasets` from a local copy (or the hub)
generation.py HF generate backend (CPU/GPU); vllm_backend.py the vLLM backend (GPU only)
runner.py    the resumable loop and scoring; report.py scores.json and the results table
"""
