"""The AGTO sink equals docs/method.md, 'AGTO objective', computed directly, sample by sample, in plain Python loops:
the loss it injects into the backward pass (through its gradient), its metrics, sample eligibility, packing, the sink
exclusion, and the split of heads over tensor-parallel ranks."""

import math

import pytest
import torch

from megatron_avar.models.role_mass_attention import LayerHeads
from megatron_avar.roles import TokenRole as R
from megatron_avar.training.aux_loss import attach_aux_loss
from megatron_avar.training.objective import AGTOConfig, AGTOSink, QuerySets

# One letter per role, for the role tables below (I: IMAGE).
S, I, U, A, T = int(R.SYSTEM), int(R.IMAGE), int(R.USER_TEXT), int(R.RESPONSE), int(R.TEMPLATE)  # noqa: E741
# Row 0 packs sample 0 (image then question: eligible) and sample 1 (question BEFORE the image: Q empty).
# Row 1 packs sample 0 (text only) and sample 1 (two images, text between and after: eligible), then padding.
ROLES = torch.tensor([
    [S, S, S, T, I, I, I, T, U, U, U, A, A, S, S, T, U, U, T, I, I, T, A, A],
    [S, S, T, U, U, A, A, S, S, S, T, I, I, U, U, I, U, U, U, A, A, -1, -1, -1],
])
SEGMENTS = torch.tensor([
    [0] * 13 + [1] * 11,
    [0] * 7 + [1] * 14 + [-1] * 3,
])
HEADS = 4


def _masses(seed=0):
    torch.manual_seed(seed)
    logits = torch.randn(2, HEADS, ROLES.shape[1], 5, dtype=torch.float64, requires_grad=True)
    return logits, torch.softmax(logits, -1)


def _direct(mass, config, exclude_sink=False):
    """Per eligible sample: the AGTO term of this one layer (alpha*L_enh + beta*L_sup), VAS and image share."""
    out = []
    for b in range(2):
        for seg in range(2):
            idx = [t for t in range(ROLES.shape[1]) if SEGMENTS[b, t] == seg]
            roles = [int(ROLES[b, t]) for t in idx]
            first_image = next((k for k, r in enumerate(roles) if r == I), None)
            q = [idx[k] for k, r in enumerate(roles) if r == U and first_image is not None and k > first_image]
            n_img, n_sys = roles.count(I), roles.count(S) - exclude_sink
            if not q or not n_img:
                continue
            enh = sup = vas = share = 0.0
            for h in range(HEADS):
                a = sum(mass[b, h, i, I] for i in q) / (len(q) * n_img)
                s = sum(mass[b, h, i, S] for i in q) / (len(q) * n_sys)
                enh += -torch.log(a + config.epsilon) / HEADS
                sup += torch.log(s + config.epsilon) / HEADS
                vas += sum(mass[b, h, i, I] / (mass[b, h, i, S] + config.epsilon) for i in q) / (HEADS * len(q))
                share += sum(mass[b, h, i, I] for i in q) / (HEADS * len(q))
            out.append(dict(term=config.alpha * enh + config.beta * sup, enh=enh, sup=sup, vas=vas, share=share))
    return out


def test_query_sets_follow_the_spec():
    sets = QuerySets(ROLES, SEGMENTS)
    assert sets.num_samples == 4
    assert sets.eligible.tolist() == [True, False, False, True]
    assert sets.q_count.tolist() == [3, 0, 0, 5]  # row 1 sample 1: 2 user tokens between its images, 3 after
    assert sets.image_count.tolist() == [3, 2, 0, 3]
    assert QuerySets(ROLES, SEGMENTS, exclude_sink=True).system_count.tolist() == [2, 1, 1, 2]


def at_rows(mass, rows):
    """[B, H, S, R] masses at flat [B * S] rows -> [N, H, R]: what an AVAR layer hands a sink with query_rows."""
    return mass.permute(0, 2, 1, 3).reshape(-1, mass.shape[1], mass.shape[3])[rows]


@pytest.mark.parametrize("exclude_sink", [False, True])
def test_injected_gradient_and_metrics_equal_the_direct_computation(exclude_sink):
    config = AGTOConfig(alpha=0.15, beta=0.3, exclude_sink=exclude_sink)
    logits, mass = _masses()
    num_layers, weight, grad_scale = 3, 1 / 5, 2.0
    sink = AGTOSink(QuerySets(ROLES, SEGMENTS, exclude_sink=exclude_sink), config, num_layers=num_layers,
                    weight=weight, grad_scale=grad_scale)
    activation = torch.zeros(3, requires_grad=True)
    sink(7, at_rows(mass, sink.query_rows), activation, LayerHeads(0, HEADS, HEADS)).sum().backward()
    ours = logits.grad.clone()

    logits.grad = None
    direct = _direct(torch.softmax(logits, -1), config, exclude_sink)
    assert len(direct) == 2
    (sum(d["term"] for d in direct) / num_layers * weight * grad_scale).backward()
    torch.testing.assert_close(ours, logits.grad, rtol=1e-10, atol=1e-12)
    expected = torch.tensor([[float(d[k].detach()) for k in ("enh", "sup", "vas", "share")] for d in direct],
                            dtype=torch.float64).sum(0)
    torch.testing.assert_close(sink.layer_sums[7].double(), expected, rtol=1e-6, atol=1e-7)


def test_tensor_parallel_head_shares_add_up_to_the_full_layer():
    config = AGTOConfig()
    _, mass = _masses(seed=1)
    sets = QuerySets(ROLES, SEGMENTS)

    def run(mass_part, heads):
        leaf = mass_part.detach().requires_grad_()
        sink = AGTOSink(sets, config, num_layers=1, weight=1.0, grad_scale=1.0)
        sink(0, at_rows(leaf, sink.query_rows), torch.zeros(1, requires_grad=True), heads).sum().backward()
        return sink.layer_sums[0], leaf.grad

    full_sums, full_grad = run(mass, LayerHeads(0, 4, 4))
    parts = [run(mass[:, :2], LayerHeads(0, 2, 4)), run(mass[:, 2:], LayerHeads(2, 2, 4))]
    torch.testing.assert_close(parts[0][0] + parts[1][0], full_sums)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]], dim=1), full_grad)


def test_attach_is_the_identity_forward_and_inert_without_grad():
    x = torch.randn(4, requires_grad=True)
    aux = (x ** 2).sum()
    y = attach_aux_loss(x * 1.0, aux, 0.5)
    torch.testing.assert_close(y, x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, 1 + 0.5 * 2 * x.detach())
    with torch.no_grad():
        assert attach_aux_loss(x, (x ** 2).sum(), 1.0) is x


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="avar.alpha"):
        AGTOConfig(alpha=-1)
    with pytest.raises(ValueError, match="avar.layers 'last_half': cannot read 'last_half'"):
        AGTOConfig(layers="last_half")
    assert AGTOConfig(layers="2-3").layer_indexes(4) == (2, 3)  # the one layer-set syntax (models.layer_sets)
    with pytest.raises(ValueError, match=r"avar.layers \[0, 9\]: layer 9 is out of range; this model has 4 decoder"):
        AGTOConfig(layers=[0, 9]).layer_indexes(4)
    assert AGTOConfig(layers=[3, 1, 1]).layer_indexes(4) == (1, 3)
    assert math.isclose(AGTOConfig().alpha, 0.15)
