"""LocalGenerationBackend against Hugging Face itself: its generator log-probs equal a teacher-forced HF forward,
sampling is reproducible per (seed, prompt id, sample index) whatever the batching, responses stop at
`<|im_end|>`, vision tokens are never generated, and update_weights refits exactly the weights a fresh HF model
loads from files.

The toy checkpoint carries a hostile generation_config.json (Qwen2.5-VL-Instruct's top_k=1, top_p=0.001,
temperature 0.1, repetition penalty 1.05): if it leaked into sampling, a prompt's samples would all be equal
and the log-probs would not match the plain forward.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration

from megatron_avar.data.conversations import load_conversations, to_chat_messages
from megatron_avar.data.procedural import ProceduralConfig, write_dataset
from megatron_avar.grpo import local_backend
from megatron_avar.grpo.interfaces import PromptBatch, SamplingParams
from megatron_avar.grpo.local_backend import SUPPRESSED_TOKENS, LocalGenerationBackend
from megatron_avar.models.qwen2_5_vl.toy import ToyModelConfig, write_toy_checkpoint
from megatron_avar.processor import load_processor
from megatron_avar.roles import TokenRole, render_conversation

IM_END, IMAGE_PAD = 151645, 151655
EMBED = "model.embed_tokens.weight"  # the checkpoint file's name (transformers 5 calls it model.language_model.…)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("local_backend")
    checkpoint = write_toy_checkpoint(root / "toy", ToyModelConfig(num_layers=2))
    hostile = {"do_sample": True, "top_k": 1, "top_p": 0.001, "temperature": 0.1, "repetition_penalty": 1.05,
               "eos_token_id": [IM_END, 151643], "pad_token_id": 151643, "bos_token_id": 151643}
    (checkpoint / "generation_config.json").write_text(json.dumps(hostile))
    processor = load_processor(checkpoint)
    rows = list(load_conversations(write_dataset(ProceduralConfig(num_samples=4, image_size=(112, 84)), root / "data")))
    conversations = [(row["id"], [m for m in to_chat_messages(row) if m["role"] != "assistant"], row["answer"])
                     for row in rows[:2]]
    conversations.append(("text-only", [{"role": "user", "content": "What is two plus two?"}], "4"))
    rendered = [(pid, render_conversation(messages, processor, add_generation_prompt=True), answer)
                for pid, messages, answer in conversations]
    prompts = PromptBatch([p for p, _, _ in rendered], [r.input_ids for _, r, _ in rendered],
                          [r.roles for _, r, _ in rendered], [r.pixel_values for _, r, _ in rendered],
                          [r.image_grid_thw for _, r, _ in rendered], [a for _, _, a in rendered])
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint).eval()
    backend = LocalGenerationBackend(str(checkpoint), processor, device=torch.device("cpu"), batch_size=2)
    return dict(checkpoint=checkpoint, processor=processor, prompts=prompts, reference=reference, backend=backend,
                state=load_file(checkpoint / "model.safetensors"), root=root)


def _subset(prompts: PromptBatch, indices) -> PromptBatch:
    return PromptBatch(*[[getattr(prompts, f)[i] for i in indices] for f in
                         ("prompt_ids", "input_ids", "roles", "pixel_values", "image_grid_thw", "ground_truths")])


@torch.no_grad()
def _teacher_forced(model, rollout, temperature):
    """HF forward over prompt + response: log_softmax(logits / T) of each response token, and the logits
    [response_length, V] that predicted them."""
    ids = rollout.input_ids[None]
    inputs = dict(input_ids=ids, mm_token_type_ids=(ids == IMAGE_PAD).long())
    if rollout.pixel_values is not None:
        inputs.update(pixel_values=rollout.pixel_values, image_grid_thw=rollout.image_grid_thw)
    logits = model(**inputs).logits[0, rollout.prompt_length - 1:-1].float()
    logp = torch.log_softmax(logits / temperature, -1).gather(1, rollout.input_ids[rollout.prompt_length:, None])
    return logp[:, 0], logits


def _common_direction(model, prompts) -> torch.Tensor:
    """Unit vector along the mean final hidden state of the text-only prompt: the tied embedding row of a token
    set to alpha * it raises that token's logit by ~alpha * |h| at every position."""
    ids = prompts.input_ids[-1][None]
    with torch.no_grad():
        hidden = model(input_ids=ids, mm_token_type_ids=torch.zeros_like(ids), output_hidden_states=True).hidden_states
    direction = hidden[-1][0].mean(0)
    return direction / direction.norm()


def _hf_model_with(setup, state, name):
    """A fresh HF model loaded (by transformers, from files) with ``state`` in place of the checkpoint's weights."""
    directory = setup["root"] / name
    shutil.copytree(setup["checkpoint"], directory)
    save_file({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors", metadata={"format": "pt"})
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(directory).eval()


def _doctored(state, processor_direction, token, alpha):
    doctored = dict(state)
    embed = doctored[EMBED].clone()
    embed[token] = alpha * processor_direction
    doctored[EMBED] = embed
    return doctored


def test_generator_logprobs_equal_a_teacher_forced_hf_forward(setup):
    prompts, backend = setup["prompts"], setup["backend"]
    sampling = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, max_new_tokens=8, seed=3)
    rollouts = backend.generate(prompts, 3, sampling)
    assert [(r.prompt_id, r.sample_index) for r in rollouts] == [(p, k) for p in prompts.prompt_ids for k in range(3)]
    worst = 0.0
    for i, r in enumerate(rollouts):
        p = i // 3
        assert torch.equal(r.input_ids[:r.prompt_length], prompts.input_ids[p])
        assert torch.equal(r.roles[:r.prompt_length], prompts.roles[p])
        assert bool((r.roles[r.prompt_length:] == TokenRole.RESPONSE).all())
        assert r.pixel_values is prompts.pixel_values[p] and r.ground_truth == prompts.ground_truths[p]
        assert r.generator_logprobs.dtype == torch.float32
        expected, logits = _teacher_forced(setup["reference"], r, sampling.temperature)
        worst = max(worst, float((r.generator_logprobs - expected).abs().max()))
        # top_k=20 honoured: every sampled token is among the 20 largest HF logits (chance: 20 / 151936 each)
        top20 = logits.topk(20, dim=-1).indices
        assert bool((top20 == r.input_ids[r.prompt_length:, None]).any(-1).all())
    print(f"max |generator - HF teacher-forced| log-prob = {worst:.2e} over {len(rollouts)} rollouts")
    assert worst < 1e-4, worst
    # the checkpoint's top_k=1 did not leak in: a prompt's samples differ
    for p in range(len(prompts)):
        assert len({tuple(r.input_ids.tolist()) for r in rollouts[3 * p:3 * p + 3]}) == 3


def test_samples_depend_only_on_seed_prompt_and_index(setup):
    prompts, backend = setup["prompts"], setup["backend"]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=6, seed=11)
    first = backend.generate(prompts, 3, sampling)
    again = backend.generate(prompts, 3, sampling)
    assert all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.generator_logprobs, b.generator_logprobs)
               for a, b in zip(first, again))
    other_seed = backend.generate(prompts, 3, SamplingParams(temperature=1.0, max_new_tokens=6, seed=12))
    assert all(not torch.equal(a.input_ids, b.input_ids) for a, b in zip(first, other_seed))
    # prompt 1 alone, one row per generate call (batch_size 1 instead of 2): the same samples
    alone = LocalGenerationBackend(str(setup["checkpoint"]), setup["processor"], device=torch.device("cpu"),
                                   batch_size=1)
    single = alone.generate(_subset(prompts, [1]), 3, sampling)
    alone.close()
    for a, b in zip(first[3:6], single):
        assert (a.prompt_id, a.sample_index) == (b.prompt_id, b.sample_index)
        assert torch.equal(a.input_ids, b.input_ids)
        torch.testing.assert_close(a.generator_logprobs, b.generator_logprobs, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="n \\(samples per prompt\\) must be >= 1"):
        backend.generate(prompts, 0, sampling)


def test_responses_end_at_the_first_end_of_turn(setup):
    prompts, reference = setup["prompts"], setup["reference"]
    backend = LocalGenerationBackend(str(setup["checkpoint"]), setup["processor"], device=torch.device("cpu"))
    # <|im_end|> made likely enough (about 1 in 4 per step) that both finish reasons occur
    backend.update_weights(_doctored(setup["state"], _common_direction(reference, prompts), IM_END, 1.6).items())
    rollouts = backend.generate(prompts, 4, SamplingParams(max_new_tokens=8, seed=0))
    backend.close()
    reasons = [r.finish_reason for r in rollouts]
    print(f"finish reasons: {reasons.count('stop')} stop, {reasons.count('length')} length")
    assert "stop" in reasons and "length" in reasons, reasons
    decode = setup["processor"].tokenizer.decode
    for r in rollouts:
        response = r.input_ids[r.prompt_length:]
        assert (int(response[-1]) == IM_END) == (r.finish_reason == "stop")
        assert not bool(torch.isin(response[:-1], torch.tensor([IM_END, 151643])).any())
        if r.finish_reason == "length":
            assert r.response_length == 8
        assert "<|im_end|>" not in r.response_text
        body = response[:-1] if r.finish_reason == "stop" else response
        assert r.response_text == decode(body.tolist(), skip_special_tokens=False)
    with pytest.raises(RuntimeError, match="closed"):
        backend.generate(prompts, 1, SamplingParams(max_new_tokens=2))


def test_vision_tokens_are_never_generated(setup, monkeypatch):
    prompts, reference, processor = setup["prompts"], setup["reference"], setup["processor"]
    doctored = _doctored(setup["state"], _common_direction(reference, prompts), IMAGE_PAD, 5.0)
    backend = LocalGenerationBackend(str(setup["checkpoint"]), processor, device=torch.device("cpu"), batch_size=4)
    backend.update_weights(doctored.items())
    # the doctored model (loaded by HF itself) puts almost all mass on <|image_pad|> after every prompt
    favoured = _hf_model_with(setup, doctored, "image_pad")
    sampling = SamplingParams(max_new_tokens=6, seed=1)
    rollouts = backend.generate(prompts, 4, sampling)
    vision_ids = torch.tensor([processor.tokenizer.convert_tokens_to_ids(t) for t in SUPPRESSED_TOKENS])
    for r in rollouts:
        assert not bool(torch.isin(r.input_ids[r.prompt_length:], vision_ids).any())
        expected, logits = _teacher_forced(favoured, r, sampling.temperature)
        assert float(torch.softmax(logits[0], -1)[IMAGE_PAD]) > 0.9
        # log-probs are over the full (unsuppressed) vocabulary, as the trainer computes them
        torch.testing.assert_close(r.generator_logprobs, expected, atol=1e-4, rtol=0)
        assert float(r.generator_logprobs[0]) < -4
    # without the suppression the guard after generation names the prompt
    monkeypatch.setattr(local_backend, "SuppressTokensLogitsProcessor", lambda ids, device: (lambda i, s: s))
    with pytest.raises(ValueError, match=f"prompt {prompts.prompt_ids[0]} sample 0: .*<\\|image_pad\\|>"):
        backend.generate(prompts, 1, sampling)
    backend.close()


def test_update_weights_refits_what_hf_loads_from_files(setup):
    prompts, backend, state = setup["prompts"], setup["backend"], setup["state"]
    generator = torch.Generator().manual_seed(7)
    perturbed = {k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
    fresh = _hf_model_with(setup, perturbed, "perturbed")
    sampling = SamplingParams(temperature=0.9, max_new_tokens=6, seed=2)
    try:
        # checkpoint-file names (model.layers.*, visual.*) ...
        backend.update_weights(perturbed.items())
        rollouts = backend.generate(_subset(prompts, [0, 2]), 2, sampling)
        for r in rollouts:
            expected, _ = _teacher_forced(fresh, r, sampling.temperature)
            torch.testing.assert_close(r.generator_logprobs, expected, atol=1e-4, rtol=0)
            original, _ = _teacher_forced(setup["reference"], r, sampling.temperature)
            assert float((r.generator_logprobs - original).abs().max()) > 1e-2
        # ... and transformers-5 module names (what hf_mapping.export_hf_state_dict writes) refit the same
        backend.update_weights(setup["reference"].state_dict().items())
        assert all(torch.equal(a, b) for a, b in zip(backend.model.state_dict().values(),
                                                     setup["reference"].state_dict().values()))

        with pytest.raises(ValueError, match="unknown tensor 'model.layers.0.mlp.gate.weight'"):
            backend.update_weights([("model.layers.0.mlp.gate.weight", torch.zeros(1))])
        with pytest.raises(RuntimeError, match="failed update_weights"):
            backend.generate(prompts, 1, sampling)
        bad_shape = dict(state, **{"visual.blocks.1.attn.qkv.bias": torch.zeros(5)})
        with pytest.raises(ValueError, match="'visual.blocks.1.attn.qkv.bias' has shape \\(5,\\)"):
            backend.update_weights(bad_shape.items())
        partial = {k: v for k, v in state.items() if not k.startswith("model.layers.1.")}
        with pytest.raises(ValueError, match="were not given, e.g. .*model.language_model.layers.1."):
            backend.update_weights(partial.items())
    finally:
        backend.update_weights(state.items())  # the original weights, for the other tests
    again = backend.generate(_subset(prompts, [2]), 1, sampling)[0]
    expected, _ = _teacher_forced(setup["reference"], again, sampling.temperature)
    torch.testing.assert_close(again.generator_logprobs, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("keep", ["half", "header"])
def test_a_truncated_weight_file_is_named_with_the_fix(tmp_path, keep):
    """Found in review: a model.safetensors cut short (an interrupted copy of the checkpoint) made the backend raise
    safetensors' own SafetensorError, a traceback naming no file. Now it is one line naming the file and the fix, cut
    inside the tensor data or inside the header alike: the check every HF load makes
    (``models.hf_weights.check_weights_readable`` in ``hf_inference.load_model``), before any weight is read."""
    checkpoint = write_toy_checkpoint(tmp_path / "toy", ToyModelConfig(num_layers=1))
    processor = load_processor(checkpoint)
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2] if keep == "half" else data[:1000])
    with pytest.raises(ValueError) as error:
        LocalGenerationBackend(str(checkpoint), processor, device=torch.device("cpu"))
    message = str(error.value)
    assert message.startswith(f"{weights} is not a readable safetensors file ("), message
    assert message.endswith("cut short leaves such a file: download or copy it again") and "\n" not in message


@pytest.mark.gpu
def test_on_cuda_logprobs_equal_the_hf_forward_and_samples_repeat(setup):
    prompts = setup["prompts"]
    backend = LocalGenerationBackend(str(setup["checkpoint"]), setup["processor"], device=torch.device("cuda"))
    sampling = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=12, seed=5)
    rollouts = backend.generate(prompts, 3, sampling)
    again = backend.generate(prompts, 3, sampling)
    backend.close()
    assert [r.input_ids.tolist() for r in rollouts] == [r.input_ids.tolist() for r in again]
    for r in rollouts:
        assert r.input_ids.device.type == "cpu" and r.generator_logprobs.device.type == "cpu"
        expected, _ = _teacher_forced(setup["reference"], r, sampling.temperature)  # HF fp32 on the CPU
        torch.testing.assert_close(r.generator_logprobs, expected, atol=1e-3, rtol=0)
