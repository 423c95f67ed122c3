"""A U-Net trained from scratch on fill50k, offline on a CPU (tiny VAE and text encoder, frozen, random).

    python train.py --config configs/unet_fill50k.py --workdir runs/unet

The export, WORKDIR/export/{diffusers,jaxcontrol}/pipeline, is a whole StableDiffusionPipeline
folder that `configs/controlnet_fill50k.py` can start from (`--config.model.init=pretrained
--config.model.pretrained_path=runs/unet/export/jaxcontrol/pipeline`). To train against a trained
VAE, set `model.vae_path` to its folder.
"""

from jaxcontrol.training.config import default_config


def get_config():
    c = default_config()
    c.task = "unet"
    c.model.init = "scratch"
    c.data.dataset = "fill50k"
    c.data.resolution = 32
    c.data.fill50k_num_train = 2000
    c.data.fill50k_num_validation = 8
    c.steps = 300
    c.batch_size = 8
    c.optim.learning_rate = 3e-4
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 20
    c.optim.ema_decay = 0.999
    c.loss.proportion_empty_prompts = 0.1
    c.loss.snr_gamma = 5.0
    c.log.every = 10
    c.checkpoint.every = 100
    c.validation.every = 150
    c.validation.num_inference_steps = 10
    c.validation.guidance_scale = 3.0
    return c
