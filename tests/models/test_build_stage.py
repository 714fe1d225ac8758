"""models.qwen2_5_vl.build: the one builder of training, conversion and `avar vas` on a megatron checkpoint.
Parameter dtypes (every one bfloat16 in a bfloat16 model, norms included, with or without Transformer Engine:
megatron's mixed-precision optimizers expect it), AVAR layers exactly at ``role_mass_layers``, and HF weights
loaded bit-exact in float32."""

from pathlib import Path

import pytest
import torch

from megatron_avar.testing import run_on_ranks
from qwen_vl_cases import tiny_hf_config, tiny_hf_model


def _built(hf_dir):
    from megatron_avar import platform
    from megatron_avar.models.hf_weights import iter_lazy_tensors
    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.models.qwen2_5_vl.build import build_stage, init_model_parallel
    from megatron_avar.models.qwen2_5_vl.hf_mapping import export_hf_state_dict
    from megatron_avar.models.role_mass_attention import RoleMassCoreAttention

    config = Qwen25VLConfig.from_hf(tiny_hf_config())
    init_model_parallel(1, 1, seed=0)
    bf16 = build_stage(config, tp=1, pp=1, dtype=torch.bfloat16, role_mass_layers=(1,), initialize=True)
    norm_dtypes = {p.dtype for n, p in bf16.named_parameters() if "layernorm" in n or n.endswith("norm.weight")}
    other_dtypes = {p.dtype for n, p in bf16.named_parameters()
                    if not ("layernorm" in n or n.endswith("norm.weight"))}
    avar = sorted(i for i, layer in enumerate(bf16.language_model.decoder.layers)
                  if isinstance(layer.self_attention.core_attention, RoleMassCoreAttention)
                  and layer.self_attention.core_attention.reports_masses)  # the others: PlainCoreAttention
    fp32 = build_stage(Qwen25VLConfig.from_hf(hf_dir), tp=1, pp=1, dtype=torch.float32,
                       device=platform.current_device(), hf_tensors=iter_lazy_tensors(Path(hf_dir)))
    exported = {k: v.cpu() for k, v in export_hf_state_dict(fp32, Qwen25VLConfig.from_hf(hf_dir)).items()}
    return dict(norm_dtypes=norm_dtypes, other_dtypes=other_dtypes, avar=avar, exported=exported)


@pytest.mark.multiprocess
def test_one_builder_dtypes_avar_layers_and_hf_weights(tmp_path):
    from safetensors.torch import load_file

    from megatron_avar.models.qwen2_5_vl.hf_mapping import canonical_hf_name

    model = tiny_hf_model()
    model.save_pretrained(tmp_path)
    out = run_on_ranks(_built, 1, str(tmp_path), timeout_s=240)[0]
    assert out["other_dtypes"] == {torch.bfloat16}
    assert out["norm_dtypes"] == {torch.bfloat16}  # (empty if the names changed: then it fails)
    assert out["avar"] == [1]
    original = {canonical_hf_name(k): v for k, v in load_file(str(tmp_path / "model.safetensors")).items()}
    exported = {canonical_hf_name(k): v for k, v in out["exported"].items()}
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
