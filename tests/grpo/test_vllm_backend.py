"""VLLMGenerationBackend.

CPU (no vLLM): the pure pieces against components we did not write — the image rebuilt from pixel_values is
re-processed by the real Qwen2-VL image processor into bit-identical pixel values and grid; collapsing image
pads inverts the renderer's expansion under vLLM's replacement rule (each pad -> prod(grid)/4 pads); engine
and sampling arguments carry the conventions the backend promises (and, where vLLM is importable, are real
vLLM field names); rollouts are assembled with the local backend's layout.

GPU (vLLM installed, CUDA): generator log-probs against a teacher-forced Hugging Face forward of the same
tokens (error within twice HF's own bf16 error plus a floor); a refit of perturbed weights (made while the
engine sleeps, images seen before the refit) changes the log-probs and matches HF with those weights; vision
tokens are never generated even by a model that puts almost all its probability on them.
"""

import dataclasses
import importlib.util
import shutil
from collections import namedtuple

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_avar import vllm_inputs as vi
from megatron_avar.grpo import vllm_backend as vb
from megatron_avar.grpo import vllm_requests as vr
from megatron_avar.grpo.interfaces import PromptBatch, SamplingParams
from megatron_avar.grpo.local_backend import SUPPRESSED_TOKENS, sample_seed
from megatron_avar.processor import load_processor
from megatron_avar.roles import TokenRole, render_conversation

IM_END, IMAGE_PAD = 151645, 151655
HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def processor():
    return load_processor(None, min_pixels=56 * 56, max_pixels=112 * 112 * 4, reasoning_tokens=True)


def _image_kwargs(image_processor):
    return dict(image_mean=image_processor.image_mean, image_std=image_processor.image_std,
                rescale_factor=image_processor.rescale_factor, patch_size=image_processor.patch_size,
                temporal_patch_size=image_processor.temporal_patch_size, merge_size=image_processor.merge_size)


def _random_image(height, width, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# ---------------------------------------------------------------- CPU: pure helpers
def test_images_rebuilt_from_pixel_values_reprocess_to_the_same_pixels(processor):
    image_processor = processor.image_processor
    images = [_random_image(100, 70, 0), _random_image(56, 84, 1), _random_image(230, 150, 2)]
    out = image_processor(images=images, return_tensors="pt")
    rebuilt = vi.images_from_pixel_values(out["pixel_values"], out["image_grid_thw"], **_image_kwargs(image_processor))
    assert [r.shape for r in rebuilt] == [(14 * int(h), 14 * int(w), 3) for _, h, w in out["image_grid_thw"]]
    again = image_processor(images=[Image.fromarray(r) for r in rebuilt], return_tensors="pt")
    assert torch.equal(again["image_grid_thw"], out["image_grid_thw"])  # the size is a fixed point of the resize
    assert torch.equal(again["pixel_values"], out["pixel_values"])  # bit-identical features
    assert np.array_equal(rebuilt[1], np.asarray(images[1]))  # an image already at a 28-multiple size is itself
    with pytest.raises(ValueError, match="grey levels"):  # bf16 pixel values cannot be inverted exactly
        vi.images_from_pixel_values(out["pixel_values"].bfloat16().float(), out["image_grid_thw"],
                                    **_image_kwargs(image_processor))
    with pytest.raises(ValueError, match="patches"):
        vi.images_from_pixel_values(out["pixel_values"][:-4], out["image_grid_thw"], **_image_kwargs(image_processor))


def _expand_like_vllm(ids, grid_thw, merge_size):
    """vLLM's Qwen2-VL prompt update (PromptReplacement of one image pad by prod(grid)/merge² pads, image k
    replacing the k-th pad), written from its description in vllm/model_executor/models/qwen2_vl.py."""
    out, image = [], 0
    for token in ids:
        if token == IMAGE_PAD:
            out += [IMAGE_PAD] * (int(torch.prod(grid_thw[image])) // merge_size ** 2)
            image += 1
        else:
            out.append(token)
    return out


def test_collapsed_image_pads_expand_back_to_the_trainers_ids(processor):
    messages = [{"role": "user", "content": [{"type": "image", "image": _random_image(100, 70, 3)},
                                             {"type": "text", "text": "Compare"},
                                             {"type": "image", "image": _random_image(60, 200, 4)}]}]
    rendered = render_conversation(messages, processor, add_generation_prompt=True)
    merge = processor.image_processor.merge_size
    collapsed = vi.collapse_image_pads(rendered.input_ids.tolist(), IMAGE_PAD, rendered.image_grid_thw, merge)
    assert collapsed.count(IMAGE_PAD) == 2
    assert _expand_like_vllm(collapsed, rendered.image_grid_thw, merge) == rendered.input_ids.tolist()
    text_only = render_conversation([{"role": "user", "content": "hi"}], processor, add_generation_prompt=True)
    assert vi.collapse_image_pads(text_only.input_ids.tolist(), IMAGE_PAD, None, merge) == text_only.input_ids.tolist()
    with pytest.raises(ValueError, match="do not match image_grid_thw"):
        vi.collapse_image_pads(rendered.input_ids.tolist(), IMAGE_PAD, rendered.image_grid_thw[:1], merge)


def _suppressed_ids(processor):
    return sorted(processor.tokenizer.convert_tokens_to_ids(t) for t in SUPPRESSED_TOKENS)


def test_sampling_request_kwargs(processor):
    suppressed = _suppressed_ids(processor)
    assert suppressed == [151652, 151653, 151654, 151655, 151656]  # the real Qwen2.5-VL vision token ids
    kwargs = vr.sampling_request_kwargs(SamplingParams(temperature=0.7, max_new_tokens=33, seed=5),
                                        seed=sample_seed(5, "p0", 1), stop_token_ids=[IM_END, 151643],
                                        suppressed_token_ids=suppressed)
    assert kwargs["seed"] == sample_seed(5, "p0", 1) != sample_seed(5, "p0", 0)
    assert (kwargs["n"], kwargs["temperature"], kwargs["max_tokens"], kwargs["logprobs"]) == (1, 0.7, 33, 0)
    assert (kwargs["top_p"], kwargs["top_k"], kwargs["repetition_penalty"]) == (1.0, 0, 1.0)
    assert kwargs["logit_bias"] == {i: float("-inf") for i in suppressed}
    assert kwargs["stop_token_ids"] == [151643, IM_END] and kwargs["skip_special_tokens"] is False
    for bad, match in ((dict(top_p=0.9), "top_p=1 and sampling.top_k=0"),
                       (dict(top_k=20), "top_p=1 and sampling.top_k=0"), (dict(temperature=2.5), "temperature")):
        with pytest.raises(ValueError, match=match):
            vr.sampling_request_kwargs(SamplingParams(**bad), seed=0, stop_token_ids=[IM_END],
                                       suppressed_token_ids=suppressed)


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed (GPU extra)")
def test_kwargs_are_real_vllm_fields(processor):
    from vllm import EngineArgs
    from vllm import SamplingParams as VllmSamplingParams

    params = VllmSamplingParams(**vr.sampling_request_kwargs(SamplingParams(), seed=1, stop_token_ids=[IM_END],
                                                             suppressed_token_ids=_suppressed_ids(processor)))
    assert params.logprobs == 0 and params.seed == 1
    engine = vr.engine_kwargs(tensor_parallel_size=1, gpu_memory_utilization=0.5, max_model_len=4096, seed=0,
                              enable_sleep_mode=True, dtype="bfloat16", min_pixels=3136, max_pixels=12845056,
                              world_size=1, distributed_initialized=False)
    assert set(engine) <= {f.name for f in dataclasses.fields(EngineArgs)}


def test_engine_kwargs_choose_the_executor():
    common = dict(gpu_memory_utilization=0.5, max_model_len=4096, seed=0, enable_sleep_mode=True, dtype="bfloat16",
                  min_pixels=3136, max_pixels=50176)
    single = vr.engine_kwargs(tensor_parallel_size=1, world_size=1, distributed_initialized=False, **common)
    assert single["distributed_executor_backend"] == "uni" and single["logprobs_mode"] == vr.LOGPROBS_MODE
    assert single["mm_processor_kwargs"] == {"min_pixels": 3136, "max_pixels": 50176}
    colocated = vr.engine_kwargs(tensor_parallel_size=2, world_size=8, distributed_initialized=True, **common)
    assert colocated["distributed_executor_backend"] == "external_launcher"
    for args, match in (
        (dict(tensor_parallel_size=3, world_size=8, distributed_initialized=True), "must divide the world size"),
        (dict(tensor_parallel_size=2, world_size=8, distributed_initialized=False), "init_process_group"),
        (dict(tensor_parallel_size=2, world_size=1, distributed_initialized=False), "torchrun"),
    ):
        with pytest.raises(ValueError, match=match):
            vr.engine_kwargs(**args, **common)
    with pytest.raises(ValueError, match="dtype"):
        vr.engine_kwargs(tensor_parallel_size=1, world_size=1, distributed_initialized=False,
                         **{**common, "dtype": "auto"})


def _prompt_batch(processor):
    image = [{"role": "user", "content": [{"type": "image", "image": _random_image(84, 112, 5)},
                                          {"type": "text", "text": "How many squares?"}]}]
    text = [{"role": "user", "content": "What is two plus two?"}]
    rendered = [render_conversation(m, processor, add_generation_prompt=True) for m in (image, text)]
    return PromptBatch(["img", "txt"], [r.input_ids for r in rendered], [r.roles for r in rendered],
                       [r.pixel_values for r in rendered], [r.image_grid_thw for r in rendered], ["3", "4"])


def test_assemble_rollout_layout(processor):
    prompts, tokenizer = _prompt_batch(processor), processor.tokenizer
    suppressed = {tokenizer.convert_tokens_to_ids(t): t for t in SUPPRESSED_TOKENS}
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    body = tokenizer.encode("<think>count</think><answer>3</answer>", add_special_tokens=False)
    rollout = vr.assemble_rollout(prompts, 0, 1, body + [IM_END], torch.zeros(len(body) + 1), "stop",
                                  stop_token_ids=[IM_END], suppressed=suppressed, decode=decode)
    length = prompts.input_ids[0].numel()
    assert rollout.prompt_length == length and rollout.sample_index == 1 and rollout.ground_truth == "3"
    assert rollout.input_ids.tolist() == prompts.input_ids[0].tolist() + body + [IM_END]
    assert rollout.roles[:length].tolist() == prompts.roles[0].tolist()
    assert (rollout.roles[length:] == TokenRole.RESPONSE).all()
    assert rollout.response_text == "<think>count</think><answer>3</answer>"  # tags kept, <|im_end|> dropped
    assert rollout.pixel_values is prompts.pixel_values[0] and rollout.generator_logprobs.dtype == torch.float32
    cut = vr.assemble_rollout(prompts, 1, 0, body, torch.zeros(len(body)), "length", stop_token_ids=[IM_END],
                              suppressed=suppressed, decode=decode)
    assert cut.response_text == decode(body) and cut.finish_reason == "length" and cut.pixel_values is None
    with pytest.raises(ValueError, match="image_pad"):
        vr.assemble_rollout(prompts, 1, 0, body + [IMAGE_PAD], torch.zeros(len(body) + 1), "length",
                            stop_token_ids=[IM_END], suppressed=suppressed, decode=decode)
    with pytest.raises(RuntimeError, match="abort"):
        vr.assemble_rollout(prompts, 1, 0, body, torch.zeros(len(body)), "abort", stop_token_ids=[IM_END],
                            suppressed=suppressed, decode=decode)


def test_sampled_token_logprobs():
    logprob = namedtuple("Logprob", "logprob rank decoded_token")  # the fields of vllm.logprobs.Logprob
    positions = [{7: logprob(-0.5, 3, None)}, {9: logprob(-2.0, 1, None), 4: logprob(-0.1, 1, None)}]
    assert vr.sampled_token_logprobs([7, 9], positions).tolist() == [-0.5, -2.0]
    with pytest.raises(RuntimeError, match="do not include the sampled token"):
        vr.sampled_token_logprobs([7, 5], positions)
    with pytest.raises(RuntimeError, match="log-prob positions"):
        vr.sampled_token_logprobs([7], positions)


def test_checked_hf_names_canonicalise_and_count():
    stats = vr.RefitStats()
    tensors = [("model.layers.0.mlp.up_proj.weight", torch.zeros(4, 3, dtype=torch.bfloat16)),
               ("visual.blocks.0.attn.qkv.weight", torch.zeros(6, 2)), ("lm_head.weight", torch.zeros(5))]
    names = [name for name, _ in vr.checked_hf_names(tensors, stats)]
    assert names == ["model.language_model.layers.0.mlp.up_proj.weight", "model.visual.blocks.0.attn.qkv.weight",
                     "lm_head.weight"]
    assert (stats.num_tensors, stats.num_bytes) == (3, 12 * 2 + 12 * 4 + 5 * 4)
    with pytest.raises(ValueError, match="not a Hugging Face"):
        list(vr.checked_hf_names([("language_model.decoder.layers.0.mlp.linear_fc1.weight", torch.zeros(1))],
                                 vr.RefitStats()))


def test_backend_refuses_clearly_without_cuda_or_vllm(processor):
    from megatron_avar import platform

    if platform.vllm_available():
        pytest.skip("CUDA and vLLM are available here")
    with pytest.raises(RuntimeError, match="needs CUDA and vLLM.*LocalGenerationBackend"):
        vb.VLLMGenerationBackend("/nonexistent", processor, tensor_parallel_size=1, max_model_len=1024)


# ---------------------------------------------------------------- GPU: vLLM against Hugging Face
@pytest.fixture(scope="module")
def gpu(tmp_path_factory):
    pytest.importorskip("vllm")
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_avar.data.conversations import load_conversations, to_chat_messages
    from megatron_avar.data.procedural import ProceduralConfig, write_dataset
    from megatron_avar.models.qwen2_5_vl.toy import ToyModelConfig, write_toy_checkpoint

    root = tmp_path_factory.mktemp("vllm_backend")
    # head dim 64 (LM and vision) so that vLLM's attention kernels accept the toy model
    toy = ToyModelConfig(num_layers=2, hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2,
                         vision_depth=2, vision_hidden_size=128)
    checkpoint = write_toy_checkpoint(root / "toy", toy)
    processor = load_processor(checkpoint)
    rows = list(load_conversations(write_dataset(ProceduralConfig(num_samples=4, image_size=(112, 84)), root / "data")))
    conversations = [(row["id"], [m for m in to_chat_messages(row) if m["role"] != "assistant"], row["answer"])
                     for row in rows[:2]] + [("text-only", [{"role": "user", "content": "What is two plus two?"}], "4")]
    rendered = [(pid, render_conversation(m, processor, add_generation_prompt=True), a) for pid, m, a in conversations]
    prompts = PromptBatch([p for p, _, _ in rendered], [r.input_ids for _, r, _ in rendered],
                          [r.roles for _, r, _ in rendered], [r.pixel_values for _, r, _ in rendered],
                          [r.image_grid_thw for _, r, _ in rendered], [a for _, _, a in rendered])
    backend = vb.VLLMGenerationBackend(str(checkpoint), processor, tensor_parallel_size=1, gpu_memory_utilization=0.3,
                                       max_model_len=2048, seed=0)

    def hf_model(state, dtype):
        directory = root / f"hf-{len(list(root.iterdir()))}"
        shutil.copytree(checkpoint, directory)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors",
                  metadata={"format": "pt"})
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(directory, dtype=dtype).cuda().eval()

    yield dict(backend=backend, prompts=prompts, processor=processor, hf_model=hf_model,
               state=load_file(checkpoint / "model.safetensors"), suppressed=sorted(backend.suppressed))
    backend.close()


@torch.no_grad()
def _teacher_forced(model, rollouts, temperature, suppressed=None):
    """Per rollout, log_softmax(logits / T) of its response tokens from one HF forward of the whole sequence
    (suppressed token logits set to -inf first when given: vLLM's processed-logprobs convention)."""
    out = []
    for r in rollouts:
        ids = r.input_ids[None].cuda()
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == IMAGE_PAD).long())
        if r.pixel_values is not None:
            inputs.update(pixel_values=r.pixel_values.cuda().to(model.dtype), image_grid_thw=r.image_grid_thw.cuda())
        logits = model(**inputs).logits[0, r.prompt_length - 1:-1].float() / temperature
        if suppressed is not None:
            logits[:, suppressed] = float("-inf")
        out.append(torch.log_softmax(logits, -1).gather(1, r.input_ids[r.prompt_length:, None].cuda())[:, 0].cpu())
    return out


def _max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _check_against_hf(g, rollouts, state, temperature, label):
    """vLLM's error against HF fp32 must be within twice HF bf16's own error + 0.05 (bf16 kernels differ)."""
    reference = _teacher_forced(g["hf_model"](state, torch.float32), rollouts, temperature, g["suppressed"])
    bf16 = _teacher_forced(g["hf_model"](state, torch.bfloat16), rollouts, temperature, g["suppressed"])
    generator = [r.generator_logprobs for r in rollouts]
    error, bf16_error = _max_diff(generator, reference), _max_diff(bf16, reference)
    print(f"{label}: max |vLLM - HF fp32| = {error:.4f}, max |HF bf16 - HF fp32| = {bf16_error:.4f}")
    assert error <= 2 * bf16_error + 0.05
    return reference


@pytest.mark.gpu
def test_generator_logprobs_match_a_teacher_forced_hf_forward(gpu):
    backend, prompts = gpu["backend"], gpu["prompts"]
    backend.update_weights(gpu["state"].items())  # the checkpoint's own weights (legacy HF names)
    assert backend.last_refit.num_params_loaded > 0 and backend.last_refit.num_tensors == len(gpu["state"])
    sampling = SamplingParams(temperature=0.8, max_new_tokens=24, seed=3)
    rollouts = backend.generate(prompts, 2, sampling)
    assert [(r.prompt_id, r.sample_index) for r in rollouts] == [(p, k) for p in prompts.prompt_ids for k in range(2)]
    for r, p in zip(rollouts, [0, 0, 1, 1, 2, 2]):
        assert r.input_ids[:r.prompt_length].tolist() == prompts.input_ids[p].tolist()
        if r.finish_reason == "stop":
            assert int(r.input_ids[-1]) in backend.stop_ids
        else:
            assert r.finish_reason == "length" and r.response_length == 24
    reference = _check_against_hf(gpu, rollouts, gpu["state"], 0.8, "original weights")
    full_vocab = _teacher_forced(gpu["hf_model"](gpu["state"], torch.float32), rollouts, 0.8)
    print(f"full-vocabulary reference differs from the suppressed one by {_max_diff(full_vocab, reference):.2e}")
    backend.update_weights(gpu["state"].items())  # same weights, caches reset: the same computation again
    again = backend.generate(prompts, 2, sampling)
    assert [r.input_ids.tolist() for r in again] == [r.input_ids.tolist() for r in rollouts]  # per-request seeds
    other = backend.generate(prompts, 2, dataclasses.replace(sampling, seed=4))
    assert [r.input_ids.tolist() for r in other] != [r.input_ids.tolist() for r in rollouts]


@pytest.mark.gpu
def test_refit_while_asleep_changes_logprobs_and_matches_hf(gpu):
    backend, prompts = gpu["backend"], gpu["prompts"]
    backend.update_weights(gpu["state"].items())
    sampling = SamplingParams(temperature=1.0, max_new_tokens=16, seed=11)
    backend.generate(prompts, 2, sampling)  # fills the prefix and encoder caches with the old weights
    generator = torch.Generator().manual_seed(0)
    perturbed = {k: v * (1 + 0.2 * torch.randn(v.shape, generator=generator)) for k, v in gpu["state"].items()}
    free_before = torch.cuda.mem_get_info()[0]
    backend.sleep()
    assert torch.cuda.mem_get_info()[0] - free_before > 2**30  # weights and KV cache released
    with pytest.raises(RuntimeError, match="asleep"):
        backend.generate(prompts, 1, sampling)
    backend.update_weights((k, v.cuda()) for k, v in perturbed.items())  # trainer-side GPU tensors, colocated
    stats = backend.last_refit
    assert stats.num_tensors == len(perturbed) and stats.num_bytes == sum(v.numel() * 4 for v in perturbed.values())
    print(f"refit: {stats.num_tensors} tensors, {stats.num_bytes / 1e6:.1f} MB in {stats.seconds * 1e3:.1f} ms")
    backend.wake_up()
    rollouts = backend.generate(prompts, 2, sampling)
    _check_against_hf(gpu, rollouts, perturbed, 1.0, "perturbed weights")
    old = _teacher_forced(gpu["hf_model"](gpu["state"], torch.float32), rollouts, 1.0, gpu["suppressed"])
    assert _max_diff([r.generator_logprobs for r in rollouts], old) > 0.5  # the refit really changed the model


@pytest.mark.gpu
def test_vision_tokens_are_never_generated(gpu):
    backend, prompts = gpu["backend"], gpu["prompts"]
    state = dict(gpu["state"])
    # Final norm keeps one hidden coordinate; two vision tokens get +-B there, every other token ~0: whatever
    # the sign of that coordinate, a vision token takes almost all the probability (checked with HF below).
    norm = next(k for k in state if k.endswith("norm.weight") and "layers" not in k and "visual" not in k)
    embed = next(k for k in state if k.endswith("embed_tokens.weight"))
    state[norm] = torch.zeros_like(state[norm])
    state[norm][0] = 1.0
    state[embed] = state[embed].clone()
    vision_pad, video_pad = gpu["processor"].tokenizer.convert_tokens_to_ids(["<|vision_pad|>", "<|video_pad|>"])
    state[embed][vision_pad, 0], state[embed][video_pad, 0] = 1e4, -1e4
    reference = gpu["hf_model"](state, torch.float32)
    with torch.no_grad():
        for p in range(len(prompts)):
            ids = prompts.input_ids[p][None].cuda()
            inputs = dict(input_ids=ids, mm_token_type_ids=(ids == IMAGE_PAD).long())
            if prompts.pixel_values[p] is not None:
                inputs.update(pixel_values=prompts.pixel_values[p].cuda(),
                              image_grid_thw=prompts.image_grid_thw[p].cuda())
            probs = torch.softmax(reference(**inputs).logits[0, -1].float(), -1)
            assert float(probs[gpu["suppressed"]].sum()) > 0.99  # unsuppressed sampling would emit a vision token
    backend.update_weights(state.items())
    rollouts = backend.generate(prompts, 4, SamplingParams(temperature=1.0, max_new_tokens=16, seed=0))
    generated = torch.cat([r.input_ids[r.prompt_length:] for r in rollouts])
    assert not bool(torch.isin(generated, torch.tensor(gpu["suppressed"])).any())
