"""Checkpoint I/O: diffusers folders, safetensors and PyTorch pickles to and from Flax parameter trees;
original single-file checkpoints in, the jaxcontrol (Orbax) format and diffusers folders out."""

from .conversion import ConversionReport, convert, format_summary
from .diffusers_folder import (
    MODEL_TYPES,
    build_module,
    find_weights,
    load_model,
    load_multi_adapter,
    load_params,
    read_config,
)
from .export import export_diffusers
from .jax_format import atomic_directory, load_checkpoint, save_checkpoint
from .safetensors_file import SafetensorsFile, save_safetensors
from .single_file import FORMATS, detect_format, load_single_file, read_checkpoint
from .sources import TensorSource, open_weights
from .state_dict import convert_to_flax, flax_to_torch_state_dict

__all__ = [
    "FORMATS",
    "MODEL_TYPES",
    "ConversionReport",
    "SafetensorsFile",
    "TensorSource",
    "atomic_directory",
    "build_module",
    "convert",
    "convert_to_flax",
    "detect_format",
    "export_diffusers",
    "find_weights",
    "flax_to_torch_state_dict",
    "format_summary",
    "load_checkpoint",
    "load_model",
    "load_multi_adapter",
    "load_params",
    "load_single_file",
    "open_weights",
    "read_checkpoint",
    "read_config",
    "save_checkpoint",
    "save_safetensors",
]
