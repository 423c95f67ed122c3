"""SDXL: the text_time U-Net inputs, the two text encoders, the micro-conditioning and the base ->
refiner hand-off, against diffusers' SDXL pipelines on tiny random folders (saved by diffusers).

Network parity (the tiny SDXL U-Net, ControlNet-XL and Adapter-XL on the SDXL U-Net) runs in
test_unet_parity.py / test_adapter.py through the "tiny-sdxl-test" and "unet-sdxl-tiny-adapter" cases.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcontrol.errors import ConfigError
from jaxcontrol.models import UNet2DConditionModel
from jaxcontrol.models.configs import UNet2DConditionConfig
from jaxcontrol.pipeline import AdapterInput, ControlInput, Pipeline
from jaxcontrol.schedulers import make_plan
from jaxcontrol.testing.parity import TINY_SDXL_TEST

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxcontrol.testing.sdxl_parity import save_tiny_sdxl_pipeline  # noqa: E402

H = W = 16  # pixels; latents 8x8 (VAE factor 2)
PROMPTS = ["a red circle", "a green square"]


def _nhwc(t):
    return t.numpy().transpose(0, 2, 3, 1)


def _rel(ours, ref):
    ref = _nhwc(ref) if hasattr(ref, "numpy") else ref
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-6))


def _noise(b, seed=0):
    return torch.randn(b, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """kind -> (our Pipeline, diffusers' pipeline), built on first use."""
    cache = {}

    def get(kind, seed=0):
        if kind not in cache:
            root = tmp_path_factory.mktemp(kind)
            ref = save_tiny_sdxl_pipeline(root, kind=kind, seed=seed)
            cache[kind] = (Pipeline.from_pretrained(root / "pipeline"), ref)
        return cache[kind]

    return get


def test_base_pipeline_prompts_negatives_and_micro_conditioning(xl):
    ours, ref = xl("base")
    assert ours.xl and ours.force_zeros_for_empty_prompt and not ours.requires_aesthetics_score
    common = dict(height=H, width=W, num_inference_steps=4, guidance_scale=5.0)
    # no negative prompt: force_zeros_for_empty_prompt zeroes the negative embeddings
    noise = _noise(2)
    with torch.no_grad():
        want = ref(PROMPTS, latents=noise, output_type="np", **common).images
    got = ours(PROMPTS, latents=_nhwc(noise), output_type="float", **common)
    assert _rel(got, want) < 1e-4
    assert ours.last_settings["sdxl"]["time_ids"] == [16, 16, 0, 0, 16, 16]
    # negative prompts, a second prompt for text_encoder_2, clip_skip, and every micro-conditioning id
    # (batch 1: diffusers' text-to-image pipeline pairs the negative ids with the wrong rows beyond one image)
    kw = dict(negative_prompt=["a blue circle"], prompt_2=["a yellow square"], negative_prompt_2=["a square"],
              clip_skip=1, original_size=(32, 24), crops_coords_top_left=(3, 5), target_size=(16, 8),
              negative_original_size=(8, 8), negative_crops_coords_top_left=(1, 2), negative_target_size=(16, 16))
    noise = _noise(1, seed=3)
    with torch.no_grad():
        want = ref(PROMPTS[:1], latents=noise, output_type="np", **common, **kw).images
    got = ours(PROMPTS[:1], latents=_nhwc(noise), output_type="float", **common, **kw)
    assert _rel(got, want) < 1e-4
    assert ours.last_settings["sdxl"]["negative_time_ids"] == [8, 8, 1, 2, 16, 16]


def test_base_to_refiner_hand_off(xl):
    base, ref_base = xl("base")
    refiner, ref_refiner = xl("refiner", seed=3)
    assert refiner.requires_aesthetics_score and refiner.text_encoder is None
    noise = _noise(1)
    common = dict(num_inference_steps=10, guidance_scale=5.0)
    with torch.no_grad():
        lat = ref_base(PROMPTS[:1], height=H, width=W, latents=noise, output_type="latent", denoising_end=0.7,
                       **common).images
        want = ref_refiner(PROMPTS[:1], image=lat, denoising_start=0.7, output_type="np", aesthetic_score=7.0,
                           **common).images
    ours_lat = base(PROMPTS[:1], height=H, width=W, latents=_nhwc(noise), output_type="latent", denoising_end=0.7,
                    **common)
    assert _rel(ours_lat, lat) < 1e-4
    assert base.last_settings["timesteps"] == [901, 801, 701, 601, 501, 401, 301]
    got = refiner(PROMPTS[:1], init_latents=ours_lat, denoising_start=0.7, output_type="float", aesthetic_score=7.0,
                  **common)
    assert refiner.last_settings["timesteps"] == [201, 101, 1]
    assert refiner.last_settings["sdxl"]["time_ids"] == [16, 16, 0, 0, 7.0]
    assert _rel(got, want) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("solver,cls", [("heun", "HeunDiscreteScheduler"),
                                        ("dpmpp_2m", "DPMSolverMultistepScheduler")])
def test_hand_off_with_other_solvers(xl, solver, cls):
    """Heun (two evaluations a step: an even count grows by one) and DPM-Solver++ (restarts at first order)."""
    base, ref_base = xl("base")
    refiner, ref_refiner = xl("refiner", seed=3)
    saved = [p.scheduler for p in (ref_base, ref_refiner)]
    try:
        for pipe in (ref_base, ref_refiner):
            pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config)
        _hand_off(base, ref_base, refiner, ref_refiner, solver)
    finally:  # the fixture's pipelines are shared with the other tests
        ref_base.scheduler, ref_refiner.scheduler = saved


def _hand_off(base, ref_base, refiner, ref_refiner, solver):
    noise = _noise(1)
    common = dict(num_inference_steps=10, guidance_scale=5.0)
    with torch.no_grad():
        lat = ref_base(PROMPTS[:1], height=H, width=W, latents=noise, output_type="latent", denoising_end=0.7,
                       **common).images
        want = ref_refiner(PROMPTS[:1], image=lat, denoising_start=0.7, output_type="np", **common).images
    got_lat = base(PROMPTS[:1], height=H, width=W, latents=_nhwc(noise), output_type="latent", denoising_end=0.7,
                   scheduler=solver, **common)
    assert _rel(got_lat, lat) < 1e-4
    got = refiner(PROMPTS[:1], init_latents=got_lat, denoising_start=0.7, output_type="float", scheduler=solver,
                  **common)
    ours_ts = [float(t) for t in refiner.last_settings["timesteps"]]
    assert ours_ts == [float(t) for t in ref_refiner.scheduler.timesteps[-len(ours_ts):]]
    assert ours_ts[0] < 400  # the refiner's part only
    assert _rel(got, want) < 1e-4


def _image(b=2, seed=1):
    return torch.rand(b, 3, H, W, generator=torch.Generator().manual_seed(seed))


def _text_to_image_rel(ours, ref, ref_kw: dict, our_kw: dict, b: int = 2, steps: int = 4) -> float:
    """Relative difference of text-to-image runs of ours and diffusers' pipeline on the same noise,
    each with its own keywords for the rest (control images, adapters, ...)."""
    noise = _noise(b)
    common = dict(height=H, width=W, num_inference_steps=steps, guidance_scale=5.0)
    with torch.no_grad():
        want = ref(PROMPTS[:b], latents=noise, output_type="np", **common, **ref_kw).images
    got = ours(PROMPTS[:b], latents=_nhwc(noise), output_type="float", **common, **our_kw)
    return _rel(got, want)


@pytest.mark.slow  # ControlNet-XL itself: the tiny-sdxl-test parity case (fast)
def test_controlnet_xl_pipeline_with_window(xl):
    image = _image()
    assert _text_to_image_rel(*xl("controlnet"),
                              dict(image=image, controlnet_conditioning_scale=0.7, control_guidance_end=0.75),
                              dict(controls=[ControlInput(_nhwc(image), 0.7, 0.0, 0.75)])) < 1e-4


@pytest.mark.slow
def test_multi_controlnet_xl_pipeline(xl):
    image = _image()
    flipped = image.flip(-1)
    assert _text_to_image_rel(*xl("multi-controlnet"),
                              dict(image=[image, flipped], controlnet_conditioning_scale=[0.7, 0.4]),
                              dict(controls=[ControlInput(_nhwc(image), 0.7), ControlInput(_nhwc(flipped), 0.4)])
                              ) < 1e-4


@pytest.mark.slow  # Adapter-XL on the SDXL U-Net: the unet-sdxl-tiny-adapter parity case (fast)
def test_adapter_xl_pipeline(xl):
    image = _image()
    assert _text_to_image_rel(*xl("adapter"),
                              dict(image=image, adapter_conditioning_scale=0.8, adapter_conditioning_factor=0.5),
                              dict(adapters=[AdapterInput(_nhwc(image), 0.8)], adapter_conditioning_factor=0.5)) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["img2img", "refiner"])
def test_img2img_and_refiner_from_latents(xl, kind):
    ours, ref = xl(kind, seed=3 if kind == "refiner" else 0)
    g = torch.Generator().manual_seed(2)
    lat = torch.randn(1, 4, H // 2, W // 2, generator=g)
    common = dict(num_inference_steps=5, strength=0.6, guidance_scale=5.0)
    with torch.no_grad():
        want = ref(PROMPTS[:1], image=lat, generator=torch.Generator().manual_seed(5), output_type="np",
                   **common).images
    # diffusers draws the img2img noise first from the generator: the same draw, given to us
    noise = diffusers.utils.torch_utils.randn_tensor(lat.shape, generator=torch.Generator().manual_seed(5))
    got = ours(PROMPTS[:1], init_latents=_nhwc(lat), latents=_nhwc(noise), output_type="float", **common)
    assert _rel(got, want) < 1e-4


def test_unet_text_time_inputs_are_checked():
    import jax

    config = UNet2DConditionConfig.from_dict(TINY_SDXL_TEST)
    unet = UNet2DConditionModel(config)
    x, t, ctx = jnp.zeros((2, 8, 8, 4)), jnp.zeros((2,)), jnp.zeros((2, 3, 64))
    # shapes only (eval_shape traces, nothing runs): the checks are made while tracing
    params = jax.eval_shape(lambda: unet.init(jax.random.key(0), *unet.dummy_inputs()))["params"]
    assert params["add_embedding"]["linear_1"]["kernel"].shape == (80, 128)
    ok = {"text_embeds": jnp.zeros((2, 32)), "time_ids": jnp.zeros((2, 6))}

    def apply(added):
        return jax.eval_shape(lambda p: unet.apply({"params": p}, x, t, ctx, added_cond_kwargs=added), params)

    assert apply(ok).shape == (2, 8, 8, 4)
    with pytest.raises(ValueError, match="missing \\['time_ids'\\]"):
        apply({"text_embeds": ok["text_embeds"]})
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim is 80"):
        apply({**ok, "time_ids": jnp.zeros((2, 5))})
    with pytest.raises(ValueError, match="must have shape \\(2, n\\)"):
        apply({**ok, "text_embeds": jnp.zeros((1, 32))})
    with pytest.raises(ConfigError, match="needs addition_time_embed_dim"):
        UNet2DConditionConfig.from_dict({**TINY_SDXL_TEST, "addition_time_embed_dim": None})
    with pytest.raises(ConfigError, match="addition_embed_type='text'"):
        UNet2DConditionConfig.from_dict({**TINY_SDXL_TEST, "addition_embed_type": "text"})


def test_sdxl_arguments_are_checked(xl, tmp_path):
    ours, _ = xl("base")
    for kw, match in [
        (dict(original_size=(16,)), "original_size must be a \\(height, width\\)"),
        (dict(crops_coords_top_left="0,0"), "crops_coords_top_left must be"),
        (dict(aesthetic_score=float("nan")), "aesthetic_score must be a finite number"),
        (dict(denoising_end=1.0), "denoising_end must be a fraction"),
        (dict(denoising_start=0.5), "pass them as init_latents"),
        (dict(prompt_2=["a", "b", "c"]), "prompt_2 must be a string or 2 strings"),
        (dict(init_latents=np.zeros((1, 8, 8, 4), np.float32), denoising_start=0.5, strength=0.3),
         "strength does not apply with denoising_start"),
    ]:
        with pytest.raises(ConfigError, match=match):
            ours.check_inputs(PROMPTS, height=H, width=W, **kw)
    with pytest.raises(ConfigError, match="leave no step"):
        make_plan(ours.scheduler_config, 4, denoising_end=0.01)


def test_sd_pipeline_refuses_sdxl_arguments(tmp_path):
    from jaxcontrol.testing.pipeline_parity import save_tiny_pipeline

    save_tiny_pipeline(tmp_path, kind="sd")
    pipe = Pipeline.from_pretrained(tmp_path / "pipeline")
    assert not pipe.xl
    with pytest.raises(ConfigError, match="apply to SDXL models only"):
        pipe.check_inputs(PROMPTS, height=H, width=W, original_size=(32, 32))


def test_infer_cli_on_an_sdxl_folder(xl, tmp_path):
    """infer.py on an SDXL folder: micro-conditioning flags reach the pipeline (sidecar), no negative
    prompt zeroes the negative embeddings, and the image equals the Pipeline's own."""
    from jaxcontrol.commands.infer import main

    ours, _ = xl("base")
    folder = ours.bundle.path
    out = tmp_path / "out"
    assert main(["--model", str(folder), "--prompt", "a red circle", "--prompt-2", "a square", "--steps", "3",
                 "--height", "16", "--width", "16", "--original-size", "32,24", "--crops-coords-top-left", "2,4",
                 "--guidance-scale", "5", "--vae", str(folder / "vae"), "--output", str(out), "--no-progress"]) == 0
    side = json.loads((out / "image_00000.json").read_text())
    assert side["prompt_2"] == "a square" and side["negative_prompt_2"] is None
    assert side["vae"]["path"] == str(folder / "vae") and len(side["vae"]["sha256"]) == 64
    assert side["sdxl"]["time_ids"] == [32, 24, 2, 4, 16, 16] and side["sdxl"]["zero_negative"] is True
    assert side["negative_prompt"] is None
    want = ours(["a red circle"], height=16, width=16, num_inference_steps=3, guidance_scale=5.0, prompt_2="a square",
                original_size=(32, 24), crops_coords_top_left=(2, 4))
    got = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(out / "image_00000.png"))
    assert np.array_equal(got, want[0])


@pytest.mark.slow  # about 40 s: two pipelines compiled twice (the Python hand-off is in the fast set)
def test_infer_cli_refiner_hand_off(xl, tmp_path, capsys):
    """infer.py --refiner: the model denoises the first --high-noise-frac of the schedule, the
    refiner the rest from its latents; the PNG equals the Pipeline hand-off (compared with
    diffusers' ensemble in test_base_to_refiner_hand_off). Misuse is one usage error."""
    from jaxcontrol.commands.infer import main

    base, _ = xl("base")
    refiner, _ = xl("refiner", seed=3)
    out = tmp_path / "out"
    common = ["--model", str(base.bundle.path), "--prompt", "a red circle", "--steps", "5", "--height", "16",
              "--width", "16", "--guidance-scale", "5", "--no-progress"]
    assert main(common + ["--refiner", str(refiner.bundle.path), "--high-noise-frac", "0.6", "--aesthetic-score",
                          "7", "--output", str(out)]) == 0
    side = json.loads((out / "image_00000.json").read_text())
    assert side["refiner"]["high_noise_frac"] == 0.6 and len(side["refiner"]["sha256"]) == 64
    assert side["refiner_settings"]["sdxl"]["time_ids"] == [16, 16, 0, 0, 7.0]
    kw = dict(height=16, width=16, num_inference_steps=5, guidance_scale=5.0)
    lat = base(["a red circle"], denoising_end=0.6, output_type="latent", **kw)
    want = refiner(["a red circle"], init_latents=lat, denoising_start=0.6, aesthetic_score=7.0, **kw)
    got = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(out / "image_00000.png"))
    assert np.array_equal(got, want[0])
    for extra, message in ((["--refiner", str(refiner.bundle.path), "--high-noise-frac", "1.0"], "must be in (0, 1)"),
                           (["--aesthetic-score", "3"], "--aesthetic-score: this SDXL model is conditioned on the "
                                                        "target size"),
                           (["--high-noise-frac", "0.5"], "applies with --refiner"),
                           (["--refiner", str(tmp_path / "nope")], "no such file")):
        capsys.readouterr()
        assert main(common + extra + ["--output", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow  # about 35 s: its own pipeline, loaded twice, four programs
def test_sdxl_textual_inversion_matches_diffusers(tmp_path):
    """An SDXL embedding file (clip_l / clip_g, two vectors each) loads into both encoders, as
    diffusers' two load_textual_inversion calls (text_encoder / text_encoder_2) do: the same image;
    unloading restores the pipeline; an SD-1/2 file is refused naming what is missing."""
    from jaxcontrol.convert.safetensors_file import save_safetensors
    from jaxcontrol.errors import CheckpointError

    ref = save_tiny_sdxl_pipeline(tmp_path / "model", seed=6)
    g = np.random.default_rng(0)
    vectors = {"clip_l": g.normal(0, 0.5, (2, 32)).astype(np.float32),
               "clip_g": g.normal(0, 0.5, (2, 32)).astype(np.float32)}
    save_safetensors(tmp_path / "cat.safetensors", vectors)
    for key, encoder, tok in (("clip_l", ref.text_encoder, ref.tokenizer), ("clip_g", ref.text_encoder_2,
                                                                            ref.tokenizer_2)):
        ref.load_textual_inversion(torch.from_numpy(vectors[key]), token="<cat>", text_encoder=encoder, tokenizer=tok)
    prompt = ["a <cat> circle"]
    noise = _noise(1, seed=2)
    common = dict(height=H, width=W, num_inference_steps=3, guidance_scale=5.0)
    with torch.no_grad():
        want = ref(prompt, latents=noise, output_type="np", **common).images
    ours = Pipeline.from_pretrained(tmp_path / "model" / "pipeline", embeddings=[(tmp_path / "cat.safetensors", "<cat>")])
    assert ours.embeddings == {"<cat>": ["<cat>", "<cat>_1"]}
    got = ours(prompt, latents=_nhwc(noise), output_type="float", **common)
    assert _rel(got, want) < 1e-4
    plain = Pipeline.from_pretrained(tmp_path / "model" / "pipeline")(prompt, latents=_nhwc(noise), output_type="float",
                                                                       **common)
    assert _rel(got, plain) > 1e-3  # the new words are in both encoders' inputs
    ours.unload_textual_inversion()
    assert ours.embeddings == {} and _rel(ours(prompt, latents=_nhwc(noise), output_type="float", **common), plain) < 1e-6
    save_safetensors(tmp_path / "sd.safetensors", {"<dog>": vectors["clip_l"]})
    with pytest.raises(CheckpointError, match=r"missing \['clip_l', 'clip_g'\]"):
        ours.load_textual_inversion(tmp_path / "sd.safetensors")
    with pytest.raises(ConfigError, match="text_encoder_2: embedding '<x>'.*width 32"):
        ours.load_textual_inversion(("<x>", {"text_encoder": vectors["clip_l"], "text_encoder_2": np.ones((1, 8))}))
    assert ours.embeddings == {}  # nothing half-added


@pytest.mark.slow  # about 25 s each; PEFT LoRAs are compared with diffusers in the fast set on SD (test_lora.py)
@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_sdxl_peft_lora_matches_diffusers(tmp_path, kind):
    """A PEFT LoRA on the U-Net and both text encoders (diffusers' SDXL save_lora_weights), applied by
    diffusers and by us (merged), gives the same images."""
    from jaxcontrol.testing.lora_parity import save_peft_lora

    ref = save_tiny_sdxl_pipeline(tmp_path / "model", kind=kind, seed=4)
    path, _ = save_peft_lora(ref, tmp_path / "lora", unet_rank=4, text_rank=2, std=0.1)
    ours = Pipeline.from_pretrained(tmp_path / "model" / "pipeline", loras=[path], fuse_loras=True)
    lora = ours._loras[0]["lora"]
    assert set(lora.weights) == ({"unet", "text_encoder_2"} if kind == "refiner"
                                 else {"unet", "text_encoder", "text_encoder_2"})
    noise = _noise(1, seed=5)
    common = dict(num_inference_steps=3, guidance_scale=5.0, negative_prompt=["a square"])
    with torch.no_grad():
        if kind == "refiner":
            want = ref(PROMPTS[:1], image=noise, denoising_start=0.5, output_type="np", **common).images
        else:
            want = ref(PROMPTS[:1], height=H, width=W, latents=noise, output_type="np", **common).images
    if kind == "refiner":
        got = ours(PROMPTS[:1], init_latents=_nhwc(noise), denoising_start=0.5, output_type="float", **common)
    else:
        got = ours(PROMPTS[:1], height=H, width=W, latents=_nhwc(noise), output_type="float", **common)
    assert _rel(got, want) < 1e-4


@pytest.mark.slow
def test_replacement_vae_like_the_fp16_fix(xl, tmp_path):
    """`vae=` swaps the VAE (as users swap in SDXL's fp16-fix VAE): the same images as diffusers with it."""
    from jaxcontrol.testing.pipeline_parity import VAE_TINY
    from jaxcontrol.testing.reference import randomize_

    ours, ref = xl("base")
    other = randomize_(diffusers.AutoencoderKL(**VAE_TINY, scaling_factor=0.13025, force_upcast=False), 11)
    other.save_pretrained(tmp_path / "vae")
    swapped = Pipeline.from_pretrained(ours.bundle.path, vae=tmp_path / "vae")
    saved = ref.vae
    try:
        ref.vae = other
        assert _text_to_image_rel(swapped, ref, {}, {}, b=1, steps=3) < 1e-4
    finally:
        ref.vae = saved


def test_replacement_vae_is_checked(xl, tmp_path):
    from jaxcontrol.testing.pipeline_parity import VAE_TINY

    ours, ref = xl("base")
    diffusers.AutoencoderKL(**{**VAE_TINY, "latent_channels": 8}).save_pretrained(tmp_path / "vae8")
    with pytest.raises(ConfigError, match="latent_channels=8"):
        Pipeline.from_pretrained(ours.bundle.path, vae=tmp_path / "vae8")
    with pytest.raises(ConfigError, match="not an AutoencoderKL"):
        Pipeline.from_pretrained(ours.bundle.path, vae=ours.bundle.path / "unet")


@pytest.mark.slow
def test_inpainting_with_the_base_unet_matches_diffusers(xl, monkeypatch):
    """StableDiffusionXLInpaintPipeline over the 4-channel base U-Net (blending the known latents at
    each step), with the VAE's mode on both sides (diffusers samples the posterior with the
    generator; patched to its mode) and the same noise."""
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint as inpaint_module

    ours, _ = xl("base")
    ref = save_tiny_sdxl_pipeline(ours.bundle.path.parent / "_inpaint", kind="inpaint")
    monkeypatch.setattr(inpaint_module, "retrieve_latents", lambda out, generator=None, sample_mode="sample":
                        out.latent_dist.mode())
    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, H, W, generator=g)
    mask = (torch.rand(1, 1, H, W, generator=g) > 0.5).float()
    common = dict(num_inference_steps=5, strength=0.7, guidance_scale=5.0)
    with torch.no_grad():
        want = ref(PROMPTS[:1], image=image, mask_image=mask, height=H, width=W, output_type="np",
                   generator=torch.Generator().manual_seed(5), **common).images
        lat = ref.vae.encode(image * 2 - 1).latent_dist.mode() * ref.vae.config.scaling_factor
    noise = diffusers.utils.torch_utils.randn_tensor(lat.shape, generator=torch.Generator().manual_seed(5))
    mine = Pipeline.from_pretrained(ours.bundle.path.parent / "_inpaint" / "pipeline")
    got = mine(PROMPTS[:1], init_latents=_nhwc(lat), mask=_nhwc(mask), latents=_nhwc(noise), height=H, width=W,
               output_type="float", **common)
    assert mine.last_settings["mode"] == "inpaint"
    assert _rel(got, want) < 1e-4


@pytest.mark.slow  # about 30 s; PAG is compared with diffusers on SD in the fast set (test_pipeline_attention.py)
def test_pag_matches_diffusers_sdxl_pag_pipeline(xl):
    """Perturbed-attention guidance against diffusers' StableDiffusionXLPAGPipeline on the same noise."""
    ours, ref = xl("base")
    parts = {k: getattr(ref, k) for k in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet",
                                          "scheduler")}
    pag = diffusers.StableDiffusionXLPAGPipeline(**parts, pag_applied_layers=["mid"])
    pag.set_progress_bar_config(disable=True)
    noise = _noise(2)
    common = dict(height=H, width=W, num_inference_steps=4, guidance_scale=5.0)
    with torch.no_grad():
        want = pag(PROMPTS, latents=noise, pag_scale=3.0, output_type="np", **common).images
        plain = ref(PROMPTS, latents=noise, output_type="np", **common).images
    got = ours(PROMPTS, latents=_nhwc(noise), output_type="float", pag_scale=3.0, pag_applied_layers=["mid"], **common)
    assert _rel(got, want) < 1e-4 and _rel(want, plain) > 1e-3


@pytest.mark.slow  # the rule itself is compared with diffusers on SD in the fast set
def test_guidance_rescale_matches_diffusers_sdxl_pipeline(xl):
    ours, ref = xl("base")
    noise = _noise(2)
    common = dict(height=H, width=W, num_inference_steps=4, guidance_scale=5.0)
    with torch.no_grad():
        want = ref(PROMPTS, latents=noise, guidance_rescale=0.7, output_type="np", **common).images
        plain = ref(PROMPTS, latents=noise, output_type="np", **common).images
    got = ours(PROMPTS, latents=_nhwc(noise), output_type="float", guidance_rescale=0.7, **common)
    assert _rel(got, want) < 1e-4 and _rel(want, plain) > 1e-3


@pytest.mark.slow  # (about 80 s; PAG above exercises the attention machinery on SDXL in the fast suite)
@pytest.mark.parametrize("options", [
    dict(sag_scale=0.75),
    dict(token_indices=[[2], [2]], max_iter_to_alter=2, attn_res=(4, 4)),
    dict(edit_source=["a red circle"], edit_target=["a blue circle"]),
], ids=["sag", "attend-and-excite", "pix2pix-zero"])
def test_attention_techniques_run_on_sdxl(xl, options):
    """The techniques diffusers has no SDXL pipeline for run on the SDXL U-Net (two encoders,
    pooled text and micro-conditioning in every branch) and change the image."""
    ours, _ = xl("base")
    noise = _nhwc(_noise(2))
    common = dict(height=H, width=W, num_inference_steps=4, guidance_scale=5.0, scheduler="ddim", latents=noise,
                  output_type="float")
    plain = ours(PROMPTS, **common)
    got = ours(PROMPTS, **common, **options)
    assert np.isfinite(got).all() and _rel(got, plain) > 1e-4


@pytest.mark.slow  # 9-channel inpainting is compared with diffusers on SD in the fast set (test_concat_models.py)
def test_nine_channel_inpainting_unet_matches_diffusers(xl):
    """StableDiffusionXLInpaintPipeline over a 9-channel inpainting U-Net (as
    diffusers/stable-diffusion-xl-1.0-inpainting-0.1): mask and masked-image latents concatenated,
    img2img micro-conditioning, strength 0.75; diffusers' VAE draws and start noise fixed to ours."""
    import sys

    ours, ref = xl("inpaint-9ch")
    assert ours.xl and ours.kind == "inpaint"
    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, H, W, generator=g)
    mask = (torch.rand(1, 1, H, W, generator=g) > 0.5).float()
    known, masked, noise = (torch.randn(1, 4, H // 2, W // 2, generator=g) for _ in range(3))
    module = sys.modules[type(ref).__module__]
    saved = module.retrieve_latents, module.randn_tensor
    sf = ref.vae.config.scaling_factor
    module.retrieve_latents = lambda *a, **k: known / sf
    module.randn_tensor = lambda shape, **k: noise.clone()
    common = dict(height=H, width=W, num_inference_steps=5, strength=0.75, guidance_scale=5.0)
    try:
        with torch.no_grad():
            want = ref(PROMPTS[:1], image=image, mask_image=mask, masked_image_latents=masked, output_type="np",
                       aesthetic_score=6.0, **common).images
    finally:
        module.retrieve_latents, module.randn_tensor = saved
    got = ours(PROMPTS[:1], init_latents=_nhwc(known), mask=_nhwc(mask), masked_image_latents=_nhwc(masked),
               latents=_nhwc(noise), output_type="float", **common)
    assert ours.last_settings["mode"] == "inpaint"
    assert _rel(got, want) < 1e-4


@pytest.mark.slow
def test_fp16_variant_folder(xl, tmp_path):
    """A folder saved with variant="fp16" (as stabilityai's SDXL repositories ship) loads with
    `variant="fp16"` and samples like diffusers loading the same variant in float32."""
    _, ref = xl("base")
    ref.save_pretrained(tmp_path / "xl", variant="fp16", safe_serialization=True)
    assert (tmp_path / "xl" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "xl", variant="fp16",
                                                                 torch_dtype=torch.float32)
    ours = Pipeline.from_pretrained(tmp_path / "xl", variant="fp16")
    assert _text_to_image_rel(ours, theirs, {}, {}, b=1, steps=3) < 1e-4
