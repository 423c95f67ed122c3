"""Training ControlNet-XL and T2I-Adapter-XL (task="controlnet" / "adapter" on an SDXL pipeline).

The objective is checked against diffusers' own SDXL training scripts, recomputed here in
PyTorch on the same draws: train_controlnet_sdxl.py (the ControlNet-XL's residuals into the frozen
U-Net, MSE to the noise) and train_t2i_adapter_sdxl.py (cubic timesteps, its Euler-sigma form of
the loss), both with the text embeddings of both encoders and the add_time_ids they build from
the resolution and crops_coords_top_left. The models are diffusers' tiny SDXL test configs,
saved by diffusers with random weights; the ControlNet and adapter start from random folders too,
so that they change the prediction.
"""

import json

import jax
import numpy as np
import pytest

from jaxcontrol.errors import ConfigError
from jaxcontrol.training import check_config
from jaxcontrol.training.networks import build_networks
from jaxcontrol.training.step import make_loss_fn
from _smoke import set_keys, smoke_config

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxcontrol.testing.sdxl_parity import save_tiny_sdxl_pipeline  # noqa: E402

RES = 16  # pixels; 8x8 latents (the tiny VAE's factor 2)
CAPTIONS = ["a red circle", "a blue circle on green", "", "a yellow circle"]
needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """kind -> (pipeline folder, diffusers pipeline), built on first use."""
    cache = {}

    def get(kind):
        if kind not in cache:
            root = tmp_path_factory.mktemp(kind)
            ref = save_tiny_sdxl_pipeline(root, kind=kind, seed=3)
            cache[kind] = (root / "pipeline", ref)
        return cache[kind]

    return get


def xl_config(data_dir, folder, task, **overrides):
    c = smoke_config(data_dir)
    c.task = task
    c.model.init = "pretrained"
    c.model.pretrained_path = str(folder)
    c.data.resolution = RES
    c.controlnet.conditioning_embedding_out_channels = (16, 32)
    c.adapter.update(dict(channels=(32, 64), adapter_type="full_adapter_xl", downscale_factor=4, num_res_blocks=2))
    c.loss.proportion_empty_prompts = 0.0
    return set_keys(c, overrides)


def _batch(nets, seed=0):
    """One micro-batch: posterior moments whose variance is negligible (diffusers clamps logvar at
    -30: the sample is the mean to ~1e-7), captions by both tokenizers, condition images."""
    rng = np.random.default_rng(seed)
    b, h = len(CAPTIONS), RES // 2
    mean = rng.normal(size=(b, h, h, 4)).astype(np.float32)
    moments = np.concatenate([mean, np.full_like(mean, -30.0)], axis=-1)
    cond = rng.uniform(size=(b, RES, RES, 3)).astype(np.float32)
    return {"latents": moments, "conditioning_pixel_values": cond, **nets.prompt_ids(CAPTIONS)}, mean, cond


def _torch_text(ref, captions):
    """diffusers' SDXL scripts' encode_prompt: penultimate states of both encoders, the second's pooled."""
    states, pooled = [], None
    with torch.no_grad():
        for tok, enc in ((ref.tokenizer, ref.text_encoder), (ref.tokenizer_2, ref.text_encoder_2)):
            ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out = enc(ids, output_hidden_states=True, return_dict=False)
            pooled = out[0]
            states.append(out[-1][-2])
    return torch.cat(states, dim=-1), pooled


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def _ours(config, workdir, seed=0):
    nets, trainable, frozen = build_networks(check_config(config), workdir)
    batch, mean, cond = _batch(nets, seed)
    loss, aux = jax.jit(make_loss_fn(nets, config))(trainable, frozen, batch, jax.random.key(seed + 11))
    return nets, float(loss), np.asarray(aux["timesteps"]), np.asarray(aux["noise"]), mean, cond


def _added(ref, pooled, crop=(0, 0)):
    time_ids = torch.tensor([[RES, RES, *crop, RES, RES]], dtype=torch.float32).repeat(pooled.shape[0], 1)
    return {"text_embeds": pooled, "time_ids": time_ids}


def test_controlnet_xl_loss_is_diffusers_train_controlnet_sdxl(folders, tmp_path):
    folder, ref = folders("controlnet")
    config = xl_config(tmp_path / "data", folder, "controlnet", **{
        "controlnet.init_from": str(folder / "controlnet"), "sdxl.crops_coords_top_left": (2, 4)})
    nets, loss, t, noise, mean, cond = _ours(config, tmp_path / "run")
    assert nets.xl and nets.time_ids.tolist() == [RES, RES, 2, 4, RES, RES]
    sched = diffusers.DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    with torch.no_grad():
        latents = _nchw(mean) * ref.vae.config.scaling_factor
        noise_t, t_t = _nchw(noise), torch.from_numpy(t.astype(np.int64))
        noisy = sched.add_noise(latents, noise_t, t_t)
        text, pooled = _torch_text(ref, CAPTIONS)
        added = _added(ref, pooled, crop=(2, 4))
        down, mid = ref.controlnet(noisy, t_t, encoder_hidden_states=text, added_cond_kwargs=added,
                                   controlnet_cond=_nchw(cond), return_dict=False)
        pred = ref.unet(noisy, t_t, encoder_hidden_states=text, added_cond_kwargs=added,
                        down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        want = float(torch.nn.functional.mse_loss(pred.float(), noise_t.float(), reduction="mean"))
        plain = float(torch.nn.functional.mse_loss(
            ref.unet(noisy, t_t, encoder_hidden_states=text, added_cond_kwargs=added).sample, noise_t))
    assert abs(loss - want) <= 1e-5 * abs(want), (loss, want)
    assert abs(want - plain) > 1e-3 * want  # the ControlNet's residuals are in the loss


def test_adapter_xl_loss_is_diffusers_train_t2i_adapter_sdxl(folders, tmp_path):
    folder, ref = folders("adapter")
    config = xl_config(tmp_path / "data", folder, "adapter", **{"adapter.init_from": str(folder / "adapter")})
    nets, loss, t, noise, mean, cond = _ours(config, tmp_path / "run")
    # train_t2i_adapter_sdxl.py's cubic draw: t = (1 - u^3) * 1000, floored, so mostly large timesteps
    assert t.dtype.kind == "i" and t.min() >= 0 and t.max() <= 999
    euler = diffusers.EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    with torch.no_grad():
        latents = _nchw(mean) * ref.vae.config.scaling_factor
        noise_t, t_t = _nchw(noise), torch.from_numpy(t.astype(np.int64))
        # the script's form: Euler noise (x0 + sigma eps), the U-Net on the scaled input, the
        # denoised latents against x0 weighted by sigma^-2 (for epsilon prediction)
        noisy = euler.add_noise(latents, noise_t, t_t)
        sigmas = euler.sigmas.to(torch.float32)
        step_indices = [(euler.timesteps == s).nonzero().item() for s in t_t]
        sigma = sigmas[step_indices].flatten().reshape(-1, 1, 1, 1)
        text, pooled = _torch_text(ref, CAPTIONS)
        feats = [f * 1.0 for f in ref.adapter(_nchw(cond))]
        pred = ref.unet(noisy / ((sigma ** 2 + 1) ** 0.5), t_t, encoder_hidden_states=text,
                        added_cond_kwargs=_added(ref, pooled),
                        down_intrablock_additional_residuals=[f.clone() for f in feats]).sample
        denoised = pred * (-sigma) + noisy
        want = float(torch.mean((sigma ** -2.0 * (denoised - latents) ** 2).reshape(len(t), -1), dim=1).mean())
    assert abs(loss - want) <= 1e-4 * abs(want), (loss, want)


@pytest.mark.slow  # about 50 s: two runs' setup and compilation
def test_precomputed_embeddings_give_the_same_losses(folders, tmp_path):
    """data.precompute stores both encoders' states and the pooled embedding; the steps are the same."""
    from jaxcontrol.training import Run

    folder, _ = folders("base")
    losses = {}
    for pre in (False, True):
        config = xl_config(tmp_path / "data", folder, "controlnet", **{
            "data.precompute": pre, "loss.proportion_empty_prompts": 0.5, "steps": 2})
        with Run(config, tmp_path / f"run{int(pre)}") as run:
            state = run.state
            got = []
            for _ in range(2):
                state, metrics = run.step_fn(state, run.frozen, run.next_batch())
                got.append(float(metrics["loss"]))
            losses[pre] = got
            if pre:
                meta = json.loads((tmp_path / "run1" / "precomputed" / "meta.json").read_text())
                assert meta["text_embeddings"]["shape"] == [77, 64]
                assert meta["pooled_text_embeddings"]["shape"] == [32]
    np.testing.assert_allclose(losses[True], losses[False], rtol=2e-5)


def test_sdxl_runs_refuse_what_they_do_not_support(folders, tmp_path):
    folder, _ = folders("base")
    for task in ("lora", "unet", "dreambooth"):
        with pytest.raises(ConfigError, match=f"task='{task}' is not supported on an SDXL model"):
            build_networks(check_config(xl_config(tmp_path / "data", folder, task)), tmp_path / task)
    from jaxcontrol.testing.pipeline_parity import save_tiny_pipeline

    save_tiny_pipeline(tmp_path / "sd", kind="controlnet")  # an SD-1.5-style ControlNet
    sd_controlnet = tmp_path / "sd" / "pipeline" / "controlnet"
    with pytest.raises(ConfigError, match="init_from=.*the ControlNet's .* it was made for another base model"):
        build_networks(check_config(xl_config(tmp_path / "data", folder, "controlnet", **{
            "controlnet.init_from": str(sd_controlnet)})), tmp_path / "c")
    from jaxcontrol.pipeline import Pipeline

    with pytest.raises(ConfigError, match="ControlNet 0: the ControlNet's .* made for another base model"):
        Pipeline.from_pretrained(folder, controlnets=[sd_controlnet])
    refiner, _ = folders("refiner")
    with pytest.raises(ConfigError, match="text_encoder_2 alone.*refiner"):
        build_networks(check_config(xl_config(tmp_path / "data", refiner, "controlnet")), tmp_path / "r")
    with pytest.raises(ConfigError, match="downscale_factor=2 must be 4"):
        build_networks(check_config(xl_config(tmp_path / "data", folder, "adapter", **{
            "adapter.downscale_factor": 2})), tmp_path / "a")
    for value in ((0, 16), (16,), (-1, 2)):
        with pytest.raises(ConfigError, match="config.sdxl.original_size"):
            check_config(xl_config(tmp_path / "data", folder, "controlnet", **{"sdxl.original_size": value}))
    import runpy

    from _smoke import ROOT

    for stage in ("controlnet", "adapter"):  # the example config's stages are valid configs
        example = runpy.run_path(str(ROOT / "configs" / "controlnet_sdxl.py"))["get_config"](stage)
        example.model.pretrained_path = str(folder)
        assert check_config(example).task == stage
    scratch = smoke_config(tmp_path / "data")
    scratch.model.unet = dict(scratch.model.unet, addition_embed_type="text_time", addition_time_embed_dim=4,
                              projection_class_embeddings_input_dim=40)
    with pytest.raises(ConfigError, match="SDXL trains from a pretrained pipeline"):
        build_networks(check_config(scratch), tmp_path / "s")


@pytest.mark.slow  # two runs' setup
def test_precomputed_folder_of_another_model_is_refused(folders, tmp_path):
    """A precomputed_dir encoded for SD (no pooled embeddings, other widths) is not silently reused."""
    from jaxcontrol.training import Run

    sd = smoke_config(tmp_path / "data", **{"data.precompute": True, "data.resolution": RES,
                                            "data.precomputed_dir": str(tmp_path / "pre")})
    sd.controlnet.conditioning_embedding_out_channels = (8,)
    Run(sd, tmp_path / "sd").close()
    folder, _ = folders("base")
    config = xl_config(tmp_path / "data", folder, "controlnet", **{
        "data.precompute": True, "data.precomputed_dir": str(tmp_path / "pre")})
    with pytest.raises(ConfigError, match="does not fit this run.*16 wide, the U-Net takes 64.*pooled"):
        Run(config, tmp_path / "xl")


@pytest.mark.slow
@needs8
def test_train_py_controlnet_xl_sharded_resumes_and_exports_for_diffusers(folders, tmp_path):
    """train.py on 8 devices (data=4 x fsdp=2), stopped at step 2 and rerun to step 4, gives the
    one-device losses; its validation grid is drawn; the exported ControlNet-XL loads in diffusers'
    StableDiffusionXLControlNetPipeline, whose images equal our Pipeline's with the exported weights."""
    import subprocess

    from PIL import Image

    from jaxcontrol.pipeline import ControlInput, Pipeline
    from jaxcontrol.training import Run
    from jaxcontrol.training.logger import read_metrics
    from _smoke import ROOT, train_cmd, train_env

    folder, ref = folders("base")
    data, run = tmp_path / "data", tmp_path / "run"
    args = ["--config", "configs/smoke.py", "--workdir", run, f"--config.data.data_dir={data}",
            "--config.log.tensorboard=False", "--config.model.init=pretrained",
            f"--config.model.pretrained_path={folder}", f"--config.data.resolution={RES}",
            "--config.controlnet.conditioning_embedding_out_channels=(16,32)", "--config.mesh.data=4",
            "--config.mesh.fsdp=2", "--config.validation.at_end=True", "--config.export.at_end=True"]
    env = dict(train_env(tmp_path / "cache"), XLA_FLAGS="--xla_force_host_platform_device_count=8")
    for steps in (2, 4):
        out = subprocess.run(train_cmd(*args, f"--config.steps={steps}"), cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resumed from step 2" in out.stdout
    sharded = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    single = []
    with Run(xl_config(data, folder, "controlnet", **{"loss.proportion_empty_prompts": 0.25, "steps": 4}),
             tmp_path / "single") as one:
        state = one.state
        for _ in range(4):
            state, metrics = one.step_fn(state, one.frozen, one.next_batch())
            single.append(float(metrics["loss"]))
    np.testing.assert_allclose(sharded, single, rtol=1e-4)
    grid = np.asarray(Image.open(run / "samples" / "validation_step_0000004.png"))
    assert grid.shape == (2 * RES, 2 * RES, 3) and grid[RES:].std() > 0  # conditions, then samples

    exported = run / "export" / "diffusers" / "controlnet"
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["addition_embed_type"] == "text_time" and cfg["projection_class_embeddings_input_dim"] == 80
    controlnet = diffusers.ControlNetModel.from_pretrained(exported)
    pipe = diffusers.StableDiffusionXLControlNetPipeline(
        vae=ref.vae, text_encoder=ref.text_encoder, text_encoder_2=ref.text_encoder_2, tokenizer=ref.tokenizer,
        tokenizer_2=ref.tokenizer_2, unet=ref.unet, controlnet=controlnet, scheduler=ref.scheduler)
    ours = Pipeline.from_pretrained(folder, controlnets=[run / "export" / "jaxcontrol" / "controlnet"])
    image = torch.rand(1, 3, RES, RES, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(1, 4, RES // 2, RES // 2, generator=torch.Generator().manual_seed(6))
    common = dict(height=RES, width=RES, num_inference_steps=4, guidance_scale=5.0)
    with torch.no_grad():
        want = pipe(["a red circle"], image=image, latents=noise, output_type="np", **common).images
    got = ours(["a red circle"], latents=noise.numpy().transpose(0, 2, 3, 1), output_type="float",
               controls=[ControlInput(image.numpy().transpose(0, 2, 3, 1), 1.0)], **common)
    assert float(np.abs(got - want).max() / np.abs(want).max()) < 1e-4
