"""RoleMassParams, the AVAR layers' per-batch inputs, refuses what the layers cannot compute, by name, before any
layer runs: roles out of range, fewer roles than TokenRole's, an unknown mass mode or kernel, and under context
parallelism the fused mode, logit edits, a sink without query rows, rows of another length than the split's."""

import pytest
import torch

from megatron_avar.models.context_parallel import ContextSplit
from megatron_avar.models.role_mass_attention import RoleLogitEdits, RoleMassParams
from megatron_avar.roles import NUM_ROLES


class RowsSink:
    def __init__(self, rows):
        self.query_rows = rows

    def __call__(self, layer_index, mass, out, heads):
        return out


ROLES = torch.tensor([[0, 1, 1, 2, 3, 3, 4, -1]])
SPLIT = ContextSplit.for_rank(8, 2, 0, "cpu")


@pytest.mark.parametrize("kwargs,match", [
    (dict(key_roles=ROLES + 1), rf"key_roles must lie in \[-1, {NUM_ROLES}\)"),
    (dict(key_roles=ROLES, num_roles=NUM_ROLES - 1), f"the key roles include TokenRole's {NUM_ROLES}"),
    (dict(key_roles=ROLES, mass_mode="dense"), "mass_mode='dense': allowed probe, fused"),
    (dict(key_roles=ROLES, impl="cuda"), "impl='cuda': allowed auto, triton"),
    (dict(key_roles=ROLES, context=SPLIT, mass_mode="fused"), "context parallelism computes AVAR masses with the "
                                                              "probe only"),
    (dict(key_roles=ROLES, context=SPLIT, edits=RoleLogitEdits(query_mask=ROLES > 0)), "and no logit edits"),
    (dict(key_roles=ROLES, context=SPLIT, sink=lambda *args: args[2]), "must declare its query_rows"),
    (dict(key_roles=ROLES[:, :6], context=SPLIT), "key_roles has 6 tokens per row but the context-parallel split "
                                                  "is of 8-token rows"),
    # rows the layers read by index, unchecked: -1 was silently the last token in fused mode, 8 an IndexError
    (dict(key_roles=ROLES, sink=RowsSink(torch.tensor([3, -1]))), r"query_rows must lie in \[0, 8\) .* got -1\.\.3"),
    (dict(key_roles=ROLES, sink=RowsSink(torch.tensor([8])), mass_mode="fused"), r"got 8\.\.8"),
    (dict(key_roles=ROLES, context=SPLIT, sink=RowsSink(torch.tensor([8]))), r"query_rows must lie in \[0, 8\)"),
])
def test_what_the_layers_cannot_compute_is_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RoleMassParams(**kwargs)


def test_sink_rows_of_the_wrong_type_are_refused_and_empty_rows_accepted():
    for rows in ([1, 2], torch.tensor([1.0]), torch.tensor([[1]])):
        with pytest.raises(TypeError, match="query_rows must be a 1-D integer tensor of token indices"):
            RoleMassParams(key_roles=ROLES, sink=RowsSink(rows))
    RoleMassParams(key_roles=ROLES, sink=RowsSink(torch.zeros(0, dtype=torch.long)))


def test_an_analysis_role_past_tokenroles_is_accepted_with_its_count():
    params = RoleMassParams(key_roles=ROLES.masked_fill(ROLES == 0, NUM_ROLES), num_roles=NUM_ROLES + 1)
    assert params.num_roles == NUM_ROLES + 1


def test_under_context_parallelism_the_sinks_rows_are_split_once_with_the_params():
    rows = torch.tensor([6, 2, 1])  # rank 0 of 2 holds positions 0, 1, 6, 7
    params = RoleMassParams(key_roles=ROLES, context=SPLIT, sink=RowsSink(rows))
    plan = params.context_rows()
    assert plan.rows.tolist() == [6, 1]              # this rank's rows, in the sink's order
    assert plan.queries.tolist() == [2, 1]           # where they lie among its tokens (positions 0, 1, 6, 7)
    assert plan.assemble.tolist() == [0, 2, 1]       # gathered: [rank 0's two rows, rank 1's row and a spare]
    with pytest.raises(ValueError, match="no context-parallel split with a mass sink"):
        RoleMassParams(key_roles=ROLES).context_rows()
