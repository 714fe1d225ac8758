"""AVAR's attention inside a loaded Hugging Face Qwen2.5-VL model, through transformers' AttentionInterface.

    with RoleAttentionHook(model) as hook:
        hook.set_batch(roles, on_mass=lambda layer, mass: ..., intervention=spec)   # roles [B, S], PAD = -1
        model(**batch)   or   model.generate(**batch)

Inside the context every text decoder attention call (a module with ``layer_idx`` and ``is_causal``) runs
this project's attention with key roles ``mass_key_roles(roles)`` (num_roles = MASS_NUM_ROLES: the five
TokenRoles plus the sink) and the batch's role-logit edits; every other call (the vision tower) passes through
to the implementation the model had before. HF's own mask is not used by the text layers: causality and padding
come from the roles (PAD = -1 keys are never attended), so no [S, S] mask is ever built; the 2-D
attention_mask the model receives is checked against the roles instead.

Prefill (query length == key length): a layer with logit edits, or whose every row's masses are asked for, runs
role_attention (blockwise on CPU, Triton on GPU); ``on_mass(layer, mass [B, H, S, MASS_NUM_ROLES])`` is called
for every layer in ``mass_layers``. Given ``mass_rows`` (flat indices b * S + i), the layers without edits take
``out`` from the plain attention (``ops.causal_attention``) and probe only those rows (``ops.role_mass``):
``on_mass`` then receives mass [N, H, MASS_NUM_ROLES]. A layer that neither edits nor reports runs only the
plain attention, so in an intervention run the edited layers' outputs differ from the baseline's by the edit
and by the two kernels' float rounding (about one bf16 ulp), and α = 0 (no edits) is the baseline exactly.
Cached decoding (query length < key length, keys = cache + new tokens): the new tokens are RESPONSE keys
appended to the batch's roles; attention runs eagerly on the [q_len x kv_len] slice (small: q_len is 1 per
step), with the same edits on intervention rows (rows with an image: generated tokens follow it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from megatron_avar.analysis.intervention import InterventionSpec, intervention_query_mask
from megatron_avar.analysis.vas import MASS_NUM_ROLES, mass_key_roles
from megatron_avar.ops import role_attention, role_mass
from megatron_avar.ops.causal_attention import PLAIN_ATTENTION_FOR, AttentionSpans, attention_spans, causal_attention
from megatron_avar.ops.role_mass import masses_at_rows
from megatron_avar.roles import NUM_ROLES, TokenRole

__all__ = ["ATTENTION_NAME", "RoleAttentionHook", "text_attention_modules"]

ATTENTION_NAME = "avar_role_attention"
_HOOK_BY_MODULE: dict[int, tuple[RoleAttentionHook, int]] = {}  # id(text attention module) -> (hook, layer)
_HOOK_BY_CONFIG: dict[int, RoleAttentionHook] = {}              # id(text config) -> hook (mask checks)
_ACTIVE: list[RoleAttentionHook] = []


def text_attention_modules(model) -> dict[int, torch.nn.Module]:
    """The causal decoder self-attention modules of ``model`` by layer index (the vision tower excluded)."""
    modules = {}
    for module in model.modules():
        layer = getattr(module, "layer_idx", None)
        is_attention = getattr(module, "is_causal", False) and module.__class__.__name__.endswith("Attention")
        if layer is not None and is_attention:
            modules[int(layer)] = module
    if not modules:
        raise ValueError(f"{type(model).__name__} has no causal attention modules with a layer_idx; the role "
                         "attention hook supports transformers decoder models such as Qwen2.5-VL")
    return dict(sorted(modules.items()))


def _passthrough(module, query, key, value, attention_mask, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    previous = _ACTIVE[-1].previous_implementation if _ACTIVE else "sdpa"
    if previous in (None, "eager") or previous not in ALL_ATTENTION_FUNCTIONS:
        function = sys.modules[type(module).__module__].eager_attention_forward
    else:
        function = ALL_ATTENTION_FUNCTIONS[previous]
    return function(module, query, key, value, attention_mask, **kwargs)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    entry = _HOOK_BY_MODULE.get(id(module))
    if entry is None:
        return _passthrough(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    hook, layer = entry
    if dropout and module.training:
        raise ValueError("the role attention hook runs without attention dropout; call model.eval() first")
    if getattr(module, "sliding_window", None) is not None:
        raise ValueError(f"layer {layer} uses sliding-window attention, which the role attention hook does not model")
    return hook._text_attention(layer, query, key, value, scaling), None


def _mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
          config=None, **kwargs):
    """No mask (the text layers mask by roles); the 2-D padding mask is checked against the batch roles."""
    hook = _HOOK_BY_CONFIG.get(id(config))
    if hook is not None and attention_mask is not None and hook._key_roles is not None:
        hook._check_padding(attention_mask, prefill=q_length == kv_length)
    return None


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, _attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _mask)


class RoleAttentionHook:
    """Context manager running a HF model's text attention through this project's attention (module docstring).

    impl: the kernel family ("auto": Triton on CUDA, blockwise on CPU; the plain attention beside it is
    ``ops.causal_attention.PLAIN_ATTENTION_FOR[impl]``: Triton / SDPA). Hooks do not nest
    on one model; leaving the context restores the model's previous attention implementation.
    """

    def __init__(self, model, *, impl: str = "auto"):
        if impl not in PLAIN_ATTENTION_FOR:
            raise ValueError(f"impl={impl!r} is not a role_attention implementation; use one of "
                             f"{tuple(PLAIN_ATTENTION_FOR)}")
        self.model = model
        self.impl = impl
        self.modules = text_attention_modules(model)
        self.num_layers = len(self.modules)
        self.previous_implementation = None
        self._key_roles = None
        self._query_mask = None
        self._row_has_image = None
        self._on_mass = None
        self._mass_rows: torch.Tensor | None = None
        self._spans: AttentionSpans | None = None
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}  # per-batch copies on each layer's device
        self._mass_layers: frozenset[int] = frozenset()
        self._intervention: InterventionSpec | None = None
        self._tables: dict = {}

    def __enter__(self) -> RoleAttentionHook:
        if any(id(m) in _HOOK_BY_MODULE for m in self.modules.values()):
            raise RuntimeError("a RoleAttentionHook is already active on this model")
        _register()
        self.previous_implementation = self.model.config._attn_implementation
        for layer, module in self.modules.items():
            _HOOK_BY_MODULE[id(module)] = (self, layer)
            _HOOK_BY_CONFIG[id(module.config)] = self
        _ACTIVE.append(self)
        self.model.set_attn_implementation(ATTENTION_NAME)
        return self

    def __exit__(self, *exc) -> None:
        for module in self.modules.values():
            _HOOK_BY_MODULE.pop(id(module), None)
            _HOOK_BY_CONFIG.pop(id(module.config), None)
        _ACTIVE.remove(self)
        self.model.set_attn_implementation(self.previous_implementation or "eager")
        self.clear_batch()

    def set_batch(self, roles: torch.Tensor, *, on_mass: Callable[[int, torch.Tensor], None] | None = None,
                  mass_layers=None, mass_rows: torch.Tensor | None = None,
                  intervention: InterventionSpec | None = None) -> None:
        """Roles of the next forward / generate batch: int [B, S] TokenRole ids of exactly its input_ids
        (PAD = -1 where attention_mask is 0). ``on_mass(layer, mass)`` receives the prefill masses of the
        layers in ``mass_layers`` (default: all): every row's [B, H, S, R], or with ``mass_rows`` (int64 [N],
        flat indices b * S + i) those rows' [N, H, R]. ``intervention``: logit edits (None = plain attention)."""
        if roles.dim() != 2:
            raise ValueError(f"roles must be [B, S], got shape {tuple(roles.shape)}")
        roles = roles.cpu()  # the host copy every check and growth step works on (one read per batch)
        if roles.numel() and not -1 <= int(roles.min()) <= int(roles.max()) < NUM_ROLES:
            raise ValueError(f"roles must be TokenRole ids (PAD = -1), got values {int(roles.min())}..."
                             f"{int(roles.max())}")
        if mass_rows is not None:
            mass_rows = mass_rows.cpu()
        if mass_rows is not None and (mass_rows.dim() != 1 or mass_rows.dtype != torch.long
                                      or (mass_rows.numel() and not 0 <= int(mass_rows.min())
                                          <= int(mass_rows.max()) < roles.numel())):
            raise ValueError(f"mass_rows must be int64 [N] flat indices b * S + i in [0, {roles.numel()}) of the "
                             f"batch's [B, S] = {list(roles.shape)} roles")
        if intervention is not None and intervention.layers is not None and max(intervention.layers) >= self.num_layers:
            raise ValueError(f"intervention layer {max(intervention.layers)} is out of range; the model has "
                             f"{self.num_layers} decoder layers (0-{self.num_layers - 1})")
        self._key_roles = mass_key_roles(roles)
        self._spans = attention_spans(self._key_roles)  # the prefill's runs of real tokens (host, once per batch)
        self._intervention = None if intervention is None or intervention.is_identity else intervention
        self._row_has_image = (roles == TokenRole.IMAGE).any(1)
        self._query_mask = (None if self._intervention is None
                            else intervention_query_mask(roles, self._intervention.queries))
        self._on_mass = on_mass
        self._mass_rows = mass_rows
        self._on_device = {}
        self._mass_layers = frozenset(self.modules if mass_layers is None else mass_layers)
        if self._intervention is not None:
            scale, bias = self._intervention.role_logit_tables(MASS_NUM_ROLES)
            self._tables = dict(scale=scale, bias=bias)

    def clear_batch(self) -> None:
        self._key_roles = self._query_mask = self._row_has_image = self._on_mass = self._intervention = None
        self._mass_rows = self._spans = None
        self._on_device = {}

    # -- internals ---------------------------------------------------------------------------------------

    def _batch_roles(self) -> torch.Tensor:
        """The key roles of the batch given to set_batch (grown by the generated tokens so far)."""
        if self._key_roles is None:
            raise RuntimeError("RoleAttentionHook: call set_batch(roles) before running the model")
        return self._key_roles

    def _check_padding(self, attention_mask: torch.Tensor, prefill: bool) -> None:
        key_roles = self._batch_roles()
        batch, known = key_roles.shape
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < known \
                or (prefill and attention_mask.shape[1] != known):
            raise ValueError(f"the roles given to set_batch are [{batch}, {known}] but the attention_mask is "
                             f"{list(attention_mask.shape)}; pass the roles of exactly this batch's input_ids")
        real = attention_mask.to("cpu", torch.bool)[:, :known]
        if not torch.equal(real, key_roles >= 0):
            raise ValueError("attention_mask and the roles given to set_batch disagree on which tokens are padding; "
                             "roles must be PAD (-1) exactly where attention_mask is 0")

    def _grow(self, kv_length: int) -> None:
        """Append generated tokens (RESPONSE keys; intervention rows where the row has an image)."""
        key_roles = self._batch_roles()
        batch, known = key_roles.shape
        if kv_length <= known:
            return
        new = kv_length - known
        self._key_roles = torch.cat([key_roles, torch.full((batch, new), int(TokenRole.RESPONSE))], 1)
        if self._query_mask is not None and self._row_has_image is not None:  # set together by set_batch
            self._query_mask = torch.cat([self._query_mask, self._row_has_image[:, None].expand(batch, new)], 1)
        # what was laid out on the [B, S] grid: the spans are worked out again, the mass rows moved to [B, S + new]
        self._spans = None
        if self._mass_rows is not None:
            self._mass_rows = self._mass_rows // known * kv_length + self._mass_rows % known
        self._on_device = {}

    def _device_copy(self, name: str, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``tensor`` (a per-batch host tensor) on ``device``, copied once per batch, not once per layer."""
        key = (name, device)
        if key not in self._on_device:
            self._on_device[key] = tensor.to(device)
        return self._on_device[key]

    def _text_attention(self, layer: int, query, key, value, scaling) -> torch.Tensor:
        """query [B, Hq, q_len, D], key/value [B, Hkv, kv_len, D] (HF layout) -> out [B, q_len, Hq, D]."""
        q_len, kv_len = query.shape[2], key.shape[2]
        known = self._batch_roles().shape[1]
        if q_len == kv_len and kv_len != known:
            raise ValueError(f"the batch roles cover {known} tokens but the model sees {kv_len}: "
                             "set_batch needs the roles of exactly these input_ids (and a fresh cache)")
        self._grow(kv_len)
        device = query.device
        edit = self._intervention is not None and self._intervention.applies_to(layer)
        scale = self._tables["scale"] if edit else None
        bias = self._tables["bias"] if edit else None
        all_query_mask = self._query_mask if edit else None  # not None exactly when edit (set_batch)
        if q_len == kv_len:
            # Prefill: everything per batch (roles on the device, spans, mass rows) is made once, by the first
            # layer, and the values were checked in set_batch: no layer reads the device on the host.
            key_roles = self._device_copy("key_roles", self._batch_roles(), device)
            q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # [B, S, H, D]
            reports = self._on_mass is not None and layer in self._mass_layers
            rows = None if self._mass_rows is None else self._device_copy("mass_rows", self._mass_rows, device)
            if edit or (reports and rows is None):
                query_mask = None if all_query_mask is None else self._device_copy("query_mask", all_query_mask,
                                                                                   device)
                out, mass = role_attention(
                    q, k, v, key_roles, num_roles=MASS_NUM_ROLES, softmax_scale=scaling, query_mask=query_mask,
                    role_logit_scale=None if scale is None else self._device_copy("scale", scale, device),
                    role_logit_bias=None if bias is None else self._device_copy("bias", bias, device),
                    impl=self.impl, check_values=False)
                if rows is not None:
                    mass = masses_at_rows(mass, rows)  # [N, H, R]
            else:
                if self._spans is None:  # a prefill over prompt and generated tokens (after _grow)
                    self._spans = attention_spans(self._batch_roles())
                out = causal_attention(q, k, v, key_roles, softmax_scale=scaling, impl=PLAIN_ATTENTION_FOR[self.impl],
                                       check_values=False, spans=self._spans)
                mass = None if not reports or rows is None else role_mass(
                    q, k, key_roles, rows, num_roles=MASS_NUM_ROLES, softmax_scale=scaling, impl=self.impl,
                    check_values=False)
            if reports:
                assert self._on_mass is not None and mass is not None
                self._on_mass(layer, mass)
            return out
        # Cached decoding: the batch grew by this step's tokens (``_grow``); the first layer copies it to the device
        key_roles = self._device_copy("key_roles", self._batch_roles(), device)[:, :kv_len]
        query_mask = None if all_query_mask is None else self._device_copy(
            "query_mask", all_query_mask, device)[:, kv_len - q_len:kv_len]
        return _decode_attention(query, key, value, key_roles, scaling, query_mask,
                                 None if scale is None else self._device_copy("scale", scale, device),
                                 None if bias is None else self._device_copy("bias", bias, device))


def _decode_attention(query, key, value, key_roles, scaling, query_mask, scale, bias) -> torch.Tensor:
    """Eager attention of the last q_len positions over kv_len cached keys, fp32 softmax, the same edits
    and masking as role_attention. Returns [B, q_len, Hq, D] in query's dtype. Grouped-query heads are folded
    into the query rows (query head h uses kv head h // G), so the cache is read once per kv head, not G times."""
    batch, num_heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = num_heads // kv_heads
    folded = query.float().reshape(batch, kv_heads, groups * q_len, dim)              # [B, Hkv, G * q_len, D]
    logits = torch.matmul(folded, key.float().transpose(2, 3)) * scaling
    logits = logits.view(batch, num_heads, q_len, kv_len)                               # [B, H, q_len, kv_len]
    if query_mask is not None:
        safe_roles = key_roles.clamp(min=0)
        multiplier = torch.ones_like(logits[:, 0, 0]) if scale is None else scale[safe_roles]
        offset = torch.zeros_like(logits[:, 0, 0]) if bias is None else bias[safe_roles]
        edited = logits * multiplier[:, None, None, :] + offset[:, None, None, :]
        logits = torch.where(query_mask[:, None, :, None], edited, logits)
    positions = torch.arange(kv_len, device=query.device)
    query_positions = torch.arange(kv_len - q_len, kv_len, device=query.device)
    allowed = (key_roles >= 0)[:, None, None, :] & (positions[None, :] <= query_positions[:, None])[None, None]
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0).view(batch, kv_heads, groups * q_len, kv_len)
    out = torch.matmul(probs, value.float()).view(batch, num_heads, q_len, dim)
    return out.to(query.dtype).transpose(1, 2)
