"""Flax Linen networks (NHWC), named after their diffusers / transformers counterparts."""

from .attention import ATTENTION_IMPLS
from .configs import ControlNetConfig, UNet2DConditionConfig, controlnet_config_from_unet
from .controlnet import ControlNetModel, controlnet_from_unet
from .params import count_params, init_params, param_shapes
from .unet import UNet2DConditionModel

__all__ = [
    "ATTENTION_IMPLS",
    "ControlNetConfig",
    "ControlNetModel",
    "UNet2DConditionConfig",
    "UNet2DConditionModel",
    "controlnet_config_from_unet",
    "controlnet_from_unet",
    "count_params",
    "init_params",
    "param_shapes",
]
