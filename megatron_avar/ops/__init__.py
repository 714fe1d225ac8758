"""Attention operators of the AVAR recipe.

role_attention: attention that also returns, per query and head, the probability mass on each key role
(reference, blockwise PyTorch and Triton implementations behind one functional API).
"""

from megatron_avar.ops.role_attention import role_attention

__all__ = ["role_attention"]
