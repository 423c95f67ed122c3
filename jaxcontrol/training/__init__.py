"""Training ControlNets, T2I-Adapters and U-Nets on a device mesh (`train.py` is the command line).

    from jaxcontrol.training import default_config, train
    config = default_config()                 # ml_collections ConfigDict; see docs/TRAINING.md
    config.task = "controlnet"
    config.model.pretrained_path = "stable-diffusion-v1-5"
    train(config, "runs/my-controlnet")        # resumes from runs/my-controlnet/checkpoints if present

| module | contents |
| --- | --- |
| `config` | `default_config`, `check_config`, tiny architectures for from-scratch runs |
| `networks` | `build_networks`: load / build the networks; which params train and which are frozen |
| `losses` | timestep sampling (uniform, cubic), noise offset, prompt dropout, targets, min-SNR-gamma |
| `state` | `TrainState`, the AdamW optimizer and learning-rate schedules, the EMA |
| `remat` | `remat_scope`: `jax.checkpoint` of U-Net / ControlNet blocks at trace time |
| `step` | `make_loss_fn`, `make_train_step` (grad accumulation by scan), `jit_train_step`, the validation sampler |
| `sharding` | the ("data", "fsdp") mesh, sharding rules, global batches from per-host data, multi-host init |
| `data` | TFDS sources, the grain loader, precomputed latents, device batches |
| `checkpoint` | `Checkpointer`: Orbax CheckpointManager of state + data-iterator position |
| `logger` | console, progress bar, TensorBoard, metrics.jsonl, validation image files |
| `export` | `export_trained`: diffusers folders and the jaxcontrol format |
| `trainer` | `Run` (the set-up pieces) and `train` (the loop) |
"""

from .checkpoint import Checkpointer
from .config import TINY_TEXT_ENCODER, TINY_UNET, TINY_VAE, check_config, default_config
from .export import export_trained
from .losses import diffusion_loss, drop_prompts, min_snr_weights, offset_noise, prediction_target, sample_timesteps
from .networks import Networks, build_networks, unet_params
from .remat import remat_scope
from .sharding import batch_sharding, global_batch, initialize_distributed, make_mesh, param_shardings
from .state import TrainState, create_train_state, learning_rate_schedule, make_optimizer, update_ema
from .step import jit_train_step, make_loss_fn, make_sample_fn, make_train_step
from .trainer import Run, train

__all__ = [
    "Checkpointer",
    "Networks",
    "Run",
    "TINY_TEXT_ENCODER",
    "TINY_UNET",
    "TINY_VAE",
    "TrainState",
    "batch_sharding",
    "build_networks",
    "check_config",
    "create_train_state",
    "default_config",
    "diffusion_loss",
    "drop_prompts",
    "export_trained",
    "global_batch",
    "initialize_distributed",
    "jit_train_step",
    "learning_rate_schedule",
    "make_loss_fn",
    "make_mesh",
    "make_optimizer",
    "make_sample_fn",
    "make_train_step",
    "min_snr_weights",
    "offset_noise",
    "param_shardings",
    "prediction_target",
    "remat_scope",
    "sample_timesteps",
    "train",
    "unet_params",
    "update_ema",
]
