"""Checkpoint conversion between Hugging Face Qwen2.5-VL (safetensors) and megatron distributed checkpoints.

    avar convert hf-to-mcore --hf-path HF_DIR --out MCORE_DIR --tp 2 --pp 2
    avar convert mcore-to-hf --mcore-path MCORE_DIR --out HF_DIR
    avar convert verify --hf-path HF_DIR --mcore-path MCORE_DIR

A megatron checkpoint written here is megatron-core's ``torch_dist`` format of the model's
``sharded_state_dict`` (it loads at any TP/PP), plus ``hf/`` (the HF config, tokenizer, processor and chat
template files, so the way back is self-contained) and ``avar_checkpoint.json`` (what wrote it). The way back
writes the tensor names of the published Qwen2.5-VL checkpoints (``model.layers.*``, ``visual.*``; what
``save_pretrained`` writes) unless ``--hf-layout transformers5``; the way in reads either.
Modules: :mod:`.hf_files` (writing safetensors shards, side files, atomic output folders; reading them is
``models.hf_weights``), :mod:`.checkpoint` (the per-rank conversion work and its launcher), :mod:`.cli` (the
subcommands).
"""
