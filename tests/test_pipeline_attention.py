"""`Pipeline` with the attention techniques (sag_scale, pag_scale, token_indices, edit_source /
edit_target) against diffusers' SAG, PAG, Attend-and-Excite and Pix2Pix-Zero pipelines on a tiny
random folder saved by diffusers: same prompts, start noise and DDIM; final images compared. And
the argument checks, which all fail before anything compiles."""

import numpy as np
import pytest

from jaxcontrol.errors import ConfigError
from jaxcontrol.pipeline import Pipeline
from jaxcontrol.testing.pipeline_parity import save_tiny_pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red circle with light blue background", "a green square"]
H = W = 16  # pixels; latents 8x8, the tiny U-Net's cross-attention and mid block at 4x4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("attn-pipe")
    ref = save_tiny_pipeline(root)
    parts = {k: getattr(ref, k) for k in ("vae", "text_encoder", "tokenizer", "unet")}
    parts["scheduler"] = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    return root / "pipeline", parts, Pipeline.from_pretrained(root / "pipeline")


def _noise(b, seed=0):
    return torch.randn(b, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(seed))


def _rel(ours, ref):
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-6))


def _ref(cls, parts, **extra):
    pipe = cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(pipe, noise, **kw):
    return pipe(PROMPTS, height=H, width=W, scheduler="ddim", latents=noise.numpy().transpose(0, 2, 3, 1),
                output_type="float", **kw)


def test_sag_and_pag_match_diffusers(tiny):
    _, parts, pipe = tiny
    noise = _noise(2)
    kw = dict(height=H, width=W, num_inference_steps=3, guidance_scale=6.0, output_type="np")
    with torch.no_grad():
        ref_sag = _ref(diffusers.StableDiffusionSAGPipeline, parts)(PROMPTS, latents=noise, sag_scale=0.75, **kw).images
        ref_pag = _ref(diffusers.StableDiffusionPAGPipeline, parts, pag_applied_layers=["mid", "up_blocks.0"])(
            PROMPTS, latents=noise, pag_scale=3.0, **kw).images
        plain = _ref(diffusers.StableDiffusionPipeline, parts)(PROMPTS, latents=noise, **kw).images
    common = dict(num_inference_steps=3, guidance_scale=6.0)
    ours_sag = _ours(pipe, noise, sag_scale=0.75, **common)
    assert _rel(ours_sag, ref_sag) < 1e-4 and _rel(ref_sag, plain) > 1e-3
    assert pipe.last_settings["sag_scale"] == 0.75
    ours_pag = _ours(pipe, noise, pag_scale=3.0, pag_applied_layers=["mid", "up_blocks.0"], **common)
    assert _rel(ours_pag, ref_pag) < 1e-4 and _rel(ref_pag, plain) > 1e-3
    assert pipe.last_settings["pag"]["layers"] == [
        "mid_block.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn1", "up_blocks.0.attentions.1.transformer_blocks.0.attn1",
        "up_blocks.0.attentions.2.transformer_blocks.0.attn1"]


@pytest.mark.slow
def test_attend_and_excite_and_pix2pix_zero_match_diffusers(tiny):
    _, parts, pipe = tiny
    noise = _noise(2, seed=1)
    tokens = [[2, 4], [3]]
    with torch.no_grad():
        ae = _ref(diffusers.StableDiffusionAttendAndExcitePipeline, parts)
    ref = ae(PROMPTS, latents=noise, height=H, width=W, num_inference_steps=3, guidance_scale=6.0,
             token_indices=tokens, attn_res=(4, 4), max_iter_to_alter=2, output_type="np").images
    ours = _ours(pipe, noise, num_inference_steps=3, guidance_scale=6.0, token_indices=tokens, attn_res=(4, 4),
                 max_iter_to_alter=2)
    assert _rel(ours, ref) < 1e-4
    assert pipe.last_settings["attend_and_excite"]["attn_res"] == [4, 4]

    source, target = ["a circle", "a round disc"], ["a square", "a box", "a cube"]
    p2p = _ref(diffusers.StableDiffusionPix2PixZeroPipeline, parts, caption_generator=None, caption_processor=None,
               inverse_scheduler=diffusers.DDIMInverseScheduler.from_config(parts["scheduler"].config))
    one = _noise(1, seed=2)
    ref = p2p(PROMPTS[:1], source_embeds=p2p.get_embeds(source), target_embeds=p2p.get_embeds(target), latents=one,
              height=H, width=W, num_inference_steps=3, guidance_scale=6.0, cross_attention_guidance_amount=0.2,
              output_type="np").images
    ours = pipe(PROMPTS[:1], height=H, width=W, scheduler="ddim", latents=one.numpy().transpose(0, 2, 3, 1),
                num_inference_steps=3, guidance_scale=6.0, edit_source=source, edit_target=target,
                cross_attention_guidance_amount=0.2, output_type="float")
    assert _rel(ours, ref) < 1e-4
    assert pipe.last_settings["pix2pix_zero"]["start"] == "generate"


def test_numpy_values_are_accepted(tiny):
    _, _, pipe = tiny
    settings, _, _, _ = pipe.check_inputs(PROMPTS, height=H, width=W, token_indices=[np.int64(2)], attn_res=(4, 4),
                                          thresholds={np.int32(0): np.float32(0.5)})
    assert settings.excite[1] == ((0, 0.5),)


@pytest.mark.slow
def test_pix2pix_zero_from_an_image_starts_at_the_solvers_noise_level(tiny):
    """The inverted latents enter an Euler-type solver's state scaled by its first input scaling, so
    Euler and DDIM edit the same start (they differ by their discretisation only)."""
    _, _, pipe = tiny
    image = np.random.default_rng(0).random((1, H, W, 3)).astype(np.float32)
    kw = dict(height=H, width=W, num_inference_steps=3, guidance_scale=5.0, edit_source=["a"], edit_target=["a"],
              cross_attention_guidance_amount=0.0, init_image=image, output_type="latent")
    ddim = pipe(PROMPTS[:1], scheduler="ddim", **kw)
    euler = pipe(PROMPTS[:1], scheduler="euler", **kw)
    assert _rel(euler, ddim) < 0.05, _rel(euler, ddim)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sag_scale=-1.0), "sag_scale=-1.0 is out of range"),
    (dict(pag_scale=2.0, pag_applied_layers=["down_blocks.9"]), "'down_blocks.9' matches no self-attention"),
    (dict(pag_scale=2.0, pag_applied_layers="mid"), "pag_applied_layers must be a list"),
    (dict(token_indices=[0], attn_res=(4, 4)), "token index 0 is outside"),
    (dict(token_indices=[[1], [2], [3]], attn_res=(4, 4)), "3 lists for 2 prompts"),
    (dict(token_indices=[2], attn_res=(16, 16)), r"attn_res=\(16, 16\).*maps are \[\(4, 4\)\]"),
    (dict(token_indices=[2], attn_res=(4, 4), edit_source=["a"], edit_target=["b"]), "use one of them"),
    (dict(edit_source=["a cat"]), "edit_target must be a non-empty list"),
    (dict(edit_source=["a"], edit_target=["b"], guidance_scale=1.0), "guidance_scale > 1"),
    (dict(edit_source=["a"], edit_target=["b"], sag_scale=0.5), "do not combine with Pix2Pix-Zero"),
    (dict(sag_scale=0.5, height=8, width=8), "larger than 4x4"),
    (dict(edit_source=["a"], edit_target=["b"], guidance_rescale=0.5), "guidance_rescale does not apply"),
    (dict(token_indices=[1], attn_res=(1, 1), height=4, width=4), "attn_res must be two integers >= 2"),
    (dict(token_indices=[1], attn_res=(4, 4), thresholds={True: 0.5}), "thresholds must map"),
    (dict(pag_applied_layers=["nonexistent"]), "'nonexistent' matches no self-attention"),
])
def test_bad_attention_arguments_fail_before_compiling(tiny, kwargs, match):
    _, _, pipe = tiny
    kw = dict(height=H, width=W)
    kw.update(kwargs)
    before = len(pipe._programs)
    with pytest.raises(ConfigError, match=match):
        pipe.check_inputs(PROMPTS, **kw)
    assert len(pipe._programs) == before
