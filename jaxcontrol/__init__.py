"""jaxcontrol: controllable latent diffusion in JAX/Flax.

    unet, params = jaxcontrol.load_model("sd15/unet")
    out = unet.apply({"params": params}, latents_nhwc, t, text_embeddings)
"""

from .convert import export_diffusers, load_checkpoint, load_model, load_single_file, save_checkpoint
from .convert.pipeline_folder import PipelineBundle, load_pipeline
from .errors import CheckpointError, ConfigError, JaxControlError
from . import guidance  # noqa: E402  (score-function combinators: jaxcontrol.guidance.classifier_free, ...)
from .pipeline import AdapterInput, ControlInput, LoraInput, Pipeline
from .convert.lora_file import read_lora, save_lora
from .models.lora import Lora
from .sampler import sample
from .schedulers import NoiseSchedule, SchedulerConfig, make_plan
from .models import (
    AutoencoderKL,
    AutoencoderKLConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionModelWithProjection,
    ControlNetConfig,
    ControlNetModel,
    MultiAdapter,
    T2IAdapter,
    UNet2DConditionConfig,
    UNet2DConditionModel,
    controlnet_from_unet,
    init_params,
)

from .version import __version__  # noqa: E402, F401

__all__ = [
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPVisionModelWithProjection",
    "MultiAdapter",
    "T2IAdapter",
    "CheckpointError",
    "ConfigError",
    "ControlNetConfig",
    "ControlNetModel",
    "JaxControlError",
    "PipelineBundle",
    "UNet2DConditionConfig",
    "UNet2DConditionModel",
    "controlnet_from_unet",
    "export_diffusers",
    "guidance",
    "make_plan",
    "sample",
    "AdapterInput",
    "ControlInput",
    "Lora",
    "LoraInput",
    "NoiseSchedule",
    "Pipeline",
    "SchedulerConfig",
    "init_params",
    "load_checkpoint",
    "load_model",
    "load_pipeline",
    "load_single_file",
    "read_lora",
    "save_checkpoint",
    "save_lora",
]
