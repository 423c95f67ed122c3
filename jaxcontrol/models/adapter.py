"""T2I-Adapter (diffusers `T2IAdapter` / `MultiAdapter`), NHWC.

    adapter, params = jaxcontrol.load_model("path/to/t2i-adapter")
    features = adapter.apply({"params": params}, image)        # image: (B, H, W, in_channels)
    out = unet.apply({"params": unet_params}, latents, t, context,
                     down_intrablock_additional_residuals=features)

`features` is a list of NHWC tensors, one per adapter level, in the order the U-Net consumes them
(one per down block; a leftover feature shaped like the mid-block output goes to the mid block,
as with T2I-Adapter-XL). The three diffusers architectures are covered:

- `full_adapter`: pixel-unshuffle, `conv_in`, then one `AdapterBlock` per entry of `channels`
  (2x2 average pooling before every block but the first), each a stack of residual blocks
  `x + conv1x1(relu(conv3x3(x)))`.
- `full_adapter_xl`: the same blocks, but only the third one downsamples (SDXL's layout: features
  at 1/16, 1/16, 1/32, 1/32 of the image for `downscale_factor=16`).
- `light_adapter`: no `conv_in`; `len(channels) + 1` `LightAdapterBlock`s (1x1 in/out convolutions
  around residual blocks on `channels // 4`), every block but the first downsampling.

Parameter names mirror diffusers' state dict (`adapter.body.1.resnets.0.block1.weight` is
`adapter/body_1/resnets_0/block1/kernel`), so `convert_to_flax` loads a diffusers checkpoint as is.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ..errors import ConfigError
from .configs import ModelConfig
from .layers import conv

Dtype = Any

ADAPTER_TYPES = ("full_adapter", "full_adapter_xl", "light_adapter")


# --- config ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class T2IAdapterConfig(ModelConfig):
    """diffusers `T2IAdapter` config. Defaults are diffusers' own (an SD-1.x full adapter)."""

    _class_name: ClassVar[str] = "T2IAdapter"
    _POSITIVE: ClassVar[tuple[str, ...]] = ("in_channels", "channels", "downscale_factor")
    _NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("num_res_blocks",)
    _NON_EMPTY: ClassVar[tuple[str, ...]] = ("channels",)

    in_channels: int = 3
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    downscale_factor: int = 8
    adapter_type: str = "full_adapter"

    @property
    def total_downscale_factor(self) -> int:
        """Image size / size of the last feature (diffusers' `T2IAdapter.total_downscale_factor`).

        As in diffusers, `full_adapter_xl` reports `2 * downscale_factor` even with fewer than 3 levels,
        where no block downsamples and the last feature is at 1/downscale_factor.
        """
        if self.adapter_type == "full_adapter":
            return self.downscale_factor * 2 ** (len(self.channels) - 1)
        if self.adapter_type == "full_adapter_xl":
            return self.downscale_factor * 2  # one downsampling block, whatever len(channels) is
        return self.downscale_factor * 2 ** len(self.channels)  # light_adapter

    @property
    def num_features(self) -> int:
        """How many feature maps the adapter returns: len(channels), plus one for `light_adapter`."""
        return len(self.channels) + (1 if self.adapter_type == "light_adapter" else 0)

    @property
    def feature_channels(self) -> tuple[int, ...]:
        """The channel count of each returned feature map, shallowest first (light_adapter repeats the last)."""
        if self.adapter_type == "light_adapter":
            return tuple(self.channels) + (self.channels[-1],)
        return tuple(self.channels)

    def validate(self, source: str = "config") -> None:
        """Check the fields beyond their types; raises `ConfigError` naming `source` and the field.

        Refuses an unknown adapter_type, empty or non-positive channels, in_channels or downscale_factor
        < 1, num_res_blocks < 0, light_adapter channels below 4, and full_adapter_xl channels[i] !=
        channels[i - 1] for i >= 3 (a model diffusers could not run either).
        """
        super().validate(source)
        if self.adapter_type not in ADAPTER_TYPES:
            raise ConfigError(
                f"{source}: adapter_type={self.adapter_type!r} is not supported (supported: {list(ADAPTER_TYPES)})"
            )
        if not self.channels or any(int(c) < 1 for c in self.channels):
            raise ConfigError(f"{source}: channels must be a non-empty list of positive ints, got {self.channels!r}")
        if self.in_channels < 1 or self.downscale_factor < 1 or self.num_res_blocks < 0:
            raise ConfigError(
                f"{source}: need in_channels >= 1, downscale_factor >= 1 and num_res_blocks >= 0; got "
                f"in_channels={self.in_channels}, downscale_factor={self.downscale_factor}, "
                f"num_res_blocks={self.num_res_blocks}"
            )
        if self.adapter_type == "light_adapter":
            small = [c for c in self.channels if c // 4 == 0]
            if small:
                raise ConfigError(
                    f"{source}: light_adapter blocks work on channels // 4 channels; channels {small} are too small"
                )
        if self.adapter_type == "full_adapter_xl":
            # diffusers builds body[i] for i >= 3 as AdapterBlock(channels[i], channels[i]) although its input
            # has channels[i - 1]: such a model cannot run unless the two are equal.
            for i in range(3, len(self.channels)):
                if self.channels[i] != self.channels[i - 1]:
                    raise ConfigError(
                        f"{source}: full_adapter_xl needs channels[{i}] == channels[{i - 1}] "
                        f"(got {self.channels[i]} and {self.channels[i - 1]}); diffusers' model could not run either"
                    )


# --- resampling --------------------------------------------------------------------------------
def pixel_unshuffle(x: jax.Array, factor: int) -> jax.Array:
    """`torch.nn.PixelUnshuffle(factor)` in NHWC: (N, H, W, C) -> (N, H/r, W/r, C*r*r).

    Output channel `c*r*r + i*r + j` holds input pixel `(h*r + i, w*r + j)` of channel `c`, exactly
    PyTorch's order, so the first convolution's weights need no permutation.
    """
    n, h, w, c = x.shape
    r = factor
    if h % r or w % r:
        raise ValueError(
            f"pixel unshuffle by {r}: the image size {h}x{w} is not divisible by the adapter's downscale_factor={r}"
        )
    x = x.reshape(n, h // r, r, w // r, r, c)
    x = x.transpose(0, 1, 3, 5, 2, 4)  # (N, H/r, W/r, C, r, r)
    return x.reshape(n, h // r, w // r, c * r * r)


def avg_pool_2x2_ceil(x: jax.Array) -> jax.Array:
    """`torch.nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True)` in NHWC.

    For an odd size the last window hangs over the edge; PyTorch (padding 0) divides its sum by the
    number of in-bounds elements, so an edge output is the mean of the pixels it covers. The output
    size is ceil(size / 2), like the U-Net's stride-2 convolution with padding 1.
    """
    n, h, w, c = x.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    oh, ow = (h + ph) // 2, (w + pw) // 2
    summed = x.reshape(n, oh, 2, ow, 2, c).sum(axis=(2, 4))
    if not (ph or pw):
        return summed / jnp.asarray(4, x.dtype)
    rows = np.full(oh, 2.0, np.float32)
    cols = np.full(ow, 2.0, np.float32)
    if ph:
        rows[-1] = 1.0
    if pw:
        cols[-1] = 1.0
    counts = jnp.asarray(np.outer(rows, cols)[None, :, :, None], dtype=x.dtype)
    return summed / counts


# --- blocks (diffusers' names) -----------------------------------------------------------------
class AdapterResnetBlock(nn.Module):
    """`x + block2(relu(block1(x)))`: block1 3x3; block2 1x1 (full adapters) or 3x3 (light adapter)."""

    block2_kernel: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch = x.shape[-1]
        h = nn.relu(conv(ch, 3, name="block1", **kw)(x))
        h = conv(ch, self.block2_kernel, name="block2", **kw)(h)
        return h + x


class AdapterBlock(nn.Module):
    """Optional 2x2 ceil-mode average pool, a 1x1 `in_conv` when the width changes, then residual blocks."""

    out_channels: int
    num_res_blocks: int
    down: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.down:
            x = avg_pool_2x2_ceil(x)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, name="in_conv", **kw)(x)
        for j in range(self.num_res_blocks):
            x = AdapterResnetBlock(name=f"resnets_{j}", **kw)(x)
        return x


class LightAdapterBlock(nn.Module):
    """Optional pool, 1x1 `in_conv` to `out_channels // 4`, residual blocks, 1x1 `out_conv`."""

    out_channels: int
    num_res_blocks: int
    down: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.down:
            x = avg_pool_2x2_ceil(x)
        x = conv(self.out_channels // 4, 1, name="in_conv", **kw)(x)
        for j in range(self.num_res_blocks):
            x = AdapterResnetBlock(block2_kernel=3, name=f"resnets_{j}", **kw)(x)
        return conv(self.out_channels, 1, name="out_conv", **kw)(x)


class FullAdapter(nn.Module):
    """diffusers' `FullAdapter` (`xl=False`) and `FullAdapterXL` (`xl=True`); input already unshuffled."""

    channels: tuple[int, ...]
    num_res_blocks: int
    xl: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(self.channels[0], 3, name="conv_in", **kw)(x)
        features = []
        for i, ch in enumerate(self.channels):
            down = (i == 2) if self.xl else (i > 0)
            x = AdapterBlock(ch, self.num_res_blocks, down=down, name=f"body_{i}", **kw)(x)
            features.append(x)
        return features


class LightAdapter(nn.Module):
    """diffusers' `LightAdapter`; input already unshuffled."""

    channels: tuple[int, ...]
    num_res_blocks: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        widths = tuple(self.channels) + (self.channels[-1],)
        features = []
        for i, ch in enumerate(widths):
            x = LightAdapterBlock(ch, self.num_res_blocks, down=i > 0, name=f"body_{i}", **kw)(x)
            features.append(x)
        return features


# --- the model ---------------------------------------------------------------------------------
class T2IAdapter(nn.Module):
    """diffusers' `T2IAdapter`: control image (B, H, W, in_channels) -> list of NHWC features.

    H and W must be multiples of `downscale_factor` (the pixel unshuffle); any such size works, odd
    sizes after unshuffling included (the pooling rounds up like the U-Net's downsamplers).
    `attention_impl` is accepted so that `load_model` builds every model the same way; there is no
    attention in an adapter.
    """

    config: T2IAdapterConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @property
    def downscale_factor(self) -> int:
        """The pixel-unshuffle factor; the image size must be a multiple of it."""
        return self.config.downscale_factor

    @property
    def total_downscale_factor(self) -> int:
        """Image size / size of the last feature map, as the config says (`T2IAdapterConfig.total_downscale_factor`)."""
        return self.config.total_downscale_factor

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        cfg = self.config
        cfg.validate(type(self).__name__)  # a config built directly (not by from_dict) is checked here
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"T2IAdapter input must be an NHWC image with {cfg.in_channels} channels, got shape {tuple(x.shape)}"
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = pixel_unshuffle(x.astype(self.dtype), cfg.downscale_factor)
        if cfg.adapter_type == "light_adapter":
            inner: nn.Module = LightAdapter(tuple(cfg.channels), cfg.num_res_blocks, name="adapter", **kw)
        else:
            inner = FullAdapter(
                tuple(cfg.channels), cfg.num_res_blocks, xl=cfg.adapter_type == "full_adapter_xl", name="adapter", **kw
            )
        return inner(x)

    def dummy_inputs(self) -> tuple:
        """Arguments for `init`: one zero float32 image (1, r, r, in_channels), r = downscale_factor."""
        r = self.config.downscale_factor
        return (jnp.zeros((1, r, r, self.config.in_channels)),)


def adapter_in_channels(params: Any, downscale_factor: int) -> int:
    """The number of image channels an adapter's weights expect (1 for canny/sketch adapters, 3 for RGB).

    Reads the first convolution's input width (`adapter/conv_in`, or `adapter/body_0/in_conv` for a
    light adapter) and divides by `downscale_factor ** 2`. `params` is a Flax parameter tree of a
    `T2IAdapter` (with or without the top-level `adapter` key).
    """
    tree = params.get("adapter", params)
    if "conv_in" in tree:
        where, kernel = "adapter/conv_in/kernel", tree["conv_in"]["kernel"]
    elif "body_0" in tree and "in_conv" in tree["body_0"]:
        where, kernel = "adapter/body_0/in_conv/kernel", tree["body_0"]["in_conv"]["kernel"]
    else:
        raise ValueError("not T2I-Adapter parameters: found neither adapter/conv_in nor adapter/body_0/in_conv")
    width = int(kernel.shape[-2])
    r2 = int(downscale_factor) ** 2
    if width % r2:
        raise ValueError(
            f"{where} takes {width} input channels, which is not a multiple of downscale_factor**2 = {r2}"
        )
    return width // r2


# --- several adapters --------------------------------------------------------------------------
class MultiAdapter(nn.Module):
    """diffusers' `MultiAdapter`: `sum_k adapter_weights[k] * adapter_k(images[k])`, feature by feature.

        multi, mparams = MultiAdapter.from_adapters([(adapter_a, params_a), (adapter_b, params_b)])
        features = multi.apply({"params": mparams}, [image_a, image_b], adapter_weights=[0.3, 0.7])

    Each adapter gets its own image (so a 1-channel sketch adapter and an RGB depth adapter can be
    mixed); all must share `downscale_factor` and `total_downscale_factor`, as diffusers requires.
    `adapter_weights` may be a traced array of shape (len(configs),); None means 1/len(configs) each.
    Params are `{"adapters_0": ..., "adapters_1": ...}`, diffusers' `adapters.0...` names.
    Folders written by diffusers' `MultiAdapter.save_pretrained` load with
    `jaxcontrol.convert.load_multi_adapter`.
    """

    configs: tuple[T2IAdapterConfig, ...]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        configs = tuple(self.configs)
        if len(configs) == 0:
            raise ValueError("MultiAdapter: expecting at least one adapter")
        if len(configs) == 1:
            raise ValueError("MultiAdapter: for a single adapter, use T2IAdapter instead of MultiAdapter")
        first = configs[0]
        for i, c in enumerate(configs[1:], start=1):
            if (c.total_downscale_factor, c.downscale_factor) != (first.total_downscale_factor, first.downscale_factor):
                raise ValueError(
                    "MultiAdapter: all adapters must downscale the same way, but adapter 0 has "
                    f"downscale_factor={first.downscale_factor}, total_downscale_factor={first.total_downscale_factor} "
                    f"and adapter {i} has downscale_factor={c.downscale_factor}, "
                    f"total_downscale_factor={c.total_downscale_factor}"
                )
        super().__post_init__()

    @property
    def downscale_factor(self) -> int:
        """The shared pixel-unshuffle factor; every image's height and width must be a multiple of it."""
        return self.configs[0].downscale_factor

    @property
    def total_downscale_factor(self) -> int:
        """Image size / size of the last feature map, shared by all the adapters."""
        return self.configs[0].total_downscale_factor

    @nn.compact
    def __call__(
        self, images: Sequence[jax.Array], adapter_weights: Sequence[float] | jax.Array | None = None
    ) -> list[jax.Array]:
        n = len(self.configs)
        if len(images) != n:
            raise ValueError(f"MultiAdapter has {n} adapters but got {len(images)} images (one per adapter)")
        if adapter_weights is None:
            weights = jnp.full((n,), 1.0 / n, jnp.float32)
        else:
            weights = jnp.asarray(adapter_weights, jnp.float32)
            if weights.shape != (n,):
                raise ValueError(f"adapter_weights must have {n} entries, got shape {tuple(weights.shape)}")
        acc: list[jax.Array] | None = None
        for k, (cfg, image) in enumerate(zip(self.configs, images)):
            feats = T2IAdapter(cfg, dtype=self.dtype, param_dtype=self.param_dtype, name=f"adapters_{k}")(image)
            weighted = [weights[k].astype(f.dtype) * f for f in feats]
            if acc is None:
                acc = weighted
            else:
                if len(weighted) != len(acc):
                    raise ValueError(
                        f"MultiAdapter: adapter {k} gives {len(weighted)} features, adapter 0 gives {len(acc)}"
                    )
                acc = [a + w for a, w in zip(acc, weighted)]
        return acc

    def dummy_inputs(self) -> tuple:
        """Arguments for `init`: a list of zero float32 images (1, r, r, in_channels), one per adapter."""
        r = self.configs[0].downscale_factor
        return ([jnp.zeros((1, r, r, c.in_channels)) for c in self.configs],)

    @staticmethod
    def from_adapters(adapters: Sequence[tuple[T2IAdapter, Any]]) -> tuple["MultiAdapter", dict]:
        """`(MultiAdapter, params)` from `(T2IAdapter, params)` pairs (e.g. from `load_model`)."""
        if not adapters:
            raise ValueError("MultiAdapter: expecting at least one adapter")
        first = adapters[0][0]
        for module, _ in adapters:
            if not isinstance(module, T2IAdapter):
                raise TypeError(f"MultiAdapter.from_adapters takes T2IAdapter modules, got {type(module).__name__}")
        multi = MultiAdapter(
            tuple(m.config for m, _ in adapters), dtype=first.dtype, param_dtype=first.param_dtype
        )
        return multi, {f"adapters_{k}": p for k, (_, p) in enumerate(adapters)}
