"""Sampling-loop parity with diffusers' pipelines on tiny random models.

diffusers' `StableDiffusionControlNetPipeline` and `StableDiffusionAdapterPipeline` run with
`prompt_embeds`, fixed `latents` and `output_type="latent"`, so only the U-Net, ControlNet,
adapter, scheduler and guidance code take part. Our side is the same model wrapped in the
score-function rules and driven by a plan. `reference_loop` runs our updates one evaluation at a
time in Python around a jitted score function (one compile shared by every solver); `sample` runs
them in the scan.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..convert import load_model
from ..sampler import StepInfo, with_step
from .parity import TINY_ADAPTER_TEST, TINY_CONTROLNET_TEST, controlnet_fields
from .reference import nchw_to_nhwc, randomize_

CONTROLNET_EXTRA = {"conditioning_embedding_out_channels": (16, 32)}  # control image = 2x latent size
VAE_TINY = dict(block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
ADAPTER_TINY = dict(in_channels=3, channels=(32, 64), num_res_blocks=1, downscale_factor=2, adapter_type="full_adapter")


@dataclass
class TinyModels:
    """What `build_tiny_models` made: the folder, the torch models by name, the U-Net's kwargs."""

    folder: Path
    torch: dict[str, Any]
    unet_config: dict


def build_tiny_models(folder: str | Path, *, adapter: bool = False, num_controlnets: int = 2,
                      seed: int = 0, unet_in_channels: int = 4) -> TinyModels:
    """Random diffusers models saved under `folder` (unet/, controlnet_k/, adapter/). The U-Net
    takes `unet_in_channels` inputs (9: inpainting, 5: depth, 8: InstructPix2Pix); ControlNets
    and adapters stay 4-channel, as diffusers pairs them."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, T2IAdapter, UNet2DConditionModel

    folder = Path(folder)
    config = TINY_ADAPTER_TEST if adapter else TINY_CONTROLNET_TEST
    torch.manual_seed(seed)
    models: dict[str, Any] = {"unet": randomize_(UNet2DConditionModel(**{**config, "in_channels": unet_in_channels}),
                                                 seed)}
    models["unet"].save_pretrained(folder / "unet")
    if adapter:
        vae = dict(VAE_TINY, block_out_channels=(32, 64), norm_num_groups=32)
        models["adapter"] = randomize_(T2IAdapter(**ADAPTER_TINY), seed + 5)
        models["adapter"].save_pretrained(folder / "adapter")
        models["adapter_2"] = randomize_(T2IAdapter(**ADAPTER_TINY), seed + 6)
        models["adapter_2"].save_pretrained(folder / "adapter_2")
    else:
        vae = VAE_TINY
        for k in range(num_controlnets):
            cn = randomize_(ControlNetModel(**controlnet_fields(config, CONTROLNET_EXTRA)), seed + 1 + k)
            cn.save_pretrained(folder / f"controlnet_{k}")
            models[f"controlnet_{k}"] = cn
    models["vae"] = AutoencoderKL(**vae)
    return TinyModels(folder, models, config)


def load_ours(tiny: TinyModels, name: str):
    """`load_model` of the saved model `name` ("unet", "controlnet_0", "adapter", ...): (module, params)."""
    return load_model(tiny.folder / name)


def diffusers_latents(tiny: TinyModels, scheduler, *, prompt_embeds, negative_prompt_embeds, latents,
                      steps: int, guidance_scale: float, noises=None, controlnets=(), images=None,
                      adapters=(), init_latents=None, **call_kwargs) -> np.ndarray:
    """Run diffusers' pipeline and return the final latents (NCHW numpy).

    With `init_latents`, `StableDiffusionControlNetImg2ImgPipeline` runs on them (a 4-channel
    `image` skips the VAE) and `latents` is the noise its `prepare_latents` draws.
    """
    import torch
    from diffusers import (
        MultiAdapter,
        MultiControlNetModel,
        StableDiffusionAdapterPipeline,
        StableDiffusionControlNetImg2ImgPipeline,
        StableDiffusionControlNetPipeline,
    )

    common = dict(vae=tiny.torch["vae"], text_encoder=None, tokenizer=None, unet=tiny.torch["unet"],
                  scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if adapters:
        nets = [tiny.torch[a] for a in adapters]
        pipe = StableDiffusionAdapterPipeline(adapter=nets[0] if len(nets) == 1 else MultiAdapter(nets), **common)
    else:
        nets = [tiny.torch[c] for c in controlnets]
        cls = StableDiffusionControlNetPipeline if init_latents is None else StableDiffusionControlNetImg2ImgPipeline
        pipe = cls(controlnet=nets[0] if len(nets) == 1 else MultiControlNetModel(nets), **common)
    pipe.set_progress_bar_config(disable=True)
    counter = {"i": 0}
    module = sys.modules[type(scheduler).__module__]
    saved = getattr(module, "randn_tensor", None)

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        z = torch.from_numpy(np.asarray(noises[counter["i"]])).to(dtype or torch.float32)
        return z

    def on_step(p, i, t, kw):
        counter["i"] = i + 1
        return {}

    if saved is not None and noises is not None:
        module.randn_tensor = fake_randn
    pipe_module = sys.modules[type(pipe).__module__]
    pipe_randn = pipe_module.randn_tensor
    try:
        image = images[0] if len(images) == 1 else list(images)
        if init_latents is not None:
            start_noise = latents
            pipe_module.randn_tensor = lambda shape, **kw: start_noise.clone()
            call_kwargs = dict(call_kwargs, control_image=image)
            image, latents = init_latents, None
        if adapters:  # this pipeline still has the older per-step callback
            progress = dict(callback=lambda i, t, lat: on_step(None, i, t, None), callback_steps=1)
        else:
            progress = dict(callback_on_step_end=on_step)
        with torch.no_grad():
            out = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, image=image,
                       latents=latents, num_inference_steps=steps, guidance_scale=guidance_scale,
                       output_type="latent", **progress, **call_kwargs)
    finally:
        pipe_module.randn_tensor = pipe_randn
        if saved is not None:
            module.randn_tensor = saved
    return out.images.numpy()


def reference_loop(model_jit, plan, x, cond, noises=None) -> np.ndarray:
    """Our solver updates run one model evaluation at a time (same arithmetic as the scan body)."""
    update = plan.update_fn()
    state = plan.init_state(jnp.asarray(x, jnp.float32))
    for i in range(plan.num_evals):
        row = {k: jnp.asarray(v[i]) for k, v in plan.rows.items()}
        c = with_step(cond, StepInfo(jnp.int32(i), plan.num_evals, plan.num_inference_steps))
        out = model_jit(state["x"] / row["in_div"], row["t"], c)
        z = jnp.zeros((), jnp.float32) if noises is None else jnp.asarray(noises[i])
        state = update(state, jnp.asarray(out, jnp.float32), row, z)
    return np.asarray(plan.output(state))


def to_nhwc(t) -> jnp.ndarray:
    """A (B, C, H, W) torch tensor or array as a (B, H, W, C) JAX array."""
    return jnp.asarray(nchw_to_nhwc(t.numpy() if hasattr(t, "numpy") else t))


TINY_TEXT = dict(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
                 num_attention_heads=4, num_hidden_layers=3, pad_token_id=1, vocab_size=1000)


def save_tiny_pipeline(folder: str | Path, *, kind: str = "sd", scheduler: str = "PNDMScheduler", seed: int = 0):
    """A diffusers pipeline folder with tiny random components, saved by diffusers itself.

    kind: "sd" (StableDiffusionPipeline), "controlnet", "multi-controlnet", "adapter",
    "controlnet-img2img", or a concatenation-conditioned family: "inpaint" (9-channel U-Net),
    "controlnet-inpaint" (9 channels plus a 4-channel ControlNet), "depth" (5, saved without a
    depth estimator) and "instruct-pix2pix" (8); any other raises `ValueError`. Returns the
    in-memory diffusers pipeline.
    """
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .reference import tiny_clip_tokenizer

    folder = Path(folder)
    width = {"inpaint": 9, "controlnet-inpaint": 9, "depth": 5, "instruct-pix2pix": 8}.get(kind, 4)
    tiny = build_tiny_models(folder / "_models", adapter=kind == "adapter", num_controlnets=2, seed=seed,
                             unet_in_channels=width)
    torch.manual_seed(seed)
    tok = CLIPTokenizer.from_pretrained(tiny_clip_tokenizer(folder / "_tokenizer"))
    sched_cls = getattr(diffusers, scheduler)
    sched = sched_cls.from_config({"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                                   "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
                                   "skip_prk_steps": True})
    common = dict(vae=randomize_(tiny.torch["vae"], seed + 9), text_encoder=randomize_(CLIPTextModel(
        CLIPTextConfig(**TINY_TEXT)), seed + 8), tokenizer=tok, unet=tiny.torch["unet"], scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if kind == "sd":
        pipe = diffusers.StableDiffusionPipeline(**common)
    elif kind in ("controlnet", "controlnet-img2img"):
        cls = diffusers.StableDiffusionControlNetPipeline if kind == "controlnet" else \
            diffusers.StableDiffusionControlNetImg2ImgPipeline
        pipe = cls(controlnet=tiny.torch["controlnet_0"], **common)
    elif kind == "multi-controlnet":
        pipe = diffusers.StableDiffusionControlNetPipeline(
            controlnet=diffusers.MultiControlNetModel([tiny.torch["controlnet_0"], tiny.torch["controlnet_1"]]),
            **common)
    elif kind == "adapter":
        pipe = diffusers.StableDiffusionAdapterPipeline(adapter=tiny.torch["adapter"], **common)
    elif kind == "inpaint":
        pipe = diffusers.StableDiffusionInpaintPipeline(**common)
    elif kind == "controlnet-inpaint":
        pipe = diffusers.StableDiffusionControlNetInpaintPipeline(controlnet=tiny.torch["controlnet_0"], **common)
    elif kind == "depth":
        common = {k: v for k, v in common.items() if k not in ("safety_checker", "feature_extractor",
                                                               "requires_safety_checker")}
        pipe = diffusers.StableDiffusionDepth2ImgPipeline(depth_estimator=None, feature_extractor=None, **common)
    elif kind == "instruct-pix2pix":
        pipe = diffusers.StableDiffusionInstructPix2PixPipeline(**common)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder / "pipeline")
    return pipe
