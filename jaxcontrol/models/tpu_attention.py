"""Fused attention on TPU: the Pallas splash-attention kernel, in jaxcontrol's layout.

`tpu_flash_attention(q, k, v, scale=...)` computes what `attention.attention(..., impl="plain")`
computes, softmax(q k^T * scale) v over q (B, Lq, heads, D) and k, v (B, Lk, heads, D), with the
kernel of `jax.experimental.pallas.ops.tpu.splash_attention`: no (Lq, Lk) score tensor is ever
written to memory, scores and the running softmax are float32 inside the kernel, and it has its own
backward kernels (a `custom_vjp`), so training can differentiate through it.
`tpu_flash_unsupported_reason` / `tpu_flash_supported` are the rule a dispatcher uses to send a
call here: self-attention over at least `TPU_MIN_SEQ` tokens (the 64x64 and 32x32 latents of
SD-1.5 at 512 px), never the 77-token cross-attention nor masked (CLIP) attention, which stay on XLA.

Why splash rather than `pallas.ops.tpu.flash_attention` (jax 0.10.2 ships both):

* splash takes `interpret=`, which runs the same kernel body through Pallas' HLO interpreter on
  any backend; `flash_attention` has no such argument, so on the CPU it only runs under
  `pltpu.force_tpu_interpret_mode()`, which simulates TPU memory with host callbacks: one
  (1, 8, 1024, 40) forward, compilation included, took 12.3 s there against 0.8 s for splash's
  interpreter (2-core CPU). The tests of this module therefore run the kernel that TPUs run, in
  seconds, not a stand-in.
* splash is the kernel maintained for TPU training (MaxText uses it); a full mask (`FullMask`)
  costs no mask work in the kernel; its backward has separate dq and dkv kernels.

What this wrapper adds around the kernel:

* Layout: (B, L, heads, D) -> the kernel's (heads, L, D) per example, `vmap`ped over the batch.
* Scale: splash has no scale argument and takes pre-scaled queries, so q is multiplied by `scale`
  (in float32, then cast back to the compute dtype). In bfloat16 that adds one rounding of q.
* Head dims are zero-padded to a multiple of `HEAD_DIM_ALIGN` (128, the TPU lane width): 40 and
  64 -> 128, 160 -> 256. Zero columns of q and k add nothing to the scores; v's zero columns give
  zero output columns, which are cut off. Earlier splash versions refused head dims that are not
  multiples of 128 (jax-ml/jax#30861); jax 0.10.2's accepts them, but whether Mosaic lowers
  e.g. (512, 40) blocks, and how fast, could not be checked without a TPU, so the lane-aligned
  layout every TPU kernel supports is used. The MXU works on 128-wide tiles, so the padding
  mostly costs memory traffic for q, k, v, which is small next to the L^2 work.
* Sequence lengths are padded to a multiple of the block sizes (default: 512, 256 or 128, the
  largest that divides the length rounded up to 128). Padded queries are zeros and are cut off;
  padded keys are excluded with splash's segment ids (queries and real keys in segment 0, padded
  keys in segment 1), so e.g. a 72x72 latent (5184 tokens, padded to 5248) is exact too.
* Batch sharding: Pallas TPU kernels cannot be partitioned by GSPMD (lowering a `pallas_call`
  inside a multi-device `jit` raises "Mosaic kernels cannot be automatically partitioned"), so
  on a multi-device mesh the kernel runs under `jax.shard_map`, each device on its own slice of
  the batch. The mesh is `mesh=` if given, else the mesh set with `jax.set_mesh` (read with
  `jax.sharding.get_abstract_mesh()`, which is also how a call inside an enclosing `shard_map`
  sees that its axes are already manual); with neither, the kernel is called as is (right on one
  device, and an error at lowering on several TPUs, so a caller on a multi-device mesh must pass
  `mesh` or trace under `jax.set_mesh(mesh)`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

TPU_MIN_SEQ = 1024  # fewest query and key tokens for which the fused kernel is chosen (32x32 latents)
HEAD_DIM_ALIGN = 128  # head dims are zero-padded to a multiple of this (the TPU lane width)
MAX_HEAD_DIM = 256  # largest head dim after padding that the predicate accepts
SEQ_ALIGN = 128  # sequence lengths are padded to a multiple of this before blocks are chosen
DEFAULT_BLOCKS = (512, 256, 128)  # block sizes tried, largest first, for the padded sequence length
BATCH_AXES = ("data", "fsdp")  # mesh axes the batch may be split over, in this order
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)


def tpu_flash_unsupported_reason(
    q_shape: Sequence[int], k_shape: Sequence[int], dtype: Any, mask: Any = None
) -> str | None:
    """Why `tpu_flash_attention` should not take this call, or None when it should.

    q_shape (B, Lq, heads, D), k_shape (B, Lk, heads, D) as in `attention.attention`; `dtype` the
    compute dtype; `mask` the call's mask (anything but None is refused). Accepted: rank-4 shapes
    with equal batch and heads, equal q/k head dims, Lq and Lk both >= `TPU_MIN_SEQ`, the head dim
    padded to `HEAD_DIM_ALIGN` at most `MAX_HEAD_DIM`, dtype float32 or bfloat16, no mask. Lengths
    need not divide a block size (they are padded). Shapes only: the platform is the caller's
    decision. Raises nothing.
    """
    if len(q_shape) != 4 or len(k_shape) != 4:
        return f"q and k must be (B, L, heads, D), got shapes {tuple(q_shape)} and {tuple(k_shape)}"
    (b, lq, h, d), (bk, lk, hk, dk) = q_shape, k_shape
    if (b, h, d) != (bk, hk, dk):
        return f"q {tuple(q_shape)} and k {tuple(k_shape)} differ in batch, heads or head dim"
    if mask is not None:
        return "a mask was given; the fused TPU kernel is used for unmasked attention only"
    if min(lq, lk) < TPU_MIN_SEQ:
        return f"sequence lengths Lq={lq}, Lk={lk}: the fused TPU kernel needs both >= TPU_MIN_SEQ={TPU_MIN_SEQ}"
    if _round_up(d, HEAD_DIM_ALIGN) > MAX_HEAD_DIM:
        return f"head dim {d} pads to {_round_up(d, HEAD_DIM_ALIGN)} > MAX_HEAD_DIM={MAX_HEAD_DIM}"
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = repr(dtype)
    if name not in [jnp.dtype(t).name for t in SUPPORTED_DTYPES]:
        return f"dtype {name}: the fused TPU kernel takes float32 or bfloat16"
    return None


def tpu_flash_supported(q_shape: Sequence[int], k_shape: Sequence[int], dtype: Any, mask: Any = None) -> bool:
    """True when `tpu_flash_unsupported_reason(q_shape, k_shape, dtype, mask)` is None (its rule).
    Raises nothing."""
    return tpu_flash_unsupported_reason(q_shape, k_shape, dtype, mask) is None


def default_block_sizes(lq: int, lk: int):
    """Splash `BlockSizes` for query and key lengths `lq`, `lk` (forward and both backward kernels):
    per side, the largest of `DEFAULT_BLOCKS` dividing the length rounded up to `SEQ_ALIGN`. Not
    tuned on hardware (no TPU was available); pass `block_sizes=` to `tpu_flash_attention` to tune."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    bq, bkv = _pick_block(lq), _pick_block(lk)
    return splash.BlockSizes(
        block_q=bq, block_kv=bkv, block_kv_compute=bkv,
        block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
        block_q_dq=bq, block_kv_dq=bkv,
    )


def tpu_flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
    mask: jax.Array | None = None,
    interpret: bool = False,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    block_sizes: Any = None,
    batch_axes: Sequence[str] | None = None,
) -> jax.Array:
    """softmax(q k^T * scale) v with the Pallas splash kernel: q (B, Lq, heads, D), k and v
    (B, Lk, heads, D) -> (B, Lq, heads, D) in v's dtype.

    The same function as `attention.attention(q, k, v, impl="plain", scale=scale)`; `scale`
    defaults to D**-0.5. q, k and v may differ in dtype (diffusers' `upcast_attention` gives float32
    q and k with bfloat16 v): the kernel runs in their promoted dtype, accumulating in float32, and
    the result is cast to v's dtype. `interpret=True` runs the kernel through Pallas' interpreter
    (any backend: how the tests run it on the CPU); False compiles it with Mosaic, TPU only.
    `mesh`: see the module docstring (default: the mesh of `jax.set_mesh`, if any); the batch is
    split over `batch_axes` (default: those of `BATCH_AXES` the mesh has and that are not already
    manual), dropping trailing axes until their sizes' product divides B, and replicated over the
    rest. `block_sizes`: a splash `BlockSizes` overriding `default_block_sizes`; lengths are padded
    to a multiple of its blocks. Differentiable (the kernel's own backward; first order only).

    Raises `ValueError` for a mask (masked attention is not supported here: see
    `tpu_flash_unsupported_reason`), for shapes that are not (B, L, heads, D) with matching batch,
    heads and head dims, and for `batch_axes` the mesh does not have.
    """
    if mask is not None:
        raise ValueError(f"tpu_flash_attention takes no mask (got one of shape {jnp.shape(mask)}); "
                         "masked attention goes to attention(impl='plain' or 'chunked')")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be (B, L, heads, D), got shapes {q.shape}, {k.shape}, {v.shape}")
    b, lq, h, d = q.shape
    if k.shape[0] != b or k.shape[2] != h or k.shape[3] != d or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: batch and heads must match, "
                         "k's head dim must equal q's and v must have k's (B, Lk, heads)")
    out_dtype = v.dtype
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    scale = d**-0.5 if scale is None else float(scale)
    lk = k.shape[1]
    if block_sizes is None:
        block_sizes = default_block_sizes(lq, lk)
    lq_pad = _round_up(lq, _lcm(block_sizes.block_q, block_sizes.block_q_dkv, block_sizes.block_q_dq))
    lk_pad = _round_up(lk, _lcm(block_sizes.block_kv, block_sizes.block_kv_compute, block_sizes.block_kv_dkv,
                                block_sizes.block_kv_dkv_compute, block_sizes.block_kv_dq))
    d_pad = _round_up(d, HEAD_DIM_ALIGN)
    dv_pad = _round_up(v.shape[3], HEAD_DIM_ALIGN)

    def to_kernel(t, length, width, factor=None):
        """(B, L, heads, D) -> (B, heads, length, width), zero-padded, in the compute dtype."""
        if factor is not None:
            t = (t.astype(jnp.float32) * factor)
        t = t.astype(dtype).transpose(0, 2, 1, 3)
        return jnp.pad(t, ((0, 0), (0, 0), (0, length - t.shape[2]), (0, width - t.shape[3])))

    qk = to_kernel(q, lq_pad, d_pad, scale)
    kk = to_kernel(k, lk_pad, d_pad)
    vk = to_kernel(v, lk_pad, dv_pad)
    kernel = _splash_kernel(h, lq_pad, lk_pad, block_sizes, bool(interpret))
    segment_ids = None
    if lk_pad != lk:  # padded keys are segment 1, which no query (segment 0) attends to
        from jax.experimental.pallas.ops.tpu import splash_attention as splash

        segment_ids = splash.SegmentIds(q=np.zeros(lq_pad, np.int32), kv=(np.arange(lk_pad) >= lk).astype(np.int32))

    def per_shard(qs, ks, vs):
        one = lambda qi, ki, vi: kernel(qi, ki, vi, segment_ids=segment_ids)
        return jax.vmap(one)(qs, ks, vs)

    out = _shard_over_batch(per_shard, (qk, kk, vk), mesh, batch_axes)
    out = out[:, :, :lq, : v.shape[3]].transpose(0, 2, 1, 3)
    return out.astype(out_dtype)


def _shard_over_batch(fn, args, mesh, batch_axes):
    """fn(*args) for arrays with the batch first, under `jax.shard_map` over the batch axes of
    `mesh` (or of the context mesh) when there is a multi-device mesh with axes not yet manual."""
    context = jax.sharding.get_abstract_mesh()
    if mesh is None:
        mesh = None if context.empty else context
    if mesh is None or math.prod(mesh.shape.values()) == 1:
        return fn(*args)
    manual = set(getattr(context, "manual_axes", ()) or ()) if not context.empty else set()
    free = [a for a in mesh.axis_names if a not in manual]
    if not free:  # already inside a shard_map over every axis: each device holds its own block
        return fn(*args)
    if batch_axes is None:
        axes = [a for a in BATCH_AXES if a in free]
    else:
        axes = list(batch_axes)
        bad = [a for a in axes if a not in free]
        if bad:
            raise ValueError(f"batch_axes {tuple(batch_axes)}: {bad} not among the mesh's free axes {free}")
    batch = args[0].shape[0]
    while axes and batch % math.prod(mesh.shape[a] for a in axes):
        axes.pop()
    spec = P(tuple(axes) if axes else None)
    sharded = jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec,
                            axis_names=set(free), check_vma=False)
    return sharded(*args)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, lq: int, lk: int, block_sizes, interpret: bool):
    """The splash multi-head kernel for a full (unmasked) (lq, lk) attention of `heads` heads,
    (heads, lq, D) x (heads, lk, D) -> (heads, lq, D); cached, as building it processes the mask.
    Its mask tables are built as concrete arrays even when called while tracing, so the cached
    kernel holds no tracer of the trace that first built it."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    mask = splash.MultiHeadMask([splash.FullMask((lq, lk)) for _ in range(heads)])
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(mask, block_sizes=block_sizes, head_shards=1, q_seq_shards=1,
                                      interpret=interpret)


def _pick_block(length: int) -> int:
    padded = _round_up(length, SEQ_ALIGN)
    return next(blk for blk in DEFAULT_BLOCKS if padded % blk == 0)


def _lcm(*values: int | None) -> int:
    return math.lcm(*(v for v in values if v))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
