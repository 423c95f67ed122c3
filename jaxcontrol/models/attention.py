"""Multi-head attention and the spatial transformer of latent diffusion (diffusers' `Transformer2DModel`).

Interchangeable attention kernels, chosen per model by `attention_impl`:

* ``"auto"`` (the default everywhere): per call, from the platform, dtype and shape (`select_impl`):
  cuDNN's fused kernel on a GPU where it takes the call, Pallas flash attention on a TPU for long
  self-attention, the query-chunked kernel on the CPU for sequences of `CHUNKED_MIN_QUERIES` or more
  queries, and "plain" elsewhere (short sequences, the 77-token cross-attention).
* ``"plain"``: scores and softmax written out with einsum over the whole (B, heads, Lq, Lk)
  score tensor; softmax always in float32.
* ``"chunked"``: the same arithmetic one head and one block of `CHUNK` queries at a time
  (`lax.map`), so no score tensor larger than (CHUNK, Lk) exists. On a 2-core CPU, self-attention
  over a 64x64 latent (4096 tokens, 8 heads of 40) ran 2.9x (batch 2) to 4.3x (batch 4) faster
  than "plain", which spends its time writing and reading the 512 MiB-per-image score tensor.
* ``"dot_product"``: `jax.nn.dot_product_attention` with XLA's implementation (the score tensor is
  materialised, as in "plain").
* ``"cudnn"``: `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused flash
  attention. GPU only, bf16/fp16 q/k/v, head dim a multiple of 8 and at most 256 (`cudnn_accepts`).
* ``"tpu_flash"``: the Pallas TPU flash-attention kernel (`jaxcontrol.models.tpu_attention`). TPU only.

The portable kernels are tested for parity against PyTorch and against each other on the CPU; the
cuDNN and TPU kernels can only run on their hardware (the TPU kernel's numerics are tested on the
CPU in Pallas' interpret mode). What "auto" picks, and the precision of each, is in docs/PRECISION.md.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ..platform import backend as _platform
from .layers import GroupNorm, LayerNorm, conv

Dtype = Any
ATTENTION_IMPLS = ("auto", "plain", "chunked", "dot_product", "cudnn", "tpu_flash")
CHUNK = 1024  # queries per block of the "chunked" kernel
CHUNKED_MIN_QUERIES = 256  # "auto" on the CPU: "chunked" from this many queries on, "plain" below
_PLATFORM_ONLY = {"cudnn": "gpu", "tpu_flash": "tpu"}


def check_attention_impl(impl: str) -> None:
    """Raise `ValueError` unless `impl` is one of `ATTENTION_IMPLS`."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")


def cudnn_accepts(q_shape, k_shape, dtype, mask) -> bool:
    """Whether cuDNN's fused attention takes this call: bf16/fp16 q/k/v, a head dim that is a
    multiple of 8 and at most 256 (Hopper's limit), q and k with the same head dim. Masks are
    accepted (boolean, broadcast to (B, heads, Lq, Lk))."""
    d = q_shape[-1]
    return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and d % 8 == 0 and d <= 256 and k_shape[-1] == d


def select_impl(q_shape, k_shape, dtype, *, upcast: bool = False, mask=None, platform: str | None = None) -> str:
    """The kernel "auto" runs for q (B, Lq, heads, D) and k (B, Lk, heads, D) of `dtype` on `platform`
    (default: the default backend's):

    * GPU: "cudnn" where `cudnn_accepts` and the layer is not `upcast` (an upcast layer asks for
      float32 scores, which it keeps on XLA); otherwise "plain".
    * TPU: "tpu_flash" where `tpu_attention.tpu_flash_supported` (long self-attention, no mask);
      otherwise "plain" (the 77-token cross-attention, short sequences).
    * CPU: "chunked" for Lq >= `CHUNKED_MIN_QUERIES`, else "plain".
    """
    platform = platform or _platform()
    if platform == "gpu" and not upcast and cudnn_accepts(q_shape, k_shape, dtype, mask):
        return "cudnn"
    if platform == "tpu":
        from .tpu_attention import tpu_flash_supported

        if tpu_flash_supported(q_shape, k_shape, jnp.float32 if upcast else dtype, mask):
            return "tpu_flash"
        return "plain"
    if platform == "cpu" and q_shape[1] >= CHUNKED_MIN_QUERIES:
        return "chunked"
    return "plain"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    impl: str = "auto",
    upcast: bool = False,
    scale: float | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Scaled dot-product attention: q (B, Lq, heads, D), k and v (B, Lk, heads, D) -> (B, Lq, heads, D).

    softmax(q k^T * scale) v with `scale` default D**-0.5, as `torch.nn.functional.scaled_dot_product_attention`
    in diffusers' `AttnProcessor2_0`. `mask` is boolean, broadcastable to (B, heads, Lq, Lk), True
    where attention is allowed. Scores and softmax are float32 in "plain" and "chunked" (cuDNN and
    the TPU kernel accumulate in float32); `upcast` (diffusers' `upcast_attention`) also casts q and
    k to float32 first. The result has `v`'s dtype (q, k, v share one). Raises `ValueError` for an
    `impl` not in `ATTENTION_IMPLS`, or for "cudnn" / "tpu_flash" off their platform or on a call
    their kernel does not take.
    """
    check_attention_impl(impl)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if impl == "auto":
        impl = select_impl(q.shape, k.shape, q.dtype, upcast=upcast, mask=mask)
    if impl in _PLATFORM_ONLY and _platform() != _PLATFORM_ONLY[impl]:
        raise ValueError(f"attention_impl={impl!r} runs on {_PLATFORM_ONLY[impl]} only, this is {_platform()}; "
                         "use 'auto'")
    if impl == "cudnn":
        if not cudnn_accepts(q.shape, k.shape, q.dtype, mask):
            raise ValueError(f"attention_impl='cudnn' takes bf16/fp16 q/k/v with a head dim that is a multiple of 8 "
                             f"and <= 256; got {q.dtype} with head dim {q.shape[-1]}")
        return jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask, implementation="cudnn")
    if impl == "tpu_flash":
        from .tpu_attention import tpu_flash_attention

        if upcast:
            q, k = q.astype(jnp.float32), k.astype(jnp.float32)
        return tpu_flash_attention(q, k, v, scale=scale, mask=mask)
    if impl == "dot_product":
        if upcast:
            out = jax.nn.dot_product_attention(
                q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), scale=scale, mask=mask,
                implementation="xla",
            )
            return out.astype(v.dtype)
        return jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask, implementation="xla")
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    if impl == "chunked":
        return _chunked_attention(q, k, v, scale, mask)
    return jnp.einsum("bhqk,bkhd->bqhd", attention_probs(q, k, scale, mask).astype(v.dtype), v)


def attention_probs(q: jax.Array, k: jax.Array, scale: float, mask: jax.Array | None = None) -> jax.Array:
    """The "plain" kernel's probabilities: softmax(q k^T * scale) over keys, (B, heads, Lq, Lk)
    float32, for q (B, Lq, heads, D) and k (B, Lk, heads, D); `mask` as in `attention`."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def _chunked_attention(q, k, v, scale: float, mask, chunk: int = CHUNK):
    """"plain"'s arithmetic one block of `chunk` queries at a time: each block's scores are float32,
    soft-maxed and applied before the next block is computed.

    Outside a multi-device mesh the loop runs over every (sample, head) pair, scores (chunk, Lk)
    per block: the fastest form on a CPU. Traced under a multi-device mesh (`jax.set_mesh`, as
    `Pipeline` and the trainer do) it loops over heads only, the whole batch per block (scores
    (B, chunk, Lk)), so a batch sharded over the mesh stays sharded: looping over samples would
    make GSPMD gather the batch onto every device. Both forms give identical numbers.
    """
    b, lq, h, d = q.shape
    lk = k.shape[1]
    chunk = min(chunk, lq)
    blocks = -(-lq // chunk)
    pad = blocks * chunk - lq
    mesh = jax.sharding.get_abstract_mesh()
    n = 1 if mesh.empty or mesh.size == 1 else b  # samples per loop iteration: 1, or the whole batch
    groups = b * h // n
    if n == 1:  # (b, L, h, d) -> (b*h, 1, L, d): one (sample, head) pair per iteration
        split = lambda t: t.transpose(0, 2, 1, 3).reshape(groups, 1, t.shape[1], t.shape[3])  # noqa: E731
    else:  # (b, L, h, d) -> (h, b, L, d): one head of the whole batch per iteration
        split = lambda t: t.transpose(2, 0, 1, 3)  # noqa: E731
    qh = jnp.pad(split(q), ((0, 0), (0, 0), (0, pad), (0, 0)))
    qh = qh.reshape(groups, n, blocks, chunk, d).transpose(0, 2, 1, 3, 4)  # (groups, blocks, n, chunk, d)
    xs = (qh, split(k), split(v))
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, h, mask.shape[2], lk)).transpose(0, 2, 1, 3)  # (b, mq, h, lk)
        mask = split(mask)  # (groups, n, mq, lk)
        if mask.shape[2] == 1:  # one mask row for every query
            mask = jnp.broadcast_to(mask[:, None], (groups, blocks, n, 1, lk))
        else:  # a mask row per query, cut into the same blocks as the queries
            mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=True)
            mask = mask.reshape(groups, n, blocks, chunk, lk).transpose(0, 2, 1, 3, 4)
        xs = xs + (mask,)

    def one_group(args):
        qi, ki, vi = args[:3]

        def one_block(block):
            scores = jnp.einsum("nqd,nkd->nqk", block[0], ki, preferred_element_type=jnp.float32) * scale
            if len(block) > 1:
                scores = jnp.where(block[1], scores, jnp.finfo(jnp.float32).min)
            return jnp.einsum("nqk,nkd->nqd", jax.nn.softmax(scores, axis=-1).astype(vi.dtype), vi)

        return jax.lax.map(one_block, (qi,) + tuple(args[3:]))

    out = jax.lax.map(one_group, xs)  # (groups, blocks, n, chunk, dv)
    dv = v.shape[-1]
    if n == b:  # groups are heads
        out = out.transpose(2, 1, 3, 0, 4)  # (b, blocks, chunk, h, dv)
    else:  # groups are (sample, head) pairs, n == 1
        out = out.reshape(b, h, blocks, chunk, dv).transpose(0, 2, 3, 1, 4)
    return out.reshape(b, blocks * chunk, h, dv)[:, :lq]


ATTENTION_MAPS = "attention_maps"  # the Flax collection captured attention probabilities are sown into


@dataclasses.dataclass(frozen=True)
class AttentionControl:
    """What chosen attention layers do besides attending, fixed at trace time (hashable, static).

    Layers are named as diffusers names its attention modules (`attention_layers` lists them):
    ``down_blocks.1.attentions.0.transformer_blocks.0.attn2``, ``mid_block.attentions.0.
    transformer_blocks.0.attn1``.

    * `capture`: these layers also compute their attention probabilities explicitly (B, heads, Lq,
      Lk) in float32 and sow them into the `ATTENTION_MAPS` collection; apply with
      ``mutable=[ATTENTION_MAPS]`` to get them back (`models.forward.model_forward(...,
      attention=control)` returns them by layer name). Their output is the same attention, through
      the "plain" kernel.
    * `identity`: these (self-)attention layers output their values instead of attending, softmax(...)
      replaced by the identity matrix: ``to_out(to_v(x))`` (Perturbed-Attention Guidance, diffusers'
      `PAGIdentitySelfAttnProcessor2_0`).

    Layers named in neither run as before, and a model built without a control (the default)
    traces exactly the program it traced before this existed.
    """

    capture: tuple[str, ...] = ()
    identity: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "capture", tuple(sorted(set(self.capture))))
        object.__setattr__(self, "identity", tuple(sorted(set(self.identity))))

    def __bool__(self) -> bool:
        return bool(self.capture or self.identity)


def layer_name(path: tuple[str, ...]) -> str:
    """A Flax module path as diffusers' module name: ('down_blocks_1', 'attentions_0',
    'transformer_blocks_0', 'attn2') -> 'down_blocks.1.attentions.0.transformer_blocks.0.attn2'."""
    return ".".join(re.sub(r"_(\d+)$", r".\1", part) for part in path)


class Attention(nn.Module):
    """diffusers' `Attention`: `to_q`, `to_k`, `to_v` (no bias by default) and `to_out.0`.

    Call: x (B, L, query_dim) and optional context (B, S, Dc) (default: x, self-attention) ->
    (B, L, query_dim) in `dtype`; `heads` x `dim_head` is the inner width. `control` (an
    `AttentionControl`) may ask this layer, by its diffusers name, to sow its probabilities or to
    be replaced by the identity.
    """

    heads: int
    dim_head: int
    query_dim: int
    bias: bool = False
    upcast_attention: bool = False
    attention_impl: str = "auto"
    control: AttentionControl | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        inner = self.heads * self.dim_head
        dense = lambda n, name, bias: nn.Dense(  # noqa: E731
            n, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        name = layer_name(self.path) if self.control else ""
        q = dense(inner, "to_q", self.bias)(x)
        k = dense(inner, "to_k", self.bias)(context)
        v = dense(inner, "to_v", self.bias)(context)
        if self.control and name in self.control.identity:
            if v.shape[1] != x.shape[1]:
                raise ValueError(f"attention layer {name} attends to {v.shape[1]} context tokens, not its own "
                                 f"{x.shape[1]}: only self-attention can be replaced by the identity")
            return dense(self.query_dim, "to_out_0", True)(v)
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, self.dim_head)  # noqa: E731
        if self.control and name in self.control.capture:
            out = self._attend_and_sow(split(q), split(k), split(v))
        else:
            out = attention(split(q), split(k), split(v), impl=self.attention_impl, upcast=self.upcast_attention)
        out = out.reshape(*out.shape[:-2], inner)
        return dense(self.query_dim, "to_out_0", True)(out)

    def _attend_and_sow(self, q, k, v):
        """"plain" attention whose float32 probabilities (B, heads, Lq, Lk) are sown as `probs`."""
        if self.upcast_attention:
            q, k = q.astype(jnp.float32), k.astype(jnp.float32)
        probs = attention_probs(q, k, q.shape[-1] ** -0.5)
        self.sow(ATTENTION_MAPS, "probs", probs)
        return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


class FeedForward(nn.Module):
    """diffusers' `FeedForward` with GEGLU (`ff.net.0.proj`, `ff.net.2`), exact-erf GELU as in PyTorch:
    (..., dim) -> (..., dim) through an inner width of `dim * mult`."""

    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inner = self.dim * self.mult
        h = GEGLU(inner, dtype=self.dtype, param_dtype=self.param_dtype, name="net_0")(x)
        return nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="net_2")(h)


class GEGLU(nn.Module):
    """diffusers' `GEGLU` (Shazeer 2020): `proj` to 2 x `features`, then hidden * gelu(gate) (exact erf);
    (..., in) -> (..., features)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.features * 2, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
        hidden, gate = jnp.split(h, 2, axis=-1)
        return hidden * nn.gelu(gate, approximate=False)


class BasicTransformerBlock(nn.Module):
    """diffusers' `BasicTransformerBlock`: self-attention, cross-attention and GEGLU feed-forward,
    each pre-LayerNorm (eps 1e-5) with a residual.

    Call: x (B, L, dim), context (B, S, Dc) -> (B, L, dim). With `only_cross_attention` the first
    attention also attends to `context`.
    """

    dim: int
    heads: int
    dim_head: int
    only_cross_attention: bool = False
    upcast_attention: bool = False
    attention_impl: str = "auto"
    attention_control: AttentionControl | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = lambda name: Attention(  # noqa: E731
            self.heads,
            self.dim_head,
            self.dim,
            upcast_attention=self.upcast_attention,
            attention_impl=self.attention_impl,
            control=self.attention_control,
            name=name,
            **kw,
        )
        h = LayerNorm(1e-5, name="norm1", **kw)(x)
        x = attn("attn1")(h, context if self.only_cross_attention else None) + x
        h = LayerNorm(1e-5, name="norm2", **kw)(x)
        x = attn("attn2")(h, context) + x
        h = LayerNorm(1e-5, name="norm3", **kw)(x)
        return FeedForward(self.dim, name="ff", **kw)(h) + x


class Transformer2DModel(nn.Module):
    """diffusers' `Transformer2DModel`, the spatial transformer: GroupNorm (eps 1e-6), `proj_in`,
    transformer blocks, `proj_out`, residual.

    `proj_in`/`proj_out` are 1x1 convolutions (SD-1.x) or linear layers (`use_linear_projection`, SD-2.x).
    Call: x (B, H, W, C) NHWC, context (B, S, Dc) -> (B, H, W, C); the blocks work on H*W tokens
    of width `heads * dim_head`. Raises `ValueError` when C is not divisible by `norm_num_groups`.
    """

    heads: int
    dim_head: int
    num_layers: int = 1
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    attention_impl: str = "auto"
    attention_control: AttentionControl | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head
        residual = x
        x = GroupNorm(self.norm_num_groups, 1e-6, name="norm", **kw)(x)
        if self.use_linear_projection:
            x = nn.Dense(inner, name="proj_in", **kw)(x.reshape(b, h * w, c))
        else:
            x = conv(inner, 1, name="proj_in", **kw)(x).reshape(b, h * w, inner)
        for i in range(self.num_layers):
            x = BasicTransformerBlock(
                inner,
                self.heads,
                self.dim_head,
                only_cross_attention=self.only_cross_attention,
                upcast_attention=self.upcast_attention,
                attention_impl=self.attention_impl,
                attention_control=self.attention_control,
                name=f"transformer_blocks_{i}",
                **kw,
            )(x, context)
        if self.use_linear_projection:
            x = nn.Dense(c, name="proj_out", **kw)(x).reshape(b, h, w, c)
        else:
            x = conv(c, 1, name="proj_out", **kw)(x.reshape(b, h, w, inner))
        return x + residual
