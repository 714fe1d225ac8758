"""Model definitions on megatron-core: one sub-package per model family (its config, modules, checkpoint mapping)."""
