"""jaxcontrol: controllable latent diffusion in JAX/Flax.

    unet, params = jaxcontrol.load_model("sd15/unet")
    out = unet.apply({"params": params}, latents_nhwc, t, text_embeddings)
"""

from .convert import load_model
from .errors import CheckpointError, ConfigError, JaxControlError
from .models import (
    ControlNetConfig,
    ControlNetModel,
    UNet2DConditionConfig,
    UNet2DConditionModel,
    controlnet_from_unet,
    init_params,
)
from .models.vae import AutoencoderKL, AutoencoderKLConfig

__version__ = "0.1.0"

__all__ = [
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "CheckpointError",
    "ConfigError",
    "ControlNetConfig",
    "ControlNetModel",
    "JaxControlError",
    "UNet2DConditionConfig",
    "UNet2DConditionModel",
    "controlnet_from_unet",
    "init_params",
    "load_model",
]
