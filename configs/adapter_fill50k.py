"""A T2I-Adapter on fill50k, offline on a CPU: tiny networks built from scratch, 32x32 images.

    python train.py --config configs/adapter_fill50k.py --workdir runs/adapter

Timesteps are drawn with diffusers' cubic sampling (the adapter default; `loss.timestep_sampling`).
For Stable Diffusion 1.5: `--config.model.init=pretrained --config.model.pretrained_path=...
--config.adapter.channels="(320,640,1280,1280)" --config.adapter.downscale_factor=8
--config.data.resolution=512`.
"""

from jaxcontrol.training.config import TINY_UNET, default_config


def get_config():
    c = default_config()
    c.task = "adapter"
    c.model.init = "scratch"
    c.adapter.channels = TINY_UNET["block_out_channels"]  # one feature per U-Net down block
    c.adapter.downscale_factor = 2  # the tiny VAE's factor: the first feature is at latent size
    c.adapter.num_res_blocks = 1
    c.data.dataset = "fill50k"
    c.data.resolution = 32
    c.data.fill50k_num_train = 2000
    c.data.fill50k_num_validation = 8
    c.steps = 200
    c.batch_size = 8
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 10
    c.log.every = 10
    c.checkpoint.every = 50
    c.validation.every = 100
    c.validation.num_inference_steps = 10
    c.validation.guidance_scale = 3.0
    return c
