"""AVAR data synthesis (docs/method.md, 'Reflection data synthesis (VARD)'): reflection data from teacher models.

`avar synth --config examples/synth/<name>.yaml` runs a NeMo Curator pipeline

    read sources -> describe (VLM teacher) -> reason (LLM teacher) -> anchor (LLM) -> verify -> write

config.py (typed config), prompts/ (versioned prompt files), client.py (OpenAI-compatible client, retries,
request cache), records.py (sources -> working rows), teachers.py (stage logic), verify.py (answers and
format), writer.py (shards, counts), stages.py (Curator stages), output_dir.py (resume/overwrite rules),
pipeline.py (run, Ray, manifest), progress.py (progress lines), cli.py. NeMo Curator is imported only by
stages.py / pipeline.py.
"""
