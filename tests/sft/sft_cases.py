"""Settings shared by the SFT tests (a module with a unique name: rank processes import it by name)."""


def sft_overrides(sft_inputs, out, **extra) -> list[str]:
    """Dotted overrides of a small, fast fp32 run on the shared inputs."""
    values = {"out": str(out), "model.hf_path": sft_inputs["hf_path"], "data.path": sft_inputs["data_path"],
              "data.seq_length": 384, "data.min_pixels": 3136, "data.max_pixels": 12544, "train.precision": "fp32",
              "train.global_batch_size": 4, "train.steps": 2, "optim.lr": 1e-3, "log.tensorboard": False,
              "checkpoint.interval": 0, **extra}
    return [f"{key}={value}" for key, value in values.items()]
