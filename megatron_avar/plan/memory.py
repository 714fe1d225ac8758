"""Per-GPU memory of one training step of Qwen2.5-VL on megatron, from the architecture and the layout alone.

What each pipeline stage holds at its peak, the first backward pass after the last warm-up forward (1F1B):

    static      weights            P_stage · b_param                     (b_param: 2 in bf16, 4 in fp32)
                gradients          P_stage · 4                           (megatron's DDP reduces in fp32:
                                                                          grad_reduce_in_fp32, training.megatron_setup)
                optimizer states   P_stage · (4 + 8) / (dp · cp)         fp32 main params (bf16 only) + Adam's two
                                                                          moments, sharded by the distributed optimizer
    stored      decoder layers     in-flight micro-batches x layers x tokens x m_layer
                vision encoder     in-flight micro-batches holding chunk 0 of stage 0 x patches x m_vision
                AVAR masses        rows read x heads/tp x (roles + 1) x 4 per AVAR layer that feeds a loss
                head inputs        b_act·h x (tokens / t_sp + loss rows)   (last stage: the final norm's input, the
                                                                          output layer's rows, whole on every rank)
    transient   the largest of:    the logits phase (last stage), one recomputed layer or vision block (full
                                   recompute), the weight gradient of the largest weight before DDP adds it to
                                   its fp32 buffer
    peak        static + stored + transient

Tokens of a micro-batch on a rank: rows x seq_length / cp. Bytes saved for backward per token and decoder layer
(``Kernels``; h hidden, g = kv heads x head_dim, f FFN width, d head_dim, t = tp, t_sp = t with sequence
parallelism, else 1; b_act = 2 in bf16, 4 in fp32):

    m_layer = 2·b_norm·h / t_sp + b_act·((a_h·h + a_g·g) / t + n_mlp·f / t + n_rope·d)
              under context parallelism (every layer's attention gathers the row): + 2·b_act·g·s / (t·tokens) for
              the gathered keys and values
    recompute "full":       b_act·h / t_sp per layer (the layer's input), plus one layer's m_layer while it is
                            recomputed
    recompute "selective":  megatron's core-attention recompute: the attention keeps only its inputs and output
Every layer's attention is this project's (``models.role_mass_attention``: AVAR and standard layers alike), so no
layer keeps S x S scores and no dense [s, s] mask exists.

b_norm = 2·b_act per normalised element: the norm keeps its input and the linear after it the output, both in the
activation dtype — Transformer Engine's fused norm + linear, and this project's RMSNorm (``models.qwen2_5_vl.norm``:
megatron's local modules and the vision encoder everywhere), which also keeps one fp32 rsqrt per row (4 / h bytes
per element, not counted). torch's own composite RMSNorm would keep 8 + b_act.

Vision encoder per image patch (4 per merged image token; under context parallelism each rank encodes 1/cp of the
images, balanced by patches):
m_vision = depth x m_block + b_act·patch_dim + b_norm·hv / t_sp + b_act·2·hv / t (patch embedding input, final
norm, 2x2 merger), m_block = 2·b_norm·hv / t_sp + b_act·((a_v·hv + n_vmlp·fv) / t + n_rope·dv); under full
recompute m_block = b_act·hv / t_sp (each block's input), plus one block's activations while it is recomputed.
Logits (last stage, one micro-batch at a time): the output layer runs on the labelled positions only (the trainers'
``output_rows``, ``models.qwen2_5_vl.language_model``), L = micro-batch rows x loss_rows / cp x vocab / t. The LM
loss (megatron's vocab-parallel cross entropy upcasts to fp32, keeps the softmax in place) peaks at 6·L bytes in
bf16 (bf16 logits + their fp32 copy; again in backward: fp32 softmax gradient + its bf16 cast) and 4·L in fp32, and
at 2·L + the output layer's weight gradient when that is larger; GRPO's response loss (``grpo.policy``: the logits
upcast and divided by the temperature) peaks at (b_act + 8)·L.

In flight on pipeline rank r (megatron's schedules): plain 1F1B keeps min(pp - r, micro-batches) forward passes;
the interleaved schedule (v model chunks per rank) keeps its warm-up, (pp - r - 1)·2 + (v - 1)·pp chunk forwards,
plus one, the chunks taking turns in groups of pp micro-batches (megatron's schedule table).

The coefficients are counted from what the kernels save (``Kernels`` documents each); the CPU family's are checked
against the tensors autograd saves in a toy model and the peak of toy runs (tests/plan/test_plan_measured.py). The
GPU family is not measured yet: the one H200 record in tools/results predates this project's attention in standard
layers (it ran megatron's local attention there); the GPU check (tools/gpu_check.py) writes the plan's peak beside
each measured one. Context parallelism's activations are checked on CPU toy runs at CP=2 (each rank's saved
tensors). Not counted: the CUDA context, NCCL
buffers, the caching allocator's fragmentation (the verdict's reserve in ``plan.gpus``), and the data loader's
host memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_avar.models.qwen2_5_vl.config import RECOMPUTE_MODES
from megatron_avar.roles import NUM_ROLES

__all__ = ["Parallelism", "StepShape", "Kernels", "GPU_KERNELS", "CPU_KERNELS", "KERNELS",
           "StageMemory", "MemoryPlan", "stage_parameters", "memory_plan", "RECOMPUTE_MODES", "LOSS_KINDS"]

LOSS_KINDS = ("lm", "response")
_BYTES = {"bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class Parallelism:
    """The layout of a run. tp / pp / dp: tensor, pipeline, data parallel sizes. cp: context-parallel ranks (the
    sequence is split over them: activations / cp; the distributed optimizer shards over dp x cp).
    sequence_parallel: norms and residual-stream tensors split over the tensor-parallel ranks.
    virtual_pipeline: model chunks per pipeline rank (megatron's interleaved 1F1B; 1 = plain 1F1B).
    distributed_optimizer: optimizer states sharded over the data-parallel ranks (megatron's ZeRO-1)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    virtual_pipeline: int = 1
    distributed_optimizer: bool = True

    def __post_init__(self):
        for name in ("tp", "pp", "dp", "cp", "virtual_pipeline"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallelism {name} must be an int >= 1, got {value!r}")
        if self.virtual_pipeline > 1 and self.pp == 1:
            raise ValueError("virtual_pipeline > 1 needs pipeline parallelism (pp > 1)")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp


@dataclass(frozen=True)
class StepShape:
    """What one data-parallel rank computes in a step. seq_length: tokens per row; micro_batch_size: rows per
    micro-batch; num_microbatches: micro-batches per optimizer step on a rank; image_tokens: merged image tokens
    per row (each is spatial_merge_size² vision patches); mass_rows: rows per row whose AVAR masses feed a loss
    (AGTO's queries; 0: none); loss: "lm" (SFT's cross entropy) or "response" (GRPO's log-probs at temperature);
    loss_rows: labelled positions per row, the only ones the output layer and the loss run on (the trainers'
    ``output_rows``; None: every position); precision: bf16 or fp32; recompute: none | selective | full;
    avar_layers: 0-based decoder layers built as AVAR layers (role-mass core attention)."""

    seq_length: int
    micro_batch_size: int = 1
    num_microbatches: int = 1
    image_tokens: int = 0
    mass_rows: int = 0
    loss: str = "lm"
    loss_rows: int | None = None
    precision: str = "bf16"
    recompute: str = "none"
    avar_layers: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("seq_length", "micro_batch_size", "num_microbatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"step {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.image_tokens <= self.seq_length or not 0 <= self.mass_rows <= self.seq_length:
            raise ValueError(f"step image_tokens ({self.image_tokens}) and mass_rows ({self.mass_rows}) must be in "
                             f"[0, seq_length={self.seq_length}]")
        if self.loss not in LOSS_KINDS or not 0 <= self.output_rows <= self.seq_length:
            raise ValueError(f"step loss={self.loss!r} must be one of {LOSS_KINDS}, loss_rows in [0, seq_length]")
        if self.precision not in _BYTES:
            raise ValueError(f"step precision={self.precision!r}: allowed {', '.join(_BYTES)}")
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"step recompute={self.recompute!r}: allowed {', '.join(RECOMPUTE_MODES)}")

    @property
    def output_rows(self) -> int:
        """Positions per row the output layer runs on: loss_rows, or every one."""
        return self.seq_length if self.loss_rows is None else self.loss_rows

    @property
    def bytes_per_value(self) -> int:
        return _BYTES[self.precision]


@dataclass(frozen=True)
class Kernels:
    """What a kernel family saves for backward, per token and decoder layer (per patch and vision block).

    Norms are not a field: every family's keep the same (module docstring, b_norm).
    attention / selective_attention: (units of h, units of g), a layer's attention (AVAR and standard layers run
    the same one; the probe's masses are counted apart), and under selective recompute, from: the fused qkv output
    (kept whole while a kernel holds the value as a view of it), the roped q and k, k and v repeated to the query
    heads, the kernel's own output and the projection's input. mlp: units of f (SwiGLU:
    fused keeps the fc1 output and the fc2 input, 3; unfused also the activation and the linear half's offset
    copy, 5). rope: units of head_dim (cos and sin for q and k). vision_attention / vision_mlp: a vision block's
    windowed SDPA (gathered q, k, v, its output, the projection input: 5 hv) and MLP (units of fv).
    """

    name: str
    attention: tuple[int, int]
    selective_attention: tuple[int, int]
    mlp: int
    rope: int
    vision_attention: int
    vision_mlp: int


# GPU (Transformer Engine's layers where installed, megatron's local modules otherwise; assumed to keep the same
# bytes, neither measured yet): the attention (ops.causal_attention: SDPA or the Triton kernel) keeps q, k, v views
# of the fused qkv output and its output, then the masked copy the projection reads; fused SwiGLU.
GPU_KERNELS = Kernels(name="gpu", attention=(4, 3), selective_attention=(3, 3), mlp=3, rope=4, vision_attention=5,
                      vision_mlp=3)
# CPU: megatron's local modules, SDPA per packed sample with k and v repeated to the query heads, unfused SwiGLU.
CPU_KERNELS = Kernels(name="cpu", attention=(5, 1), selective_attention=(3, 3), mlp=5, rope=4, vision_attention=5,
                      vision_mlp=5)
KERNELS = {k.name: k for k in (GPU_KERNELS, CPU_KERNELS)}


def _norm_bytes(value: int) -> int:
    """Bytes a norm (and the linear after it) keeps per normalised element: its input and its output."""
    return 2 * value


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one rank of pipeline stage ``stage`` (tensor-parallel rank 0, which holds the replicated
    weights too). ``static`` / ``stored`` / ``transient``: name -> bytes; peak = static + stored + the largest
    transient (they happen at different moments)."""

    stage: int
    parameters: int
    in_flight: int
    static: dict[str, int]
    stored: dict[str, int]
    transient: dict[str, int]

    @property
    def peak(self) -> int:
        return sum(self.static.values()) + sum(self.stored.values()) + max(self.transient.values(), default=0)

    def as_dict(self) -> dict:
        return {"stage": self.stage, "parameters": self.parameters, "in_flight_forwards": self.in_flight,
                "static": dict(self.static), "stored": dict(self.stored), "transient": dict(self.transient),
                "peak": self.peak}


@dataclass(frozen=True)
class MemoryPlan:
    """Every pipeline stage's memory; ``worst`` is the stage with the highest peak."""

    stages: tuple[StageMemory, ...]
    kernels: str
    extra_static: dict[str, int] = field(default_factory=dict)

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.peak)

    @property
    def peak(self) -> int:
        return self.worst.peak + sum(self.extra_static.values())

    def as_dict(self) -> dict:
        return {"kernels": self.kernels, "peak_bytes": self.peak, "worst_stage": self.worst.stage,
                "extra_static": dict(self.extra_static), "stages": [s.as_dict() for s in self.stages]}


# -- parameters --------------------------------------------------------------------------------------------------

def _layer_parameters(text, tp: int) -> tuple[int, int]:
    """(elements of one decoder layer on a tensor-parallel rank, its largest weight's elements)."""
    h, g, f = text.hidden_size, text.num_query_groups * text.head_dim, text.ffn_hidden_size
    qkv = h * (h + 2 * g) + (h + 2 * g)           # column-parallel, with bias
    weights = (qkv + h * h + h * 2 * f + f * h) // tp
    return weights + 2 * h, h * 2 * f // tp          # + two replicated RMSNorm weights; fc1 is the largest


def _vision_parameters(vision, tp: int) -> int:
    hv, fv, merged = vision.hidden_size, vision.intermediate_size, vision.hidden_size * vision.spatial_merge_size ** 2
    split = 3 * hv * hv + 3 * hv + hv * hv + 2 * fv * hv + 2 * fv + fv * hv  # qkv (+bias), proj, fc1 (+bias), fc2
    replicated = hv + hv + 2 * hv                                              # proj and fc2 biases, two norms
    block = split // tp + replicated
    merger = (merged * merged + merged + merged * vision.out_hidden_size) // tp + vision.out_hidden_size
    return vision.depth * block + vision.patch_dim * hv + hv + merger         # + patch embedding, final norm


def _stage_chunks(num_layers: int, parallel: Parallelism, stage: int) -> list[range]:
    """Global decoder-layer indexes of each model chunk of pipeline rank ``stage`` (megatron's even split)."""
    chunks = parallel.pp * parallel.virtual_pipeline
    if num_layers % chunks:
        raise ValueError(f"{num_layers} decoder layers do not split over pipeline_model_parallel_size x virtual "
                         f"stages = {chunks}")
    per_chunk = num_layers // chunks
    return [range((c * parallel.pp + stage) * per_chunk, (c * parallel.pp + stage + 1) * per_chunk)
            for c in range(parallel.virtual_pipeline)]


def stage_parameters(config, parallel: Parallelism, stage: int) -> tuple[int, int]:
    """(parameters of pipeline rank ``stage`` on tensor-parallel rank 0, its largest weight) of Qwen2.5-VL
    ``config`` (``Qwen25VLConfig``): decoder layers, the embedding and the vision encoder on the first stage, the
    final norm and the output layer on the last (also the embedding's copy there when tied and pp > 1)."""
    text, tp = config.text, parallel.tp
    layer, largest = _layer_parameters(text, tp)
    layers = sum(len(chunk) for chunk in _stage_chunks(text.num_layers, parallel, stage))
    total = layers * layer
    embedding = text.vocab_size // tp * text.hidden_size
    if stage == 0:
        total += embedding + _vision_parameters(config.vision, tp)
        largest = max(largest, embedding)
    if stage == parallel.pp - 1:
        total += text.hidden_size                                     # final norm
        if not text.tie_word_embeddings or parallel.pp > 1:
            total += embedding                                        # output layer (or the tied copy)
        largest = max(largest, embedding)
    return total, largest


# -- activations -------------------------------------------------------------------------------------------------

def _tokens(shape: StepShape, parallel: Parallelism) -> int:
    return shape.micro_batch_size * math.ceil(shape.seq_length / parallel.cp)


def _output_rows(shape: StepShape, parallel: Parallelism) -> int:
    """Positions of a micro-batch the output layer runs on, on a rank (whole on every TP rank: the trainers'
    ``output_rows``)."""
    return shape.micro_batch_size * math.ceil(shape.output_rows / parallel.cp)


def _layer_bytes(text, shape: StepShape, parallel: Parallelism, kernels: Kernels, *, recompute: str) -> float:
    """Bytes one decoder layer keeps for one micro-batch under ``recompute``."""
    h, g, f, d = text.hidden_size, text.num_query_groups * text.head_dim, text.ffn_hidden_size, text.head_dim
    tokens, value = _tokens(shape, parallel), shape.bytes_per_value
    sp = parallel.tp if parallel.sequence_parallel else 1
    if recompute == "full":
        return tokens * h / sp * value
    attention = kernels.selective_attention if recompute == "selective" else kernels.attention
    per_token = (2 * _norm_bytes(value) * h / sp
                 + value * ((attention[0] * h + attention[1] * g) / parallel.tp + kernels.mlp * f / parallel.tp
                            + kernels.rope * d))
    stored = tokens * per_token
    if parallel.cp > 1:
        # every layer's attention is models.context_parallel's: it keeps the whole row's gathered keys and values
        # (selective recompute gathers them again in backward)
        if recompute == "none":
            stored += 2 * shape.micro_batch_size * shape.seq_length * g / parallel.tp * value
    return stored


def _vision_patches(vision, shape: StepShape, parallel: Parallelism) -> float:
    """Image patches a rank encodes per micro-batch: the rows' images, shared by the context-parallel ranks."""
    return shape.micro_batch_size * shape.image_tokens * vision.spatial_merge_size ** 2 / parallel.cp


def _vision_block_bytes(vision, parallel: Parallelism, kernels: Kernels, value: int) -> float:
    """Bytes one vision block keeps per patch without recompute (norm inputs split over TP under SP)."""
    hv, fv, tp = vision.hidden_size, vision.intermediate_size, parallel.tp
    sp = tp if parallel.sequence_parallel else 1
    return (2 * _norm_bytes(value) * hv / sp
            + value * ((kernels.vision_attention * hv + kernels.vision_mlp * fv) / tp + kernels.rope * vision.head_dim))


def _vision_bytes(vision, shape: StepShape, parallel: Parallelism, kernels: Kernels) -> float:
    """Bytes the vision encoder keeps for one micro-batch (the images of its rows); under full recompute each
    block keeps only its input."""
    hv, tp, value = vision.hidden_size, parallel.tp, shape.bytes_per_value
    sp = tp if parallel.sequence_parallel else 1
    block = (value * hv / sp if shape.recompute == "full"
             else _vision_block_bytes(vision, parallel, kernels, value))
    outside = value * vision.patch_dim + _norm_bytes(value) * hv / sp + value * 2 * hv / tp
    return _vision_patches(vision, shape, parallel) * (vision.depth * block + outside)


def _logits_bytes(text, shape: StepShape, parallel: Parallelism, output_weight: int) -> float:
    """The logits phase of one micro-batch on the last stage (the logits of its labelled rows only), including the
    output layer's weight gradient."""
    value = shape.bytes_per_value
    logits = _output_rows(shape, parallel) * text.vocab_size / parallel.tp
    weight_grad = output_weight * value
    if shape.loss == "response":  # an fp32 copy of the logits and its division by the temperature
        return max((value + 8) * logits, value * logits + weight_grad)
    if value == 2:
        return max(6 * logits, 2 * logits + weight_grad)
    return 4 * logits + weight_grad


def _in_flight(parallel: Parallelism, num_microbatches: int, stage: int) -> list[int]:
    """Model chunk of each forward pass pipeline rank ``stage`` holds at its first backward pass: megatron's
    warm-up forwards plus the first steady-state one, in the order of its schedule table (chunks take turns in
    groups of pp micro-batches; the last group takes what is left)."""
    pp, v = parallel.pp, parallel.virtual_pipeline
    if v == 1:
        return [0] * min(pp - stage, num_microbatches)
    table = []
    for start in range(0, num_microbatches, pp):
        group = num_microbatches - start if start + pp >= num_microbatches else pp
        table += [chunk for chunk in range(v) for _ in range(group)]
    return table[:min((pp - stage - 1) * 2 + (v - 1) * pp + 1, num_microbatches * v)]


def memory_plan(config, parallel: Parallelism, shape: StepShape, *, kernels: Kernels = GPU_KERNELS,
                extra_static: dict[str, int] | None = None) -> MemoryPlan:
    """The memory of every pipeline stage of a training step (module docstring). config: ``Qwen25VLConfig``.
    extra_static: further bytes every rank holds throughout (a reference model, a sleeping rollout engine)."""
    text, vision = config.text, config.vision
    for name, value in (("vocab_size", text.vocab_size), ("num_query_groups", text.num_query_groups),
                        ("ffn_hidden_size", text.ffn_hidden_size), ("vision num_heads", vision.num_heads)):
        if value % parallel.tp:
            raise ValueError(f"{name}={value} does not split over tensor_model_parallel_size={parallel.tp}")
    avar = frozenset(shape.avar_layers)
    value = shape.bytes_per_value
    optimizer_bytes = 8 + (4 if shape.precision == "bf16" else 0)
    shards = parallel.dp * parallel.cp if parallel.distributed_optimizer else 1
    stages = []
    for stage in range(parallel.pp):
        params, largest = stage_parameters(config, parallel, stage)
        chunks = _stage_chunks(text.num_layers, parallel, stage)
        flights = _in_flight(parallel, shape.num_microbatches, stage)
        first, last = stage == 0, stage == parallel.pp - 1
        decoder = vision_bytes = masses = 0.0
        for chunk_index in flights:
            layers = chunks[chunk_index]
            decoder += len(layers) * _layer_bytes(text, shape, parallel, kernels, recompute=shape.recompute)
            if first and chunk_index == 0:
                vision_bytes += _vision_bytes(vision, shape, parallel, kernels)
            if shape.recompute != "full":
                masses += (sum(i in avar for i in layers) * shape.micro_batch_size * shape.mass_rows
                           * text.num_attention_heads / parallel.tp * (NUM_ROLES + 1) * 4)
        stored = {"decoder_activations": decoder, "vision_activations": vision_bytes, "avar_masses": masses}
        transient: dict[str, float] = {"weight_gradient": largest * value}
        if last:
            sp = parallel.tp if parallel.sequence_parallel else 1
            stored["head_inputs"] = value * text.hidden_size * (_tokens(shape, parallel) / sp
                                                                  + _output_rows(shape, parallel))
            transient["logits"] = _logits_bytes(text, shape, parallel, text.vocab_size // parallel.tp
                                                * text.hidden_size)
        if shape.recompute == "full":
            transient["recomputed_layer"] = _layer_bytes(text, shape, parallel, kernels, recompute="none")
            if first and shape.image_tokens:
                transient["recomputed_vision_block"] = (_vision_patches(vision, shape, parallel)
                                                        * _vision_block_bytes(vision, parallel, kernels, value))
        static = {"weights": params * value, "gradients": params * 4,
                  "optimizer_states": params * optimizer_bytes / shards}
        stages.append(StageMemory(stage=stage, parameters=params, in_flight=len(flights),
                                  static={k: int(v) for k, v in static.items()},
                                  stored={k: int(v) for k, v in stored.items()},
                                  transient={k: int(v) for k, v in transient.items()}))
    return MemoryPlan(stages=tuple(stages), kernels=kernels.name, extra_static=dict(extra_static or {}))
