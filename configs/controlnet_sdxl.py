"""A ControlNet-XL (or, with `:adapter`, a T2I-Adapter-XL) on an SDXL base pipeline, as diffusers'
train_controlnet_sdxl.py / train_t2i_adapter_sdxl.py set them up: the U-Net, VAE and both text
encoders frozen, the text embeddings and add_time_ids (original size, crop, target size from
`sdxl.*`, the resolution by default) computed per batch, or once with `data.precompute`.

    python train.py --config configs/controlnet_sdxl.py --workdir runs/cn-xl \\
        --config.model.pretrained_path=/models/stable-diffusion-xl-base-1.0 \\
        --config.data.dataset=folder --config.data.train_manifest=/data/train.jsonl
    python train.py --config configs/controlnet_sdxl.py:adapter --workdir runs/adapter-xl \\
        --config.model.pretrained_path=/models/stable-diffusion-xl-base-1.0 ...

SDXL's VAE overflows in float16 (not in bfloat16): `model.vae_path` takes the fp16-fix VAE folder
where a run wants one, as diffusers' --pretrained_vae_model_name_or_path. The full-size model needs
an accelerator (or several, with mesh.fsdp); the tests train diffusers' tiny SDXL test configs.
"""

from jaxcontrol.training.config import default_config


def get_config(arg: str | None = None):
    task = arg or "controlnet"
    if task not in ("controlnet", "adapter"):
        raise ValueError(f"configs/controlnet_sdxl.py:{task}: the stage is 'controlnet' or 'adapter'")
    c = default_config()
    c.task = task
    c.model.init = "pretrained"
    c.data.resolution = 1024
    c.data.precompute = True  # both text encoders and the VAE run once per example, not per step
    # a ControlNet's hint encoder maps the image to the latents (1/8); diffusers' default widths
    c.controlnet.conditioning_embedding_out_channels = (16, 32, 96, 256)
    # TencentARC's T2I-Adapter-XL: features at 1/16 and 1/32 of the image, for the SDXL down blocks
    c.adapter.update(dict(channels=(320, 640, 1280, 1280), num_res_blocks=2, downscale_factor=16,
                          adapter_type="full_adapter_xl"))
    c.sdxl.crops_coords_top_left = (0, 0)
    c.batch_size = 16
    c.optim.learning_rate = 1e-5
    c.precision.compute_dtype = "bfloat16"
    c.precision.frozen_param_dtype = "bfloat16"
    c.remat.unet = "blocks"
    c.remat.controlnet = "blocks" if task == "controlnet" else "none"
    c.steps = 15000
    c.checkpoint.every = 500
    c.validation.every = 500
    c.validation.num_inference_steps = 25
    c.validation.guidance_scale = 5.0
    return c
