"""``sd.attention``: scaled dot-product attention by the kernels of sparsedsl/nn.sdsl, dense or
block-sparse (a block mask as a ``SparseTensor``: only its stored blocks are computed), with HF's
key padding mask; a ``torch.library`` op (``sparsedsl::attention``) with a fake implementation, so
``torch.compile(fullgraph=True)`` traces through it.

Meaning: ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask)`` with the boolean mask the
block mask's pattern and the key padding give, except that a query row with no key to attend to
returns zeros (as FlexAttention does), not NaN. One kernel call computes every batch and head
(its batch indices run over both); masks of their own per head take a call per head. ``q``, ``k``
and ``v`` that are [B, H, T, D] views of contiguous [B, T, H, D] tensors (what transformers hands
its attention functions) are read in place by the ``*_bthd`` kernels, which write the output
[B, T, H, D] (returned as its [B, H, T, D] view); other layouts are copied into [B * H, T, D].
The kernels are those of an nn.sdsl program (``ops.nn_program``): by default the TVM one; a compiled
model's attention runs its own program's (its backend, or the kernels of an ahead-of-time build).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sparsedsl.errors import ArgumentError, BackendError
from sparsedsl.runtime.ops import lookup, nn_program, register
from sparsedsl.runtime.program import Program
from sparsedsl.runtime.sparse_tensor import SparseTensor

DENSE, MASKED = "attention", "block_attention"  # nn.sdsl's kernels
DENSE_BTHD, MASKED_BTHD = "attention_bthd", "block_attention_bthd"  # the same, on [B, T, H, D] storage


def kernels_for(masked: bool) -> tuple[str, str]:
    """The nn.sdsl kernels that attention with (``masked``) or without a block mask may call:
    ``(in place, copied)``, on [B, T, H, D] storage read in place and on [B * H, T, D] copies."""
    return (MASKED_BTHD, MASKED) if masked else (DENSE_BTHD, DENSE)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: SparseTensor | Sequence[SparseTensor] | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    program: Program | None = None,
) -> torch.Tensor:
    """Attention of ``q`` [B, H, T, D] over ``k``, ``v`` [B, H, S, D] (float32, CPU).

    ``block_mask``: a ``SparseTensor`` [T, S] in a block format (BSR(bq, bk), or any format whose
    first level is ``t / bq: dense`` with ``t % bq: dense`` below it), one pattern for every batch
    and head, or a sequence of H of them, one per head: a query attends to the keys of its row's
    stored blocks. ``key_padding_mask``: [B, S] bool, True for a key to attend to (HF's attention
    mask). ``scale``: default ``D ** -0.5``. ``program``: the nn.sdsl program whose kernels run
    (``ops.nn_program``; default the TVM one); a block mask is in one of its formats."""
    _check(q, k, v, key_padding_mask)
    batch, heads, _, dim = q.shape
    masks = _masks(block_mask, heads, q.shape[2], k.shape[2])
    keep = q.new_ones(batch, k.shape[2]) if key_padding_mask is None else key_padding_mask.to(q.dtype)
    scale = float(dim**-0.5 if scale is None else scale)
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        structure = [t for m in masks for t in m.structure()]
        fmt = masks[0].format.label if masks else ""
        key = DEFAULT_PROGRAM if program is None else register(program)  # nn_program() made by the op, not traced
        return attention_op(q, k, v, keep, structure, [m.values for m in masks], fmt, scale, key)
    # outside autograd and tracing, skip the dispatcher: the op would run this same function
    return _attend(program or nn_program(), q, k, v, keep, [m.with_values(_ones(m.values)) for m in masks], scale)


DEFAULT_PROGRAM = ""  # the op's program key for ``nn_program()``
ONES = "_sparsedsl_ones"  # the attribute of a mask's values caching ones of their shape


def _ones(values: torch.Tensor) -> torch.Tensor:
    """Ones in place of a mask's values (the kernel multiplies the scores by them), made once per
    values tensor (they depend on its shape and dtype only)."""
    cached = getattr(values, ONES, None)
    if cached is None or cached.shape != values.shape or cached.dtype != values.dtype:
        cached = torch.ones_like(values)
        setattr(values, ONES, cached)
    return cached


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding: torch.Tensor | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ArgumentError(f"sd.attention: '{name}' must be a 4-d tensor [batch, heads, tokens, head dim]")
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ArgumentError(
                f"sd.attention: '{name}' is {t.dtype} on {t.device}; the attention kernels are built for "
                "float32 on the CPU"
            )
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ArgumentError(
            f"sd.attention: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must be [B, H, T, D], "
            "[B, H, S, D] and [B, H, S, D]"
        )
    if padding is not None and (padding.dtype != torch.bool or tuple(padding.shape) != (q.shape[0], k.shape[2])):
        raise ArgumentError(
            f"sd.attention: key_padding_mask must be a bool tensor [batch, keys] = {[q.shape[0], k.shape[2]]}, "
            f"got {padding.dtype} {list(padding.shape)}"
        )


def _masks(block_mask, heads: int, tokens: int, keys: int) -> list[SparseTensor]:
    """The block mask as a list: empty (dense attention), one pattern, or one per head."""
    if block_mask is None:
        return []
    masks = [block_mask] if isinstance(block_mask, SparseTensor) else list(block_mask)
    if len(masks) not in (1, heads) or not all(isinstance(m, SparseTensor) for m in masks):
        raise ArgumentError(
            f"sd.attention: block_mask must be a SparseTensor [T, S] or a sequence of {heads} (one per head)"
        )
    for m in masks:
        if tuple(m.shape) != (tokens, keys):
            raise ArgumentError(
                f"sd.attention: block_mask has shape {list(m.shape)}, expected [T, S] = {[tokens, keys]}"
            )
        if m.format != masks[0].format:
            raise ArgumentError("sd.attention: the heads' block masks must share one format")
    return masks


@torch.library.custom_op("sparsedsl::attention", mutates_args=())
def attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    structure: list[torch.Tensor],
    values: list[torch.Tensor],
    fmt: str,
    scale: float,
    program: str,
) -> torch.Tensor:
    """The op behind ``attention``: ``keep`` [B, S] (1 attend, 0 padding); the block masks (none,
    one, or one per head) as their index buffers (``structure``, mask after mask) and values, all
    in format ``fmt``; the kernels of the program registered as ``program`` (``ops.register``;
    ``DEFAULT_PROGRAM``: ``nn_program()``). The pattern is the mask: the values are read as ones."""
    nn = nn_program() if program == DEFAULT_PROGRAM else lookup(program)
    masks = []
    if values:
        form = nn.format(fmt)
        per = len(structure) // len(values)
        shape = (q.shape[2], k.shape[2])
        masks = [
            SparseTensor.from_structure(form, shape, structure[i * per : (i + 1) * per], _ones(vals))
            for i, vals in enumerate(values)
        ]
    return _attend(nn, q, k, v, keep, masks, scale)


def _attend(
    nn: Program,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    masks: list[SparseTensor],
    scale: float,
) -> torch.Tensor:
    """The kernel calls of ``attention_op``, by ``nn``'s kernels, its masks' values ones."""
    batch, heads, tokens, dim = q.shape
    keys = k.shape[2]
    keep = keep.to(q.dtype)
    placed, copied = (nn.kernels[name] for name in kernels_for(bool(masks)))
    if in_place(q, k, v, masks):  # the [B, T, H, D] storage read as it is, the output written so
        return placed(*(t.transpose(1, 2) for t in (q, k, v)), *masks, keep, scale).transpose(1, 2)
    keep = keep.repeat_interleave(heads, 0)  # [B * H, S]
    if len(masks) <= 1:  # one call for every batch and head
        flat = [t.reshape(batch * heads, -1, dim).contiguous() for t in (q, k, v)]
        return copied(*flat, *masks, keep, scale).view(batch, heads, tokens, dim)
    out = torch.empty(heads, batch, tokens, dim, dtype=q.dtype)
    keep = keep.view(batch, heads, keys).transpose(0, 1)
    for h, mask in enumerate(masks):  # a mask per head: a call per head
        args = [t[:, h].contiguous() for t in (q, k, v)]
        out[h] = copied(*args, mask, keep[h].contiguous(), scale)
    return out.transpose(0, 1).contiguous()


def in_place(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: Sequence) -> bool:
    """Whether ``_attend`` reads ``q``, ``k``, ``v`` in place: each a [B, H, T, D] view of a
    contiguous, non-empty [B, T, H, D] tensor (``Tensor.is_contiguous``), with one block mask at
    most; its output is then the [B, H, T, D] view of a [B, T, H, D] tensor."""
    return len(masks) <= 1 and all(t.numel() and t.transpose(1, 2).is_contiguous() for t in (q, k, v))


@attention_op.register_fake
def _(q, k, v, keep, structure, values, fmt, scale, program):
    if in_place(q, k, v, values):
        return q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2)
    return q.new_empty(q.shape)


def _no_backward(ctx, grad):
    raise BackendError(
        "sd.attention has no backward yet: the gradient kernels (dV = P^T dO, dS = P * (dO V^T - "
        "rowsum(dO * O)), dQ = dS K * scale, dK = dS^T Q * scale) are not written in sparsedsl/nn.sdsl; "
        "train with torch's scaled_dot_product_attention"
    )


torch.library.register_autograd("sparsedsl::attention", _no_backward)


IMPLEMENTATION = "sdsl"  # the name of sd.attention in transformers' attention-function registry
PLAN = "_sparsedsl_attention"  # an attention module's attribute: how compile_model's rules run it
SDPA = "sdpa"  # the plan of a module no attention rule matched: torch's SDPA


class Plan:
    """How an attention rule runs the modules it matches, by the kernels of ``program`` (an
    ``ops.nn_program``: the compiled model's, by default the TVM one), held by its
    ``ops.register`` key so that copies of a model share it."""

    def __init__(self, program: Program | None = None):
        self.key = register(program or nn_program())

    @property
    def program(self) -> Program:
        return lookup(self.key)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding, scale) -> torch.Tensor:
        """Attention of ``q`` over ``k`` and ``v`` with the key ``padding`` mask (or None)."""
        raise NotImplementedError


class Dense(Plan):
    """An attention rule without a block pattern: ``attention`` over every key."""

    def __str__(self) -> str:
        return "dense"

    def attend(self, q, k, v, padding, scale):
        return attention(q, k, v, key_padding_mask=padding, scale=scale, program=self.program)


class BlockPattern(Plan):
    """An attention rule's block pattern, for any number of tokens: the blocks of ``format`` (a
    format of the program) holding a query ``t`` and a key ``s`` with ``|t - s| <= window``.
    Tokens and keys are padded to the format's block multiples (padded keys masked, padded
    queries dropped); the mask of each padded shape is packed once."""

    def __init__(self, format: str, window: int, program: Program | None = None):
        super().__init__(program)
        self.format, self.window = format, window
        fmt = self.program.format(format)
        self.multiples = tuple(
            math.lcm(*(m.factor for m in fmt.maps if m.dim == dim and m.op is not None)) for dim in (0, 1)
        )
        self._masks: dict[tuple[int, int], SparseTensor] = {}

    def __str__(self) -> str:
        return f"{self.format} window {self.window}"

    def padded(self, tokens: int, keys: int) -> tuple[int, int]:
        """``tokens`` and ``keys`` rounded up to the format's block multiples."""
        return tuple(-(-n // m) * m for n, m in zip((tokens, keys), self.multiples))

    def mask(self, tokens: int, keys: int) -> SparseTensor:
        """The pattern at ``tokens`` x ``keys`` (multiples of the blocks), packed in its format."""
        mask = self._masks.get((tokens, keys))
        if mask is None:
            near = (torch.arange(tokens)[:, None] - torch.arange(keys)[None, :]).abs() <= self.window
            mask = self._masks[tokens, keys] = self.program.pack(self.format, near.float())
        return mask

    def density(self, tokens: int) -> float:
        """The fraction of the scores of ``tokens`` x ``tokens`` self-attention that are computed."""
        return self.mask(*self.padded(tokens, tokens)).density

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding: torch.Tensor | None, scale):
        """``attention`` with this pattern's mask, ``q``, ``k`` and ``v`` padded to its blocks."""
        tokens, keys = q.shape[2], k.shape[2]
        padded_tokens, padded_keys = self.padded(tokens, keys)
        keep = torch.ones(k.shape[0], keys, dtype=torch.bool) if padding is None else padding
        if (padded_tokens, padded_keys) != (tokens, keys):
            q = _padded(q, padded_tokens - tokens)
            k, v = (_padded(t, padded_keys - keys) for t in (k, v))
            keep = torch.cat([keep, keep.new_zeros(keep.shape[0], padded_keys - keys)], 1)
        out = attention(q, k, v, self.mask(padded_tokens, padded_keys), keep, scale, self.program)
        return out[:, :, :tokens]


def _padded(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` [B, H, T, D] with ``n`` tokens of zeros after its own, as the [B, H, T + n, D] view of
    a [B, T + n, H, D] tensor (what ``in_place`` reads without a copy)."""
    return F.pad(x.transpose(1, 2), (0, 0, 0, 0, 0, n)).transpose(1, 2)


def transformers_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """``attention`` with the signature of transformers' attention functions (``AttentionInterface``):
    ``query`` [B, H, T, D], returns ``([B, T, H, D], None)``. Runs what ``compile_model``'s rules
    chose for ``module`` (its ``PLAN``: ``SDPA`` or a ``Plan``; dense ``attention`` on the
    default program when the model selected "sdsl" itself). Attention with a key padding mask (a
    boolean ``[B, 1, T, S]`` mask whose rows agree, or none), grouped keys repeated per query head;
    anything else (a causal or per-query mask over more than one query, dropout in training, not
    float32) is handed to torch's SDPA. One query (a decoding step with a KV cache) sees every
    key, so a causal module's decoding steps run here."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plan = getattr(module, PLAN, None)
    padding = _key_padding(attention_mask)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", False) if causal is None else causal
    causal = causal and query.shape[2] > 1
    if plan == SDPA or causal or (dropout and module.training) or padding is False or query.dtype != torch.float32:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if key.shape[1] != query.shape[1]:  # grouped keys: each serves heads // groups query heads
        groups = query.shape[1] // key.shape[1]  # repeated in [B, S, H, D] storage: read in place
        key, value = (t.transpose(1, 2).repeat_interleave(groups, 2).transpose(1, 2) for t in (key, value))
    if plan is None:  # a model that selected "sdsl" itself: the default program, by its op key
        out = attention(query, key, value, key_padding_mask=padding, scale=scaling)
    else:
        out = plan.attend(query, key, value, padding, scaling)
    return out.transpose(1, 2).contiguous(), None  # no copy when q, k, v were read in place (``in_place``)


def is_attention_module(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a transformers attention module (one that calls the function its
    config's ``_attn_implementation`` names), recognised without importing transformers."""
    return hasattr(getattr(module, "config", None), "_attn_implementation") and hasattr(module, "is_causal")


def select(model: torch.nn.Module, plans: dict[str, Plan]) -> tuple[str, str] | None:
    """Run the attention modules of ``model`` named in ``plans`` by ``transformers_attention``
    (by their plan) and the others by SDPA: every transformers model in
    ``model`` selects "sdsl" (transformers selects an implementation per model, not per module).
    Returns a module it cannot select "sdsl" for and why (no transformers model holds it, or its
    model does not call attention through ``AttentionInterface``), else None."""
    name = register_transformers()
    outer = [(n, m) for n, m in model.named_modules() if callable(getattr(m, "set_attn_implementation", None))]
    outer = [(n, m) for n, m in outer if not any(n.startswith(f"{o}.") or (o == "" and n) for o, _ in outer)]
    for _, m in outer:
        m.set_attn_implementation(name)
    for module_name, module in model.named_modules():
        if is_attention_module(module):
            setattr(module, PLAN, plans.get(module_name, SDPA))
    unselected = [n for n in plans if model.get_submodule(n).config._attn_implementation != name]
    if not unselected:
        return None
    first = unselected[0]
    if not outer:
        return first, f"'{first}' is in no transformers model (a module with set_attn_implementation) to select it"
    left = model.get_submodule(first).config._attn_implementation
    return first, f"'{first}' still runs '{left}' attention: its model does not select it through AttentionInterface"


def _key_padding(mask: torch.Tensor | None) -> torch.Tensor | None | bool:
    """A transformers mask as a key padding mask [B, S]: None for none, False when it is not one."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return False
    keys = mask[:, 0, 0, :]
    if mask.shape[2] == 1 or mask.stride(2) == 0:  # one row every query shares (``padding_mask``)
        return keys.contiguous()
    return keys.contiguous() if bool((mask[:, 0] == keys[:, None, :]).all()) else False


def register_transformers() -> str:
    """Register ``attention`` in transformers' attention-function registry (and SDPA's boolean
    mask for it) under ``"sdsl"``, which ``model.set_attn_implementation("sdsl")`` then selects;
    returns the name. Idempotent; nothing is registered before it is called."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, transformers_attention)
    if IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(IMPLEMENTATION, padding_mask)
    return IMPLEMENTATION


def padding_mask(*args, **kwargs) -> torch.Tensor | None:
    """transformers' ``sdpa_mask``, except that an encoder's mask (bidirectional: key padding
    only) is made for one query row and expanded to ``[B, 1, T, S]`` (the shape transformers
    promises: an encoder-decoder concatenates masks), its rows one row in memory (stride 0):
    attention then takes its key padding from that stride, without comparing its rows (a test on
    the mask's values, which would break torch.compile's graph at every layer)."""
    from transformers.masking_utils import bidirectional_mask_function, sdpa_mask

    queries = kwargs.get("q_length")
    if kwargs.get("mask_function") is not bidirectional_mask_function or queries is None:
        return sdpa_mask(*args, **kwargs)
    mask = sdpa_mask(*args, **{**kwargs, "q_length": 1})
    return None if mask is None else mask.expand(-1, -1, queries, -1)
