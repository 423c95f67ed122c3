"""CLIP text and vision encoders (transformers' `CLIPTextModel[WithProjection]`, `CLIPVisionModel[WithProjection]`).

    text, params = jaxcontrol.load_model("sd15/text_encoder")
    out = text.apply({"params": params}, input_ids)          # int32 (batch, length)
    context = out.last_hidden_state                            # what the U-Net cross-attends to
    # clip_skip=1 as diffusers does it: the penultimate layer's output through the final norm
    skipped = text.apply({"params": params}, out.hidden_states[-2], method=type(text).apply_final_layer_norm)

Parameter names mirror transformers' state dict with list indices joined by `_`, in the layout of
transformers 4.x (and of 5.x `*WithProjection` and `CLIPModel`): the transformer sits under
`text_model/` (`vision_model/`), a projection beside it (`text_projection`, `visual_projection`).
transformers 5.x saves a bare `CLIPTextModel` / `CLIPVisionModel` without that prefix;
`normalize_clip_keys` adds it, and `load_model` applies it to every CLIP folder, so both layouts load.

Configs are frozen dataclasses whose fields are the transformers `config.json` names. A full
`CLIPModel` config (nesting `text_config` / `vision_config`) is accepted too: `from_dict` takes
the tower's sub-config and the top-level `projection_dim`; `select_clip_tower` picks that tower's
tensors out of a `CLIPModel` checkpoint.

`clip_preprocess` is CLIP's image preprocessing (resize shortest side, centre crop, normalise)
written in JAX, so it is differentiable (CLIP guidance, aesthetic losses).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from ..errors import CheckpointError, ConfigError
from .attention import attention
from .configs import ModelConfig
from .layers import LayerNorm, conv, get_activation

if TYPE_CHECKING:  # a checkpoint view; the functions below only call keys(), renamed() and origin
    from ..convert.sources import TensorSource

Dtype = Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# the `hidden_act` values CLIP checkpoints use (implemented in layers.get_activation)
_ACTIVATIONS = ("quick_gelu", "gelu")

# keys every transformers config.json carries that describe the file, not the network
_BOOKKEEPING_KEYS = frozenset({"architectures", "model_type", "transformers_version", "dtype", "torch_dtype"})


# --- configs -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _CLIPConfigBase(ModelConfig):
    # the key under which a full `CLIPModel` config nests this tower's config
    _NESTED_KEY: ClassVar[str] = ""
    _POSITIVE: ClassVar[tuple[str, ...]] = (
        "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads",
        "vocab_size", "max_position_embeddings", "num_channels", "image_size", "patch_size")
    _POSITIVE_FLOAT: ClassVar[tuple[str, ...]] = ("layer_norm_eps",)

    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int | None = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    # transformers 4.x configs carry `dropout` (never applied by CLIP at inference)
    dropout: float = 0.0

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "config") -> "_CLIPConfigBase":
        """A transformers `config.json` of this tower, or of a full `CLIPModel` (nested sub-config).
        File bookkeeping keys (`architectures`, `model_type`, ...) are dropped; raises `ConfigError`
        as `ModelConfig.from_dict`, or when the nested sub-config is not an object."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: a {cls.__name__} must be a JSON object, found a {type(raw).__name__}")
        raw = dict(raw)
        if raw.get(cls._NESTED_KEY) is not None and not isinstance(raw[cls._NESTED_KEY], Mapping):
            raise ConfigError(f"{source}: {cls._NESTED_KEY} must be a JSON object, found a "
                              f"{type(raw[cls._NESTED_KEY]).__name__}")
        if isinstance(raw.get(cls._NESTED_KEY), Mapping):
            nested = dict(raw[cls._NESTED_KEY])
            # CLIPModel's projections use the top-level projection_dim
            if raw.get("projection_dim") is not None:
                nested["projection_dim"] = raw["projection_dim"]
            raw, source = nested, f"{source} [{cls._NESTED_KEY}]"
        raw = {k: v for k, v in raw.items() if k not in _BOOKKEEPING_KEYS}
        return super().from_dict(raw, source=source)  # type: ignore[return-value]

    @property
    def head_dim(self) -> int:
        """Width of one attention head: hidden_size // num_attention_heads."""
        return self.hidden_size // self.num_attention_heads

    def validate(self, source: str = "config") -> None:
        """`ModelConfig.validate`, then: `hidden_act` "quick_gelu" or "gelu", `hidden_size` divisible by
        `num_attention_heads`, a `layer_norm_eps` (raises `ConfigError`)."""
        super().validate(source)
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(
                f"{source}: hidden_act={self.hidden_act!r} is not supported by jaxcontrol's CLIP "
                f"(supported: {sorted(_ACTIVATIONS)})"
            )
        if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{source}: hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.layer_norm_eps is None:
            raise ConfigError(f"{source}: layer_norm_eps=None is not supported")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(_CLIPConfigBase):
    """transformers `CLIPTextConfig` (`model_type` "clip_text_model"). Defaults are transformers' own."""

    _class_name: ClassVar[str] = "CLIPTextModel"
    _NESTED_KEY: ClassVar[str] = "text_config"

    vocab_size: int = 49408
    max_position_embeddings: int = 77
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407

    def validate(self, source: str = "config") -> None:
        """The shared checks, then an int `eos_token_id` (the pooled output needs it); raises `ConfigError`."""
        super().validate(source)
        if isinstance(self.eos_token_id, bool) or not isinstance(self.eos_token_id, int):
            raise ConfigError(
                f"{source}: eos_token_id={self.eos_token_id!r} is not supported (the pooled output needs one int)"
            )

    @property
    def legacy_pooling(self) -> bool:
        """transformers' rule: `eos_token_id == 2` (configs from before transformers#24773) pools at argmax(ids)."""
        return self.eos_token_id == 2


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(_CLIPConfigBase):
    """transformers `CLIPVisionConfig` (`model_type` "clip_vision_model"). Defaults are transformers' own."""

    _class_name: ClassVar[str] = "CLIPVisionModel"
    _NESTED_KEY: ClassVar[str] = "vision_config"

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32

    @property
    def num_patches(self) -> int:
        """(image_size // patch_size) ** 2."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Tokens of the vision transformer: the patches and the class token."""
        return self.num_patches + 1

    def validate(self, source: str = "config") -> None:
        """The shared checks, then int `image_size` >= `patch_size` > 0; raises `ConfigError`."""
        super().validate(source)
        for name in ("image_size", "patch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{source}: {name}={value!r} is not supported (an int is needed)")
        if self.patch_size <= 0 or self.image_size < self.patch_size:
            raise ConfigError(f"{source}: patch_size={self.patch_size} does not fit image_size={self.image_size}")


# --- outputs -------------------------------------------------------------------------------------


@struct.dataclass
class CLIPTextOutput:
    """transformers' `CLIPTextModelOutput` / `BaseModelOutputWithPooling`, for B sequences of length L.

    `last_hidden_state` (B, L, hidden_size) after `final_layer_norm`; `pooler_output` (B, hidden_size),
    its row at the EOS token; `hidden_states`: num_hidden_layers + 1 arrays (B, L, hidden_size),
    the embeddings output and every layer's output (before `final_layer_norm`); `text_embeds`
    (B, projection_dim) with a projection, else None. Arrays in the model's `dtype`.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...]
    text_embeds: jax.Array | None = None


@struct.dataclass
class CLIPVisionOutput:
    """transformers' `CLIPVisionModelOutput` / `BaseModelOutputWithPooling`, with T = 1 + num_patches tokens.

    `last_hidden_state` (B, T, hidden_size), the class token first; `pooler_output` (B, hidden_size),
    `post_layernorm` of the class token; `hidden_states`: num_hidden_layers + 1 arrays (B, T,
    hidden_size), the encoder input (after `pre_layrnorm`) and every layer's output;
    `image_embeds` (B, projection_dim) with a projection, else None.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...]
    image_embeds: jax.Array | None = None


# --- shared encoder ------------------------------------------------------------------------------


class CLIPAttention(nn.Module):
    """transformers' `CLIPAttention`: `q_proj`, `k_proj`, `v_proj`, `out_proj` (all with bias).
    Call: x (B, L, hidden_size), boolean `mask` broadcastable to (B, heads, L, L) -> (B, L, hidden_size)."""

    config: _CLIPConfigBase
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dense = lambda name: nn.Dense(c.hidden_size, name=name, **kw)  # noqa: E731
        split = lambda t: t.reshape(*t.shape[:-1], c.num_attention_heads, c.head_dim)  # noqa: E731
        q, k, v = (split(dense(n)(x)) for n in ("q_proj", "k_proj", "v_proj"))
        out = attention(q, k, v, impl=self.attention_impl, mask=mask)
        return dense("out_proj")(out.reshape(*out.shape[:-2], c.hidden_size))


class CLIPMLP(nn.Module):
    """transformers' `CLIPMLP`: `fc1` -> `hidden_act` -> `fc2`; (..., hidden_size) -> (..., hidden_size)."""

    config: _CLIPConfigBase
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Dense(c.intermediate_size, name="fc1", **kw)(x)
        x = get_activation(c.hidden_act)(x)
        return nn.Dense(c.hidden_size, name="fc2", **kw)(x)


class CLIPEncoderLayer(nn.Module):
    """transformers' `CLIPEncoderLayer`, a pre-LayerNorm residual block: `layer_norm1`, `self_attn`,
    `layer_norm2`, `mlp`; (B, L, hidden_size) -> (B, L, hidden_size)."""

    config: _CLIPConfigBase
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(c.layer_norm_eps, name="layer_norm1", **kw)(x)
        x = x + CLIPAttention(c, self.attention_impl, name="self_attn", **kw)(h, mask)
        h = LayerNorm(c.layer_norm_eps, name="layer_norm2", **kw)(x)
        return x + CLIPMLP(c, name="mlp", **kw)(h)


class CLIPEncoder(nn.Module):
    """transformers' `CLIPEncoder`: `layers_0 ... layers_{n-1}`; returns every hidden state, the input
    then each layer's output (num_hidden_layers + 1 arrays of the input's shape)."""

    config: _CLIPConfigBase
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, ...]:
        states = [x]
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(
                self.config, self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers_{i}"
            )(x, mask)
            states.append(x)
        return tuple(states)


# --- text ----------------------------------------------------------------------------------------


class CLIPTextEmbeddings(nn.Module):
    """transformers' `CLIPTextEmbeddings`: `token_embedding` + `position_embedding`.

    Call: int input_ids (B, L), optional position_ids (default 0..L-1) -> (B, L, hidden_size).
    Raises `ValueError` when L > max_position_embeddings.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, position_ids: jax.Array | None = None) -> jax.Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        seq = input_ids.shape[-1]
        if seq > c.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq} exceeds max_position_embeddings={c.max_position_embeddings}"
            )
        if position_ids is None:
            position_ids = jnp.arange(seq, dtype=jnp.int32)[None, :]
        tokens = nn.Embed(c.vocab_size, c.hidden_size, name="token_embedding", **kw)(input_ids)
        positions = nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embedding", **kw)(position_ids)
        return tokens + positions


class CLIPTextTransformer(nn.Module):
    """transformers' `CLIPTextTransformer`: `embeddings`, `encoder` (causal), `final_layer_norm`.

    Call: int input_ids (B, L), optional attention_mask (B, L) (nonzero = token) and position_ids
    -> (last_hidden_state, pooler_output, hidden_states) as in `CLIPTextOutput`; the pooled row is
    the first EOS token's (argmax of the ids for `legacy_pooling` configs). Raises `ValueError`
    when input_ids is not 2-D.
    """

    config: CLIPTextConfig
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        """Flax: build `embeddings`, `encoder` and `final_layer_norm`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = CLIPTextEmbeddings(self.config, **kw)
        self.encoder = CLIPEncoder(self.config, self.attention_impl, **kw)
        self.final_layer_norm = LayerNorm(self.config.layer_norm_eps, **kw)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, tuple[jax.Array, ...]]:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, length); got {input_ids.shape}")
        batch, seq = input_ids.shape
        x = self.embeddings(input_ids, position_ids)
        mask = jnp.tril(jnp.ones((seq, seq), bool))[None, None]  # causal, (1, 1, q, k)
        if attention_mask is not None:
            mask = mask & (jnp.asarray(attention_mask) != 0)[:, None, None, :]
        states = self.encoder(x, mask)
        last = self.final_layer_norm(states[-1])
        ids = input_ids.astype(jnp.int32)
        if self.config.legacy_pooling:
            # the EOS token has the highest id in the original vocabulary (transformers' legacy rule)
            index = jnp.argmax(ids, axis=-1)
        else:
            # the first EOS (padding may repeat it); index 0 if a row holds none, as in transformers
            index = jnp.argmax((ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = last[jnp.arange(batch), index]
        return last, pooled, states

    def apply_final_layer_norm(self, hidden: jax.Array) -> jax.Array:
        """`final_layer_norm` of (B, L, hidden_size) states."""
        return self.final_layer_norm(hidden)


class CLIPTextModel(nn.Module):
    """transformers' `CLIPTextModel`: params `text_model/{embeddings,encoder,final_layer_norm}`.

    Call with int `input_ids` (batch, length), optionally a padding `attention_mask` (1 = token,
    combined with the causal mask) and `position_ids`. Returns a `CLIPTextOutput`. Raises
    `ValueError` for input_ids that are not (batch, length) or longer than max_position_embeddings,
    `ConfigError` for a `*WithProjection` model whose config has no `projection_dim`.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    with_projection: ClassVar[bool] = False

    def setup(self) -> None:
        """Flax: build `text_model` and, with a projection, `text_projection`."""
        if self.with_projection and not self.config.projection_dim:
            raise ConfigError(f"{type(self).__name__} needs projection_dim; the config has None")
        self.text_model = CLIPTextTransformer(
            self.config, self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype
        )
        if self.with_projection:
            self.text_projection = nn.Dense(
                self.config.projection_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype
            )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
    ) -> CLIPTextOutput:
        last, pooled, states = self.text_model(input_ids, attention_mask, position_ids)
        embeds = self.text_projection(pooled) if self.with_projection else None
        return CLIPTextOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=states, text_embeds=embeds)

    def apply_final_layer_norm(self, hidden: jax.Array) -> jax.Array:
        """`final_layer_norm` alone, for clip_skip: `model.apply(v, out.hidden_states[-2], method=...)`."""
        return self.text_model.apply_final_layer_norm(hidden)

    def dummy_inputs(self) -> tuple[jax.Array, ...]:
        """Smallest valid inputs, for `init` and `jax.eval_shape`: one (1, 1) int32 token."""
        return (jnp.zeros((1, 1), jnp.int32),)


class CLIPTextModelWithProjection(CLIPTextModel):
    """transformers' `CLIPTextModelWithProjection`: adds `text_projection` (no bias) -> `text_embeds`."""

    with_projection: ClassVar[bool] = True


# --- vision --------------------------------------------------------------------------------------


class CLIPVisionEmbeddings(nn.Module):
    """transformers' `CLIPVisionEmbeddings`: `patch_embedding` (conv, stride = kernel = patch, no bias),
    `class_embedding`, `position_embedding`.

    Call: pixel_values (B, image_size, image_size, num_channels) NHWC -> (B, 1 + num_patches,
    hidden_size), the class token first. Raises `ValueError` for any other input shape.
    """

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        c = self.config
        b, h, w, ch = pixel_values.shape
        if (h, w) != (c.image_size, c.image_size) or ch != c.num_channels:
            raise ValueError(
                f"pixel_values must have shape (batch, {c.image_size}, {c.image_size}, {c.num_channels}) "
                f"(NHWC); got {pixel_values.shape}"
            )
        class_embedding = self.param("class_embedding", nn.initializers.normal(1.0), (c.hidden_size,), self.param_dtype)
        patches = conv(
            c.hidden_size, c.patch_size, stride=c.patch_size, padding=0, use_bias=False,
            name="patch_embedding", dtype=self.dtype, param_dtype=self.param_dtype,
        )(pixel_values.astype(self.dtype))
        patches = patches.reshape(b, -1, c.hidden_size)  # row-major over the grid, as torch's flatten(2)
        cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (b, 1, c.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)
        positions = nn.Embed(
            c.num_positions, c.hidden_size, name="position_embedding", dtype=self.dtype, param_dtype=self.param_dtype
        )(jnp.arange(c.num_positions, dtype=jnp.int32))
        return x + positions[None]


class CLIPVisionTransformer(nn.Module):
    """transformers' `CLIPVisionTransformer`: `embeddings`, `pre_layrnorm` (transformers' spelling),
    `encoder`, `post_layernorm` (on the CLS token). Returns (last_hidden_state, pooler_output,
    hidden_states) as in `CLIPVisionOutput`."""

    config: CLIPVisionConfig
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array, tuple[jax.Array, ...]]:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = CLIPVisionEmbeddings(c, name="embeddings", **kw)(pixel_values)
        x = LayerNorm(c.layer_norm_eps, name="pre_layrnorm", **kw)(x)
        states = CLIPEncoder(c, self.attention_impl, name="encoder", **kw)(x)
        last = states[-1]
        pooled = LayerNorm(c.layer_norm_eps, name="post_layernorm", **kw)(last[:, 0])
        return last, pooled, states


class CLIPVisionModel(nn.Module):
    """transformers' `CLIPVisionModel` (ViT): params `vision_model/...`.

    Call with pixel_values (B, image_size, image_size, num_channels) NHWC, normalised as
    `clip_preprocess` does. Returns a `CLIPVisionOutput`. Raises `ValueError` for another input
    shape, `ConfigError` for a `*WithProjection` model whose config has no `projection_dim`.
    """

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    with_projection: ClassVar[bool] = False

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        last, pooled, states = CLIPVisionTransformer(self.config, self.attention_impl, name="vision_model", **kw)(
            pixel_values
        )
        embeds = None
        if self.with_projection:
            if not self.config.projection_dim:
                raise ConfigError(f"{type(self).__name__} needs projection_dim; the config has None")
            embeds = nn.Dense(self.config.projection_dim, use_bias=False, name="visual_projection", **kw)(pooled)
        return CLIPVisionOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=states, image_embeds=embeds)

    def dummy_inputs(self) -> tuple[jax.Array, ...]:
        """Smallest valid inputs, for `init` and `jax.eval_shape`: one zero image (1, S, S, C) float32."""
        c = self.config
        return (jnp.zeros((1, c.image_size, c.image_size, c.num_channels), jnp.float32),)


class CLIPVisionModelWithProjection(CLIPVisionModel):
    """transformers' `CLIPVisionModelWithProjection`: adds `visual_projection` (no bias) -> `image_embeds`."""

    with_projection: ClassVar[bool] = True


# --- checkpoint keys -----------------------------------------------------------------------------

_TOWER_PREFIXES = ("text_model.", "vision_model.")
_HEAD_KEYS = ("text_projection.", "visual_projection.", "logit_scale")
# keys that only a bare vision transformer has
_VISION_MARKERS = ("embeddings.class_embedding", "embeddings.patch_embedding.", "pre_layrnorm.", "post_layernorm.")


def normalize_clip_keys(source: TensorSource) -> TensorSource:
    """Put a bare CLIP transformer's keys under `text_model.` / `vision_model.`, our (and transformers 4.x') layout.

    transformers 5.x saves `CLIPTextModel` / `CLIPVisionModel` without the prefix
    (`embeddings.token_embedding.weight`); 4.x, every `*WithProjection` and `CLIPModel` with it
    (`text_model.embeddings.token_embedding.weight`). Keys already prefixed, and the projection
    heads, are left alone; the tower of bare keys is told by vision-only names. Raises
    `CheckpointError` when a key appears both with and without the prefix.
    """
    keys = source.keys()
    bare = [k for k in keys if not k.startswith(_TOWER_PREFIXES + _HEAD_KEYS)]
    if not bare:
        return source
    vision = any(k.startswith(_VISION_MARKERS) for k in bare)
    prefix = _TOWER_PREFIXES[1] if vision else _TOWER_PREFIXES[0]
    bare_set, key_set = set(bare), set(keys)
    mapping = {k: (prefix + k if k in bare_set else k) for k in keys}
    clashes = sorted(k for k in bare if prefix + k in key_set)
    if clashes:
        raise CheckpointError(
            f"{source.origin}: holds CLIP keys both with and without the {prefix!r} prefix: {clashes[:10]}"
        )
    return source.renamed(mapping)


def select_clip_tower(source: TensorSource, tower: str) -> TensorSource:
    """The `text` or `vision` tower of a full `CLIPModel` checkpoint (its transformer and projection).
    Raises `ValueError` for another `tower`, `CheckpointError` when the checkpoint has no such tower."""
    if tower not in ("text", "vision"):
        raise ValueError(f"tower must be 'text' or 'vision', got {tower!r}")
    prefix, head = ("text_model.", "text_projection.") if tower == "text" else ("vision_model.", "visual_projection.")
    keep = {k: k for k in source.keys() if k.startswith((prefix, head))}
    if not keep:
        raise CheckpointError(f"{source.origin}: no {tower} tower ({prefix}*) in this checkpoint")
    return source.renamed(keep)


# --- image preprocessing -------------------------------------------------------------------------


def clip_resize_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """transformers' `get_resize_output_image_size(default_to_square=False)`: (height, width) in
    pixels with the shortest side `size` and the other `int(size * long / short)`."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def clip_preprocess(
    images: jax.Array,
    image_size: int = 224,
    *,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    antialias: bool = True,
    clamp: bool = True,
) -> jax.Array:
    """CLIP's image preprocessing in JAX, differentiable: NHWC images (B, H, W, C) in [0, 1] ->
    normalised pixel values (B, image_size, image_size, C) float32.

    Steps as `CLIPImageProcessor`: resize so the shortest side is `image_size` (the long side is
    `int(image_size * long / short)`), centre crop `image_size` x `image_size` (offsets floor((n - size) / 2)),
    then `(x - mean) / std` per channel.

    Differences from transformers' PIL path (`CLIPImageProcessorPil`): the resize is
    `jax.image.resize(method="bicubic")`, Keys' cubic with a = -0.5 and, when `antialias`
    (default), the kernel stretched by the downscale factor with weights renormalised at the
    borders -- the same filter as PIL's BICUBIC, but in float32 over both axes at once, where PIL
    works on 8-bit values with fixed-point weights, in two passes, rounding and clamping the
    intermediate image to 0..255 (Pillow 13 picks the pass order by shape). Measured against
    PIL 13: on smooth images within about 1 8-bit level everywhere; on white noise (maximal
    bicubic overshoot) within 0.4 levels on average, but isolated pixels differ by up to ~20
    levels where PIL clamped its intermediate pass. `clamp` clips the resized image to [0, 1],
    as PIL's 8-bit output is (the gradient is zero where it clips). The torchvision backend of
    `CLIPImageProcessor` (not installed here, so not measured) resamples differently again.
    An image whose short side already is `image_size` is only cropped, not resampled.
    Raises `ValueError` when `images` is not 4-D or `mean` / `std` do not have C entries.
    """
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC (batch, height, width, channels); got shape {images.shape}")
    b, h, w, c = images.shape
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries for {c} channels")
    x = images.astype(jnp.float32)
    nh, nw = clip_resize_shape(h, w, image_size)
    if (nh, nw) != (h, w):
        x = jax.image.resize(x, (b, nh, nw, c), method="bicubic", antialias=antialias)
        if clamp:
            x = jnp.clip(x, 0.0, 1.0)
    top, left = (nh - image_size) // 2, (nw - image_size) // 2
    x = x[:, top : top + image_size, left : left + image_size, :]
    mean_a = jnp.asarray(np.asarray(mean, np.float32))
    std_a = jnp.asarray(np.asarray(std, np.float32))
    return (x - mean_a) / std_a


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPTextOutput",
    "CLIPVisionConfig",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "CLIPVisionOutput",
    "clip_preprocess",
    "clip_resize_shape",
    "normalize_clip_keys",
    "select_clip_tower",
]
