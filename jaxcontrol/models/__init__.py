"""Flax Linen networks (NHWC), named after their diffusers / transformers counterparts."""

from .adapter import MultiAdapter, T2IAdapter, T2IAdapterConfig
from .attention import ATTENTION_IMPLS
from .clip import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    clip_preprocess,
)
from .configs import ControlNetConfig, UNet2DConditionConfig, controlnet_config_from_unet
from .controlnet import ControlNetModel, controlnet_from_unet
from .params import count_params, init_params, param_shapes
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL, AutoencoderKLConfig

__all__ = [
    "ATTENTION_IMPLS",
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPVisionConfig",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "MultiAdapter",
    "T2IAdapter",
    "T2IAdapterConfig",
    "clip_preprocess",
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
