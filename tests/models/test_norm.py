"""The project's RMSNorm (``models.qwen2_5_vl.norm``): the outputs of ``torch.nn.RMSNorm`` bit for bit (same
float32 operations; float64 stays float64), gradients equal to autograd's through torch's composite (float32
rounding: the closed form sums in another order, ~1e-7 relative, bound 1e-5) and to finite differences in float64,
and for backward only its input and a float32 rsqrt per row — not torch's float32 copies (8 bytes per element in
bfloat16). TorchNorm marks the weights for sequence parallelism and still builds LayerNorm."""

import types
import warnings

import pytest
import torch

from megatron_avar.models.qwen2_5_vl.norm import RMSNorm, TorchNorm, rms_norm


def _pair(width: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    theirs, ours = torch.nn.RMSNorm(width, eps=1e-6), RMSNorm(width, eps=1e-6)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(width, generator=gen))
        ours.weight.copy_(theirs.weight)
    return theirs, ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_outputs_are_torchs_and_gradients_its_autograds(dtype):
    theirs, ours = _pair(96)
    x = (torch.randn(7, 3, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3).to(dtype)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    results = []
    for norm in (theirs, ours):
        inputs = x.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch: mixed dtypes cannot use its fused kernel
            out = norm(inputs)
        out.backward(grad)
        results.append((out, inputs.grad, norm.weight.grad))
    (want, want_dx, want_dw), (got, dx, dw) = results
    assert got.dtype == dtype and torch.equal(got, want)
    bound = 1e-5 if dtype != torch.bfloat16 else 1e-2  # bf16: the input gradient is rounded to bf16 at the end
    torch.testing.assert_close(dx.double(), want_dx.double(), rtol=bound, atol=bound * want_dx.abs().max().item())
    torch.testing.assert_close(dw.double(), want_dw.double(), rtol=1e-5, atol=1e-5 * want_dw.abs().max().item())


def test_gradients_match_finite_differences():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(12, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: rms_norm(a, w, 1e-6), (x, weight))


def test_backward_keeps_the_input_and_one_rsqrt_per_row():
    _, ours = _pair(256)
    x = torch.randn(64, 256, dtype=torch.bfloat16, requires_grad=True)
    kept = []

    def pack(tensor):
        kept.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        ours(x)
    extra = [t for t in kept if t is not x and t is not ours.weight]
    assert any(t is x for t in kept)
    assert [(t.dtype, tuple(t.shape)) for t in extra] == [(torch.float32, (64, 1))]


def test_torch_norm_marks_sequence_parallel_weights_and_builds_both_kinds():
    config = types.SimpleNamespace(layernorm_zero_centered_gamma=False, memory_efficient_layer_norm=False,
                                   normalization="RMSNorm", sequence_parallel=True, params_dtype=torch.float32)
    norm = TorchNorm(config, 32, eps=1e-6)
    assert isinstance(norm, RMSNorm) and norm.eps == 1e-6 and norm.weight.sequence_parallel is True
    assert norm.weight.dtype == torch.float32
    # the model's parameter dtype, as every other weight (megatron's mixed-precision optimizers expect it)
    config.normalization, config.sequence_parallel, config.params_dtype = "LayerNorm", False, torch.bfloat16
    layer = TorchNorm(config, 32)
    assert isinstance(layer, torch.nn.LayerNorm) and layer.weight.sequence_parallel is False
    assert layer.weight.dtype == layer.bias.dtype == torch.bfloat16
    config.normalization = "RMSNorm"
    assert TorchNorm(config, 32).weight.dtype == torch.bfloat16
    config.normalization = "ScaleNorm"
    with pytest.raises(ValueError, match="normalization='ScaleNorm': allowed RMSNorm, LayerNorm"):
        TorchNorm(config, 32)
