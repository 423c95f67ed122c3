"""Model configs as frozen dataclasses whose field names are those of diffusers' `config.json`.

A diffusers folder's `config.json` loads with `Config.from_dict(json.load(f))`, with no translation
table. Fields we parse but do not implement are accepted only at their default value; anything else
raises `ConfigError` naming the field, so a model never silently runs with a feature missing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
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


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's annotation (int, float, bool, str, None, tuples, unions)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if hint is tuple or origin is tuple:
        if not isinstance(value, tuple | list):
            return False
        args = typing.get_args(hint)
        if not args:
            return True
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_ok(v, args[0]) for v in value)
        return len(value) == len(args) and all(_type_ok(v, h) for v, h in zip(value, args))
    return True  # an annotation this check does not know: left to the field's own validation


def _describe_type(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if hint is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe_type(h) for h in typing.get_args(hint))
    if hint is float:
        return "a finite number"
    if hint in (int, bool, str):
        return {int: "an int", bool: "true/false", str: "a string"}[hint]
    if hint is tuple or origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of ({_describe_type(args[0])})"
        if args:
            return f"a list of {len(args)} ({', '.join(_describe_type(a) for a in args)})"
        return "a list"
    return getattr(hint, "__name__", str(hint))


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _entries(value: Any) -> tuple:
    """An int-or-list field's values (None and strings give none)."""
    if value is None or isinstance(value, str):
        return ()
    return tuple(value) if isinstance(value, tuple | list) else (value,)


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
    # fields whose value (each entry, for lists) must be an int >= 1 when set / >= 0
    _POSITIVE: ClassVar[tuple[str, ...]] = ()
    _NON_NEGATIVE: ClassVar[tuple[str, ...]] = ()
    # list fields that must have at least one entry
    _NON_EMPTY: ClassVar[tuple[str, ...]] = ()
    # float fields that must be > 0 (norm epsilons: 0 or less divides by zero or takes a negative root)
    _POSITIVE_FLOAT: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "config") -> "ModelConfig":
        """The config of a diffusers `config.json` object (`source` names it in messages).

        Keys starting with "_" (`_class_name`, `_diffusers_version`) are skipped, unknown keys are
        ignored with a warning naming them, JSON lists become tuples. Raises `ConfigError` when
        `raw` is not a mapping or `validate` refuses a value.
        """
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: a {cls.__name__} must be a JSON object, found a {type(raw).__name__}")
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
        """A `config.json` dict: `_class_name` and every field, tuples as lists (`from_dict` reads it back)."""
        out: dict[str, Any] = {"_class_name": self._class_name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with `changes` applied (lists as tuples), validated; raises `ConfigError` as `validate`."""
        new = dataclasses.replace(self, **{k: _freeze(v) for k, v in changes.items()})
        new.validate("config")
        return new

    def validate(self, source: str = "config") -> None:
        """Raise `ConfigError`, naming `source` and the field, for a value of the wrong JSON type, out of
        range (see the class's `_POSITIVE` ... lists), or that jaxcontrol does not implement."""
        self._check_types(source)
        self._check_ranges(source)
        for name, allowed in self._UNSUPPORTED.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(
                    f"{source}: {name}={value!r} is not supported by jaxcontrol's {type(self).__name__} "
                    f"(supported: {list(allowed)})"
                )

    def _check_types(self, source: str) -> None:
        """Every field's value has its annotated type (a JSON list where an int belongs, a string
        where a list belongs, NaN where a number belongs: each a `ConfigError` naming the field)."""
        for name, hint in _field_types(type(self)).items():
            value = getattr(self, name)
            if not _type_ok(value, hint):
                raise ConfigError(
                    f"{source}: {name}={value!r} is not supported by jaxcontrol's {type(self).__name__}: "
                    f"expected {_describe_type(hint)}")

    def _check_ranges(self, source: str) -> None:
        for name in self._NON_EMPTY:
            value = getattr(self, name, None)
            if isinstance(value, tuple | list) and not value:
                raise ConfigError(f"{source}: {name} is empty; at least one entry is needed")
        for names, low in ((self._POSITIVE, 1), (self._NON_NEGATIVE, 0)):
            for name in names:
                for v in _entries(getattr(self, name, None)):
                    if isinstance(v, int) and not isinstance(v, bool) and v < low:
                        raise ConfigError(
                            f"{source}: {name}={getattr(self, name)!r} is invalid: each value must be >= {low}")
        for name in self._POSITIVE_FLOAT:
            value = getattr(self, name, None)
            if value is not None and not value > 0:
                raise ConfigError(f"{source}: {name}={value!r} is invalid: it must be > 0")


@dataclasses.dataclass(frozen=True)
class _UNetFields(ModelConfig):
    """Fields the U-Net and the ControlNet share (the encoder half)."""

    _POSITIVE: ClassVar[tuple[str, ...]] = (
        "in_channels", "block_out_channels", "layers_per_block", "norm_num_groups", "cross_attention_dim",
        "transformer_layers_per_block", "attention_head_dim", "num_attention_heads", "encoder_hid_dim",
        "addition_time_embed_dim", "num_class_embeds", "projection_class_embeddings_input_dim",
        "addition_embed_type_num_heads",
    )
    _NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("downsample_padding",)
    _NON_EMPTY: ClassVar[tuple[str, ...]] = ("down_block_types", "block_out_channels")
    _POSITIVE_FLOAT: ClassVar[tuple[str, ...]] = ("norm_eps",)

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
        """Number of down blocks (and of up blocks)."""
        return len(self.down_block_types)

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        """Attention heads of each down block: `num_attention_heads`, else `attention_head_dim`.
        Raises `ConfigError` for a list of the wrong length (as the other per-block properties do)."""
        # diffusers#2011: `attention_head_dim` historically means the *number of heads*.
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return _per_block(heads, self.num_blocks, "num_attention_heads/attention_head_dim")

    @property
    def layers_per_block_list(self) -> tuple[int, ...]:
        """Resnets per down block (up blocks have one more)."""
        return _per_block(self.layers_per_block, self.num_blocks, "layers_per_block")

    @property
    def transformer_layers_list(self) -> tuple[int, ...]:
        """Transformer blocks inside each attention of each down block."""
        return _per_block(self.transformer_layers_per_block, self.num_blocks, "transformer_layers_per_block")

    @property
    def cross_attention_dims(self) -> tuple[int, ...]:
        """Width D of the `encoder_hidden_states` (B, S, D) that each down block attends to."""
        return _per_block(self.cross_attention_dim, self.num_blocks, "cross_attention_dim")

    @property
    def only_cross_attention_list(self) -> tuple[bool, ...]:
        """Per down block: whether its first attention attends to the context instead of itself."""
        return _per_block(self.only_cross_attention, self.num_blocks, "only_cross_attention")

    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding: 4 x `block_out_channels[0]`, as diffusers."""
        return self.block_out_channels[0] * 4

    def validate(self, source: str = "config") -> None:
        """`ModelConfig.validate`, then the block layout: supported block types, one entry per block in
        every per-block list, channels divisible by `norm_num_groups` (raises `ConfigError`)."""
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
        if self.addition_embed_type == "text_time":
            for name in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                if getattr(self, name) is None:
                    raise ConfigError(f"{source}: addition_embed_type='text_time' (SDXL) needs {name}, which is None")
            if self.projection_class_embeddings_input_dim <= self.addition_time_embed_dim:
                raise ConfigError(
                    f"{source}: projection_class_embeddings_input_dim={self.projection_class_embeddings_input_dim} "
                    f"leaves no room for the pooled text embedding next to time ids of "
                    f"addition_time_embed_dim={self.addition_time_embed_dim}")


_UNSUPPORTED_EMBEDDINGS = {
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "class_embed_type": (None,),
    "addition_embed_type": (None, "text_time"),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default", "scale_shift"),
}


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig(_UNetFields):
    """diffusers `UNet2DConditionModel` config (SD-1.x / SD-2.x family). Defaults are diffusers' own."""

    _class_name: ClassVar[str] = "UNet2DConditionModel"
    _POSITIVE: ClassVar[tuple[str, ...]] = _UNetFields._POSITIVE + (
        "out_channels", "sample_size", "conv_in_kernel", "conv_out_kernel", "time_embedding_dim", "time_cond_proj_dim")
    _NON_EMPTY: ClassVar[tuple[str, ...]] = _UNetFields._NON_EMPTY + ("up_block_types",)
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
        """The shared checks, then the decoder: supported up block types, one per down block, odd
        conv kernels, dropout in [0, 1) (warned about: not applied). Raises `ConfigError`."""
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
        for name in ("conv_in_kernel", "conv_out_kernel"):
            if getattr(self, name) % 2 == 0:
                raise ConfigError(f"{source}: {name}={getattr(self, name)} is not supported: an odd kernel size is "
                                  f"needed (an even one changes the sample size)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{source}: dropout={self.dropout} is invalid: it must be in [0, 1)")
        if self.dropout:
            warnings.warn(
                f"{source}: dropout={self.dropout} is not applied by jaxcontrol (inference is unaffected)",
                stacklevel=3,
            )


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(_UNetFields):
    """diffusers `ControlNetModel` config."""

    _class_name: ClassVar[str] = "ControlNetModel"
    _POSITIVE: ClassVar[tuple[str, ...]] = _UNetFields._POSITIVE + (
        "conditioning_channels", "conditioning_embedding_out_channels")
    _NON_EMPTY: ClassVar[tuple[str, ...]] = _UNetFields._NON_EMPTY + ("conditioning_embedding_out_channels",)
    _UNSUPPORTED: ClassVar[dict[str, tuple]] = dict(_UNSUPPORTED_EMBEDDINGS)

    conditioning_channels: int = 3
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False

    def validate(self, source: str = "config") -> None:
        """The shared checks, then: channel order "rgb" or "bgr", one int `layers_per_block` and
        `cross_attention_dim` (raises `ConfigError`)."""
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
    """The ControlNet config whose encoder mirrors `unet` (diffusers' `ControlNetModel.from_unet`).

    Raises `ConfigError` when the U-Net has conv_in_kernel != 3, per-block `cross_attention_dim`
    or `layers_per_block` values that differ, or the result does not validate.
    """
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
