"""`UNet2DConditionModel`: the latent-diffusion U-Net of Stable Diffusion 1.x / 2.x, NHWC.

    out = unet.apply({"params": params}, sample, timesteps, encoder_hidden_states,
                     down_block_additional_residuals=..., mid_block_additional_residual=...,   # ControlNet
                     down_intrablock_additional_residuals=...)                               # T2I-Adapter

`sample` is (B, H, W, C) latents, `timesteps` a scalar or (B,), `encoder_hidden_states` (B, S, D).
The output is float32 whatever the compute dtype, so solvers always run in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from .attention import AttentionControl, check_attention_impl
from .configs import CROSS_ATTN_DOWN, CROSS_ATTN_UP, MID_CROSS_ATTN, UNet2DConditionConfig, _UNetFields
from .layers import GroupNorm, TimestepEmbedding, broadcast_timesteps, conv, get_activation, timestep_embedding
from .unet_blocks import DownBlock, MidBlock, UpBlock

Dtype = Any


def _block_kwargs(config: _UNetFields, module: nn.Module) -> dict:
    return dict(
        norm_num_groups=config.norm_num_groups,
        norm_eps=config.norm_eps,
        act_fn=config.act_fn,
        time_embedding_norm=config.resnet_time_scale_shift,
        use_linear_projection=config.use_linear_projection,
        upcast_attention=config.upcast_attention,
        attention_impl=module.attention_impl,
        attention_control=getattr(module, "attention_control", None),
        dtype=module.dtype,
        param_dtype=module.param_dtype,
    )


def embed_time(
    module: nn.Module,
    config: _UNetFields,
    timesteps: jax.Array,
    batch: int,
    timestep_cond: jax.Array | None,
    **embedding_kwargs: Any,
) -> jax.Array:
    """Sinusoidal projection and `time_embedding` MLP (built inside `module`'s compact scope):
    timesteps (scalar, (1,) or (batch,)) -> (batch, time_embed_dim) in `module.dtype`. Raises
    `ValueError` for another timesteps shape, or a missing `timestep_cond` when `cond_proj_dim` is given."""
    t = broadcast_timesteps(timesteps, batch)
    t_emb = timestep_embedding(
        t, config.block_out_channels[0], flip_sin_to_cos=config.flip_sin_to_cos, freq_shift=config.freq_shift
    ).astype(module.dtype)
    return TimestepEmbedding(
        config.time_embed_dim,
        act_fn=config.act_fn,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        name="time_embedding",
        **embedding_kwargs,
    )(t_emb, None if timestep_cond is None else timestep_cond.astype(module.dtype))


def embed_added_conditions(
    module: nn.Module,
    config: _UNetFields,
    batch: int,
    added_cond_kwargs: dict | None,
) -> jax.Array | None:
    """The additional embedding (built inside `module`'s compact scope) that `addition_embed_type`
    adds to the time embedding, (batch, time_embed_dim) in `module.dtype`, or None without one.

    "text_time" (SDXL): `added_cond_kwargs["text_embeds"]` (batch, P), the pooled text embedding,
    and `added_cond_kwargs["time_ids"]` (batch, K), the micro-conditioning (original size, crop
    top-left, target size; or the refiner's original size, crop, aesthetic score), each id
    Fourier-embedded to `addition_time_embed_dim`, concatenated after the text and fed to the
    `add_embedding` MLP; P + K * addition_time_embed_dim must be
    `projection_class_embeddings_input_dim`. Raises `ValueError` for a missing key, a wrong shape,
    or `added_cond_kwargs` given to a model without an additional embedding."""
    kind = config.addition_embed_type
    if kind is None:
        if added_cond_kwargs:
            raise ValueError(
                f"added_cond_kwargs {sorted(added_cond_kwargs)} given, but this model has no additional "
                f"embedding (addition_embed_type=None): they are used by SDXL-type models (\"text_time\")")
        return None
    need = {"text_embeds", "time_ids"}
    given = dict(added_cond_kwargs or {})
    if not need <= set(given):
        raise ValueError(
            f"this model has addition_embed_type={kind!r}: added_cond_kwargs must hold 'text_embeds' (batch, "
            f"pooled width) and 'time_ids' (batch, number of ids); missing {sorted(need - set(given))}")
    text_embeds, time_ids = jnp.asarray(given["text_embeds"]), jnp.asarray(given["time_ids"])
    dim = config.addition_time_embed_dim
    for name, value in (("text_embeds", text_embeds), ("time_ids", time_ids)):
        if value.ndim != 2 or value.shape[0] != batch:
            raise ValueError(f"added_cond_kwargs[{name!r}] must have shape ({batch}, n), got {tuple(value.shape)}")
    width = text_embeds.shape[1] + time_ids.shape[1] * dim
    if width != config.projection_class_embeddings_input_dim:
        raise ValueError(
            f"added_cond_kwargs: text_embeds {tuple(text_embeds.shape)} and time_ids {tuple(time_ids.shape)} give "
            f"{text_embeds.shape[1]} + {time_ids.shape[1]} x {dim} = {width} inputs to add_embedding, but the "
            f"model's projection_class_embeddings_input_dim is {config.projection_class_embeddings_input_dim}")
    time_embeds = timestep_embedding(
        time_ids.reshape(-1), dim, flip_sin_to_cos=config.flip_sin_to_cos, freq_shift=config.freq_shift
    ).reshape(batch, -1)
    features = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1).astype(module.dtype)
    return TimestepEmbedding(
        config.time_embed_dim, dtype=module.dtype, param_dtype=module.param_dtype, name="add_embedding"
    )(features)


def encoder_blocks(module: nn.Module, config: _UNetFields) -> tuple[list[DownBlock], MidBlock | None]:
    """The down blocks and mid block (None when `mid_block_type` is None) that the U-Net and the
    ControlNet share (same names, same params); call inside `module`'s compact scope."""
    kw = _block_kwargs(config, module)
    n = config.num_blocks
    downs = []
    for i, block_type in enumerate(config.down_block_types):
        downs.append(
            DownBlock(
                out_channels=config.block_out_channels[i],
                num_layers=config.layers_per_block_list[i],
                with_attention=block_type == CROSS_ATTN_DOWN,
                heads=config.heads_per_block[i],
                transformer_layers=config.transformer_layers_list[i],
                only_cross_attention=config.only_cross_attention_list[i],
                add_downsample=i < n - 1,
                downsample_padding=config.downsample_padding,
                name=f"down_blocks_{i}",
                **kw,
            )
        )
    mid = None
    if config.mid_block_type is not None:
        with_attention = config.mid_block_type == MID_CROSS_ATTN
        mid = MidBlock(
            out_channels=config.block_out_channels[-1],
            num_layers=1 if with_attention else 0,
            with_attention=with_attention,
            heads=config.heads_per_block[-1],
            transformer_layers=config.transformer_layers_list[-1],
            output_scale_factor=config.mid_block_scale_factor,
            name="mid_block",
            **kw,
        )
    return downs, mid


class UNet2DConditionModel(nn.Module):
    """Stable Diffusion's conditional U-Net, diffusers' `UNet2DConditionModel` (Rombach et al. 2022).

    Call:
      sample: latents (B, H, W, in_channels); H and W need not be multiples of the downsampling.
      timesteps: scalar, (1,) or (B,), in [0, num_train_timesteps) (fractions allowed).
      encoder_hidden_states: (B, S, cross_attention_dim) text embeddings.
      down_block_additional_residuals / mid_block_additional_residual: a ControlNet's outputs,
        given together: one residual per skip connection (each of its skip's batch and channels)
        and one of the mid block's output shape.
      down_intrablock_additional_residuals: T2I-Adapter features, shapes from
        `adapter_feature_shapes`; a feature of the mid block's output shape left over is added there.
      timestep_cond: (B, time_cond_proj_dim), required when the config sets that (LCM).
      added_cond_kwargs: {"text_embeds": (B, P), "time_ids": (B, K)} for SDXL's
        addition_embed_type="text_time" (see `embed_added_conditions`).
    Returns (B, H, W, out_channels) float32. Raises `ValueError` for a sample that is not NHWC with
    `in_channels`, one ControlNet residual without the other, a wrong residual count or shape, an
    adapter feature of the wrong shape, bad timesteps, a missing `timestep_cond`, or an unknown
    `attention_impl`.
    """

    config: UNet2DConditionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    attention_control: AttentionControl | None = None

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | float | int,
        encoder_hidden_states: jax.Array,
        down_block_additional_residuals: Sequence[jax.Array] | None = None,
        mid_block_additional_residual: jax.Array | None = None,
        down_intrablock_additional_residuals: Sequence[jax.Array] | None = None,
        timestep_cond: jax.Array | None = None,
        added_cond_kwargs: dict | None = None,
    ) -> jax.Array:
        cfg = self.config
        check_attention_impl(self.attention_impl)
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"sample must be NHWC with {cfg.in_channels} channels, got shape {tuple(sample.shape)}"
            )
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError(
                "ControlNet residuals come in pairs: pass both down_block_additional_residuals and "
                "mid_block_additional_residual (T2I-Adapter features go in down_intrablock_additional_residuals)"
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch = sample.shape[0]
        x = sample.astype(self.dtype)
        context = encoder_hidden_states.astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0

        emb = embed_time(
            self, cfg, timesteps, batch, timestep_cond,
            cond_proj_dim=cfg.time_cond_proj_dim, post_act_fn=cfg.timestep_post_act,
        )
        added = embed_added_conditions(self, cfg, batch, added_cond_kwargs)
        if added is not None:
            emb = emb + added
        if cfg.time_embedding_act_fn is not None:
            emb = get_activation(cfg.time_embedding_act_fn)(emb)

        x = conv(cfg.block_out_channels[0], cfg.conv_in_kernel, name="conv_in", **kw)(x)

        # --- down ----------------------------------------------------------------------------
        intrablock = list(down_intrablock_additional_residuals or [])
        downs, mid = encoder_blocks(self, cfg)
        skips = [x]
        n_adapter = len(intrablock)
        for i, block in enumerate(downs):
            if block.with_attention:
                extra = intrablock.pop(0) if intrablock else None
                if extra is not None:  # added after the block's last resnet/transformer pair, before its downsampler
                    _check_adapter_feature(n_adapter - len(intrablock) - 1, i, extra.shape,
                                           x.shape[:3] + (cfg.block_out_channels[i],))
                x, res = block(x, emb, context, additional_residual=extra)
            else:
                x, res = block(x, emb, context)
                if intrablock:
                    # diffusers adds in place to the block output, which is also its last skip
                    extra = intrablock.pop(0)
                    _check_adapter_feature(n_adapter - len(intrablock) - 1, i, extra.shape, x.shape)
                    x = x + extra.astype(x.dtype)
                    res[-1] = x
            skips.extend(res)

        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"down_block_additional_residuals has {len(down_block_additional_residuals)} entries, "
                    f"the U-Net has {len(skips)} skip connections"
                )
            for i, (s, r) in enumerate(zip(skips, down_block_additional_residuals)):
                if r.shape[0] != s.shape[0] or r.shape[-1] != s.shape[-1]:
                    raise ValueError(
                        f"down_block_additional_residuals[{i}] has shape {tuple(r.shape)}, "
                        f"expected {tuple(s.shape)}"
                    )
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_block_additional_residuals)]

        # --- mid -----------------------------------------------------------------------------
        if mid is not None:
            x = mid(x, emb, context)
            if intrablock and intrablock[0].shape == x.shape:  # T2I-Adapter-XL's last feature
                x = x + intrablock.pop(0).astype(x.dtype)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual.astype(x.dtype)

        # --- up ------------------------------------------------------------------------------
        kb = _block_kwargs(cfg, self)
        rev_channels = cfg.block_out_channels[::-1]
        rev_heads = cfg.heads_per_block[::-1]
        rev_layers = cfg.layers_per_block_list[::-1]
        rev_tlayers = cfg.transformer_layers_list[::-1]
        rev_only_cross = cfg.only_cross_attention_list[::-1]
        n = cfg.num_blocks
        for i, block_type in enumerate(cfg.up_block_types):
            num_layers = rev_layers[i] + 1
            block_skips, skips = skips[-num_layers:], skips[:-num_layers]
            is_final = i == n - 1
            x = UpBlock(
                out_channels=rev_channels[i],
                num_layers=num_layers,
                with_attention=block_type == CROSS_ATTN_UP,
                heads=rev_heads[i],
                transformer_layers=rev_tlayers[i],
                only_cross_attention=rev_only_cross[i],
                add_upsample=not is_final,
                name=f"up_blocks_{i}",
                **kb,
            )(x, block_skips, emb, context, upsample_size=None if is_final else skips[-1].shape[1:3])

        # --- out -----------------------------------------------------------------------------
        x = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x)
        x = get_activation(cfg.act_fn)(x)
        x = conv(cfg.out_channels, cfg.conv_out_kernel, name="conv_out", **kw)(x)
        return x.astype(jnp.float32)

    def dummy_inputs(self) -> tuple:
        """Smallest valid inputs, for `init` and `jax.eval_shape` (parameter shapes do not depend on them)."""
        cfg = self.config
        down = 2 ** (cfg.num_blocks - 1)
        args = (
            jnp.zeros((1, down, down, cfg.in_channels)),
            jnp.zeros((1,)),
            jnp.zeros((1, 1, cfg.cross_attention_dims[0])),
        )
        if cfg.time_cond_proj_dim is not None:
            args += (None, None, None, jnp.zeros((1, cfg.time_cond_proj_dim)))
        added = dummy_added_conditions(cfg)
        if added is not None:
            args += (None,) * (7 - len(args)) + (added,)
        return args


def dummy_added_conditions(config: _UNetFields) -> dict | None:
    """Zero `added_cond_kwargs` of batch 1 for a config with an additional embedding, else None:
    text_embeds of the width that leaves room for `time_ids` of 6 ids (SDXL base's layout; only
    the total width shapes the params)."""
    if config.addition_embed_type is None:
        return None
    ids = 6
    pooled = config.projection_class_embeddings_input_dim - ids * config.addition_time_embed_dim
    if pooled < 1:
        ids, pooled = 1, config.projection_class_embeddings_input_dim - config.addition_time_embed_dim
    return {"text_embeds": jnp.zeros((1, pooled)), "time_ids": jnp.zeros((1, ids))}


def _check_adapter_feature(k: int, block: int, got: tuple, expected: tuple) -> None:
    if tuple(got) != tuple(expected):
        raise ValueError(
            f"down_intrablock_additional_residuals[{k}] (a T2I-Adapter feature) has shape {tuple(got)}, but down "
            f"block {block} adds it where the U-Net's features are {tuple(expected)}. diffusers adds adapter "
            f"features inside CrossAttnDownBlock2D (after its last resnet/transformer pair, before its downsampler) "
            f"and after a DownBlock2D (after its downsampler), so the adapter's feature sizes must follow the U-Net's block layout"
        )


def adapter_feature_shapes(config, height: int, width: int) -> list[tuple[int, int, int]]:
    """(h, w, channels) that each down block of a U-Net (`UNet2DConditionConfig`) expects of a
    T2I-Adapter feature, for latents of `height` x `width`, in the order they are consumed: a
    `CrossAttnDownBlock2D` before its downsampler, a `DownBlock2D` after it (sizes halve rounding up)."""
    out = []
    n = len(config.down_block_types)
    for i, kind in enumerate(config.down_block_types):
        ch = config.block_out_channels[i]
        if "CrossAttn" in kind:
            out.append((height, width, ch))
        if i < n - 1:
            height, width = (height + 1) // 2, (width + 1) // 2
        if "CrossAttn" not in kind:
            out.append((height, width, ch))
    return out



@dataclasses.dataclass(frozen=True)
class AttentionLayer:
    """One attention layer of a U-Net or ControlNet: its diffusers `name`, whether it attends to
    the text (`cross`) or to the image itself, where it sits (`place`: "down", "mid" or "up"),
    its block index and resolution `level` (the latents are halved `level` times before it),
    its `heads`, and the (height, width) of its query map for latents of a given size (`size`)."""

    name: str
    cross: bool
    place: str
    block: int
    level: int
    heads: int
    round_up: bool = True  # halvings round up (downsample_padding 1, SD's) or down (padding 0)

    def size(self, height: int, width: int) -> tuple[int, int]:
        """The layer's query map for latents of `height` x `width`."""
        for _ in range(self.level):
            if self.round_up:
                height, width = (height + 1) // 2, (width + 1) // 2
            else:
                height, width = height // 2, width // 2
        return height, width


def attention_layers(config) -> list[AttentionLayer]:
    """Every attention layer of a U-Net (or a ControlNet: its down and mid blocks) built from
    `config`, in the order a forward pass runs them, named as diffusers names its modules
    (`down_blocks.1.attentions.0.transformer_blocks.0.attn1`). `attn1` is self-attention unless
    the block has `only_cross_attention`; `attn2` always attends to the text."""
    out = []
    n = config.num_blocks
    up = getattr(config, "downsample_padding", 1) != 0

    def add(prefix, place, block, level, heads, layers, tlayers, only_cross):
        for j in range(layers):
            for k in range(tlayers):
                base = f"{prefix}.attentions.{j}.transformer_blocks.{k}"
                out.append(AttentionLayer(f"{base}.attn1", bool(only_cross), place, block, level, heads, up))
                out.append(AttentionLayer(f"{base}.attn2", True, place, block, level, heads, up))

    for i, block_type in enumerate(config.down_block_types):
        if block_type == CROSS_ATTN_DOWN:
            add(f"down_blocks.{i}", "down", i, i, config.heads_per_block[i], config.layers_per_block_list[i],
                config.transformer_layers_list[i], config.only_cross_attention_list[i])
    if getattr(config, "mid_block_type", None) == MID_CROSS_ATTN:
        add("mid_block", "mid", 0, n - 1, config.heads_per_block[-1], 1, config.transformer_layers_list[-1], False)
    for i, block_type in enumerate(getattr(config, "up_block_types", ()) or ()):
        if block_type == CROSS_ATTN_UP:
            r = n - 1 - i
            add(f"up_blocks.{i}", "up", i, r, config.heads_per_block[r], config.layers_per_block_list[r] + 1,
                config.transformer_layers_list[r], config.only_cross_attention_list[r])
    return out
