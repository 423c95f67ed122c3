"""Checkpoint I/O: diffusers folders, safetensors and PyTorch pickles to and from Flax parameter trees."""

from .diffusers_folder import MODEL_TYPES, build_module, find_weights, load_model, load_params, read_config
from .safetensors_file import SafetensorsFile, save_safetensors
from .sources import TensorSource, open_weights
from .state_dict import convert_to_flax, flax_to_torch_state_dict

__all__ = [
    "MODEL_TYPES",
    "SafetensorsFile",
    "TensorSource",
    "build_module",
    "convert_to_flax",
    "find_weights",
    "flax_to_torch_state_dict",
    "load_model",
    "load_params",
    "open_weights",
    "read_config",
    "save_safetensors",
]
