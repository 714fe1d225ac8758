"""Attention operators of the AVAR recipe.

role_attention: attention that also returns, per query and head, the probability mass on each key role
(reference, blockwise PyTorch and Triton implementations behind one functional API).
role_mass: the same masses for selected query rows only, with no output (the probe AVAR layers use).
"""

from megatron_avar.ops.role_attention import role_attention
from megatron_avar.ops.role_mass import role_mass

__all__ = ["role_attention", "role_mass"]
