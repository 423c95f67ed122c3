"""Model configs as frozen dataclasses whose field names are those of diffusers' `config.json`.

A diffusers folder's `config.json` loads with `Config.from_dict(json.load(f))`, with no translation
table. Fields we parse but do not implement are accepted only at their default value; anything else
raises `ConfigError` naming the field, so a model never silently runs with a feature missing.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar, Mapping, Sequence

from ..errors import ConfigError

CROSS_ATTN_DOWN = "CrossAttnDownBlock2D"
PLAIN_DOWN = "DownBlock2D"
CROSS_ATTN_UP = "CrossAttnUpBlock2D"
PLAIN_UP = "UpBlock2D"
MID_CROSS_ATTN = "UNetMidBlock2DCrossAttn"
MID_PLAIN = "UNetMidBlock2D"


def _freeze(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _per_block(value: Any, n: int, name: str) -> tuple:
    """An int/bool/None-or-sequence config value as one entry per block."""
    if isinstance(value, tuple | list):
        if len(value) != n:
            raise ConfigError(f"{name} has {len(value)} entries but the model has {n} down blocks")
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Base: `from_dict` / `to_dict` and the check that unimplemented fields are at their defaults."""

    # field name -> value(s) we implement; every other value of that field is refused
    _UNSUPPORTED: ClassVar[dict[str, tuple]] = {}
    _class_name: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "config") -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for key, value in raw.items():
            if key.startswith("_"):
                continue
            if key in names:
                kwargs[key] = _freeze(value)
            else:
                unknown.append(key)
        if unknown:
            warnings.warn(f"{source}: ignoring config keys {sorted(unknown)} unknown to {cls.__name__}", stacklevel=2)
        try:
            config = cls(**kwargs)
        except TypeError as e:  # pragma: no cover - dataclass arity errors
            raise ConfigError(f"{source}: {e}") from e
        config.validate(source)
        return config

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"_class_name": self._class_name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes: Any) -> "ModelConfig":
        new = dataclasses.replace(self, **{k: _freeze(v) for k, v in changes.items()})
        new.validate("config")
        return new

    def validate(self, source: str = "config") -> None:
        for name, allowed in self._UNSUPPORTED.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(
                    f"{source}: {name}={value!r} is not supported by jaxcontrol's {type(self).__name__} "
                    f"(supported: {list(allowed)})"
                )


@dataclasses.dataclass(frozen=True)
class _UNetFields(ModelConfig):
    """Fields the U-Net and the ControlNet share (the encoder half)."""

    in_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, PLAIN_DOWN)
    mid_block_type: str | None = MID_CROSS_ATTN
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    projection_class_embeddings_input_dim: int | None = None
    addition_embed_type_num_heads: int = 64

    # --- derived, per down block -------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.down_block_types)

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        # diffusers#2011: `attention_head_dim` historically means the *number of heads*.
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return _per_block(heads, self.num_blocks, "num_attention_heads/attention_head_dim")

    @property
    def layers_per_block_list(self) -> tuple[int, ...]:
        return _per_block(self.layers_per_block, self.num_blocks, "layers_per_block")

    @property
    def transformer_layers_list(self) -> tuple[int, ...]:
        return _per_block(self.transformer_layers_per_block, self.num_blocks, "transformer_layers_per_block")

    @property
    def cross_attention_dims(self) -> tuple[int, ...]:
        return _per_block(self.cross_attention_dim, self.num_blocks, "cross_attention_dim")

    @property
    def only_cross_attention_list(self) -> tuple[bool, ...]:
        return _per_block(self.only_cross_attention, self.num_blocks, "only_cross_attention")

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    def validate(self, source: str = "config") -> None:
        super().validate(source)
        n = self.num_blocks
        if len(self.block_out_channels) != n:
            raise ConfigError(
                f"{source}: block_out_channels has {len(self.block_out_channels)} entries "
                f"but down_block_types has {n}"
            )
        for t in self.down_block_types:
            if t not in (CROSS_ATTN_DOWN, PLAIN_DOWN):
                raise ConfigError(
                    f"{source}: down block type {t!r} is not supported (supported: {CROSS_ATTN_DOWN}, {PLAIN_DOWN})"
                )
        if self.mid_block_type not in (MID_CROSS_ATTN, MID_PLAIN, None):
            raise ConfigError(f"{source}: mid_block_type {self.mid_block_type!r} is not supported")
        if self.norm_num_groups is None:
            raise ConfigError(f"{source}: norm_num_groups=None (no output norm) is not supported")
        for name in ("heads_per_block", "layers_per_block_list", "transformer_layers_list",
                     "cross_attention_dims", "only_cross_attention_list"):
            getattr(self, name)  # raises ConfigError on a wrong length
        for i, (t, ch, heads) in enumerate(zip(self.down_block_types, self.block_out_channels, self.heads_per_block)):
            if ch % self.norm_num_groups:
                raise ConfigError(
                    f"{source}: block_out_channels[{i}]={ch} is not divisible by norm_num_groups={self.norm_num_groups}"
                )
            if t == CROSS_ATTN_DOWN and ch // heads == 0:
                raise ConfigError(f"{source}: block {i} has {ch} channels but {heads} attention heads")


_UNSUPPORTED_EMBEDDINGS = {
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default", "scale_shift"),
}


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig(_UNetFields):
    """diffusers `UNet2DConditionModel` config (SD-1.x / SD-2.x family). Defaults are diffusers' own."""

    _class_name: ClassVar[str] = "UNet2DConditionModel"
    _UNSUPPORTED: ClassVar[dict[str, tuple]] = {
        **_UNSUPPORTED_EMBEDDINGS,
        "dual_cross_attention": (False,),
        "time_embedding_type": ("positional",),
        "time_embedding_dim": (None,),
        "class_embeddings_concat": (False,),
        "attention_type": ("default",),
        "cross_attention_norm": (None,),
        "reverse_transformer_layers_per_block": (None,),
    }

    sample_size: int | tuple[int, int] | None = None
    out_channels: int = 4
    center_input_sample: bool = False
    up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP)
    dropout: float = 0.0
    reverse_transformer_layers_per_block: tuple | None = None
    dual_cross_attention: bool = False
    # these two reach only block types we do not build (ResnetDownsampleBlock2D, SimpleCrossAttn...)
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None  # used only by UNetMidBlock2DSimpleCrossAttn
    cross_attention_norm: str | None = None

    def validate(self, source: str = "config") -> None:
        super().validate(source)
        if len(self.up_block_types) != self.num_blocks:
            raise ConfigError(
                f"{source}: up_block_types has {len(self.up_block_types)} entries but down_block_types has "
                f"{self.num_blocks}"
            )
        for t in self.up_block_types:
            if t not in (CROSS_ATTN_UP, PLAIN_UP):
                raise ConfigError(
                    f"{source}: up block type {t!r} is not supported (supported: {CROSS_ATTN_UP}, {PLAIN_UP})"
                )
        if self.dropout:
            warnings.warn(
                f"{source}: dropout={self.dropout} is not applied by jaxcontrol (inference is unaffected)",
                stacklevel=3,
            )


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(_UNetFields):
    """diffusers `ControlNetModel` config."""

    _class_name: ClassVar[str] = "ControlNetModel"
    _UNSUPPORTED: ClassVar[dict[str, tuple]] = dict(_UNSUPPORTED_EMBEDDINGS)

    conditioning_channels: int = 3
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False

    def validate(self, source: str = "config") -> None:
        super().validate(source)
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ConfigError(
                f"{source}: controlnet_conditioning_channel_order must be 'rgb' or 'bgr', "
                f"got {self.controlnet_conditioning_channel_order!r}"
            )
        if not isinstance(self.layers_per_block, int):
            raise ConfigError(f"{source}: ControlNetModel takes an int layers_per_block, got {self.layers_per_block!r}")
        if not isinstance(self.cross_attention_dim, int):
            raise ConfigError(
                f"{source}: ControlNetModel takes an int cross_attention_dim, got {self.cross_attention_dim!r}"
            )


def controlnet_config_from_unet(
    unet: UNet2DConditionConfig,
    *,
    conditioning_channels: int = 3,
    conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256),
    controlnet_conditioning_channel_order: str = "rgb",
    global_pool_conditions: bool = False,
) -> ControlNetConfig:
    """The ControlNet config whose encoder mirrors `unet` (diffusers' `ControlNetModel.from_unet`)."""
    if unet.conv_in_kernel != 3:
        raise ConfigError(f"a ControlNet needs conv_in_kernel=3, the U-Net has {unet.conv_in_kernel}")
    shared = {f.name: getattr(unet, f.name) for f in dataclasses.fields(_UNetFields)}
    if isinstance(shared["cross_attention_dim"], tuple):
        dims = set(shared["cross_attention_dim"])
        if len(dims) != 1:
            raise ConfigError("a ControlNet needs one cross_attention_dim, the U-Net has per-block values")
        shared["cross_attention_dim"] = dims.pop()
    if isinstance(shared["layers_per_block"], tuple):
        counts = set(shared["layers_per_block"])
        if len(counts) != 1:
            raise ConfigError("a ControlNet needs one layers_per_block, the U-Net has per-block values")
        shared["layers_per_block"] = counts.pop()
    config = ControlNetConfig(
        **shared,
        conditioning_channels=conditioning_channels,
        conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
        controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
        global_pool_conditions=global_pool_conditions,
    )
    config.validate("controlnet_config_from_unet")
    return config
