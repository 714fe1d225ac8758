"""The training-free attention intervention (docs/method.md, 'Training-free intervention'), as one typed spec.

In the layers ``layers``, on the intervention queries, the pre-softmax logit z = (q . k) * scale of a
key becomes (role_attention's role_logit_scale / role_logit_bias):
  multiplicative (ClearSight's VAF):  z * (1 + alpha_img) on IMAGE keys,  z * (1 - alpha_sys) on SYSTEM keys
  additive (shift-invariant):         z + log(1 + alpha_img) on IMAGE keys, z + log(1 - alpha_sys) on SYSTEM keys
Other keys are untouched. The additive form multiplies the unnormalised attention weights of a role by
(1 + alpha), whatever the logits' sign; the multiplicative one depends on the logits' scale and sign.

Intervention queries (``queries``):
  "user_text_and_response"  Q plus generated tokens: USER_TEXT and RESPONSE tokens after the row's first
                            IMAGE token (docs/method.md: the paper's rule read literally; generated tokens are RESPONSE)
  "all_after_image"         every token after the first IMAGE token (template tokens such as the
                            `<|im_start|>assistant\\n` header that predicts the first answer token included)
Rows without an image are never edited. The system sink (the row's first token) is a SYSTEM key and is
edited with the rest of K_sys unless ``edit_sink`` is False.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_avar.analysis.vas import MASS_NUM_ROLES, SINK_ROLE
from megatron_avar.roles import TokenRole

__all__ = ["InterventionSpec", "MODES", "QUERY_SETS", "intervention_query_mask"]

MODES = ("multiplicative", "additive")
QUERY_SETS = ("user_text_and_response", "all_after_image")


@dataclass(frozen=True)
class InterventionSpec:
    """What to edit. alpha_img: IMAGE keys' gain, > -1 (0 = off). alpha_sys: SYSTEM keys' reduction, in
    [0, 1) (0 = off). mode: one of MODES. layers: decoder layer indexes to edit (None = every layer).
    queries: one of QUERY_SETS. edit_sink: also edit the sink key (position 0, a SYSTEM token)."""

    alpha_img: float = 0.15
    alpha_sys: float = 0.0
    mode: str = "multiplicative"
    layers: tuple[int, ...] | None = None
    queries: str = "user_text_and_response"
    edit_sink: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: use one of {MODES}")
        if self.queries not in QUERY_SETS:
            raise ValueError(f"queries={self.queries!r}: use one of {QUERY_SETS}")
        if not (isinstance(self.alpha_img, (int, float)) and math.isfinite(self.alpha_img) and self.alpha_img > -1):
            raise ValueError(f"alpha_img={self.alpha_img!r} must be a finite number > -1 (1 + alpha_img > 0)")
        if not (isinstance(self.alpha_sys, (int, float)) and 0 <= self.alpha_sys < 1):
            raise ValueError(f"alpha_sys={self.alpha_sys!r} must be in [0, 1) (1 - alpha_sys > 0)")
        if self.layers is not None:
            if not all(isinstance(layer, int) and layer >= 0 for layer in self.layers) or not self.layers:
                raise ValueError(f"layers={self.layers!r} must be None (all) or a non-empty tuple of layer "
                                 "indexes >= 0")
            object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))

    @property
    def is_identity(self) -> bool:
        return self.alpha_img == 0 and self.alpha_sys == 0

    def applies_to(self, layer: int) -> bool:
        return not self.is_identity and (self.layers is None or layer in self.layers)

    def role_logit_tables(self, num_roles: int = MASS_NUM_ROLES) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(role_logit_scale, role_logit_bias) float32 [num_roles] for key roles from ``mass_key_roles``
        (num_roles = MASS_NUM_ROLES, the sink has its own role) or plain TokenRoles (num_roles = 5)."""
        if num_roles not in (MASS_NUM_ROLES, MASS_NUM_ROLES - 1):
            raise ValueError(f"num_roles must be {MASS_NUM_ROLES - 1} or {MASS_NUM_ROLES}, got {num_roles}")
        sys_roles = [TokenRole.SYSTEM] + ([SINK_ROLE] if num_roles == MASS_NUM_ROLES and self.edit_sink else [])
        if self.mode == "multiplicative":
            scale = torch.ones(num_roles, dtype=torch.float32)
            scale[TokenRole.IMAGE] = 1 + self.alpha_img
            scale[sys_roles] = 1 - self.alpha_sys
            return scale, None
        bias = torch.zeros(num_roles, dtype=torch.float32)
        bias[TokenRole.IMAGE] = math.log1p(self.alpha_img)
        bias[sys_roles] = math.log1p(-self.alpha_sys)
        return None, bias

    def to_json(self) -> dict:
        return dict(alpha_img=self.alpha_img, alpha_sys=self.alpha_sys, mode=self.mode,
                    layers=None if self.layers is None else list(self.layers), queries=self.queries,
                    edit_sink=self.edit_sink)


def intervention_query_mask(roles: torch.Tensor, queries: str) -> torch.Tensor:
    """bool [B, S]: the rows ``queries`` (one of QUERY_SETS) selects, from TokenRole ids [B, S] (PAD = -1)."""
    if queries not in QUERY_SETS:
        raise ValueError(f"queries={queries!r}: use one of {QUERY_SETS}")
    is_image = roles == TokenRole.IMAGE
    after_image = (torch.cumsum(is_image.long(), dim=1) > 0) & ~is_image
    if queries == "all_after_image":
        return after_image & (roles >= 0)
    return after_image & ((roles == TokenRole.USER_TEXT) | (roles == TokenRole.RESPONSE))
