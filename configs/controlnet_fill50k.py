"""A ControlNet on fill50k, offline on a CPU: tiny networks built from scratch, 32x32 images.

    python train.py --config configs/controlnet_fill50k.py --workdir runs/controlnet

For Stable Diffusion 1.5 (on accelerators), point it at a pipeline folder instead:

    --config.model.init=pretrained --config.model.pretrained_path=stable-diffusion-v1-5 \\
    --config.data.resolution=512 --config.controlnet.conditioning_embedding_out_channels="(16,32,96,256)" \\
    --config.optim.learning_rate=1e-5 --config.precision.compute_dtype=bfloat16 --config.remat.unet=blocks

Use `configs/unet_fill50k.py`'s export (WORKDIR/export/jaxcontrol/pipeline) as `pretrained_path` to
train the ControlNet on a base model that has learnt something.
"""

from jaxcontrol.training.config import default_config


def get_config():
    c = default_config()
    c.task = "controlnet"
    c.model.init = "scratch"  # TINY_UNET / TINY_VAE / TINY_TEXT_ENCODER, random weights
    c.controlnet.conditioning_embedding_out_channels = (16, 32)  # 2x: the tiny VAE's factor
    c.data.dataset = "fill50k"
    c.data.resolution = 32
    c.data.fill50k_num_train = 2000
    c.data.fill50k_num_validation = 8
    c.steps = 200
    c.batch_size = 8
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 10
    c.loss.proportion_empty_prompts = 0.5  # as in the ControlNet fill50k tutorial
    c.log.every = 10
    c.checkpoint.every = 50
    c.validation.every = 100
    c.validation.num_images = 4
    c.validation.num_inference_steps = 10
    c.validation.guidance_scale = 3.0
    return c
