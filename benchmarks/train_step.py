"""One ControlNet training step on the full SD-1.5 architecture: jaxcontrol vs diffusers (PyTorch), on the CPU.

    .venv/bin/python benchmarks/train_step.py                 # 256x256 images (32x32 latents), batch 1
    .venv/bin/python benchmarks/train_step.py --size 512 --batch 2 --steps 5
    .venv/bin/python benchmarks/train_step.py --tiny      # tiny U-Net / VAE, 32x32 images, one step (seconds)
    .venv/bin/python benchmarks/train_step.py --side jax --set remat.unet=none --set model.attention_impl=chunked
    .venv/bin/python benchmarks/train_step.py --arch sdxl-reduced --size 128   # ControlNet-XL (see ARCHS)

`--arch sdxl` / `sdxl-reduced` trains a ControlNet-XL as diffusers' `train_controlnet_sdxl.py`:
both networks also take the pooled text embedding and the micro-conditioning ids of the image
size. The full SDXL step (frozen 2.57B U-Net, 1.25B ControlNet-XL with gradients and Adam
moments: 28 GiB before activations) does not fit a 24 GiB host; `sdxl-reduced` keeps SDXL's
layout and widths with 4 instead of 10 transformer layers per block at the lowest resolution.

`--set KEY=VALUE` overrides a key of `jaxcontrol.training.default_config()` for jaxcontrol's side
(`remat.*`, `model.attention_impl`, `precision.*`, `compiler_options.*`); without it the step runs
with the defaults, as `train.py` would. `--side` runs one side only (to compare settings of one).

Both sides run the same step, with random weights: a frozen SD-1.5 U-Net (859.5M), a trainable
ControlNet copied from it (361.3M), float32, precomputed latents (posterior moments, sampled in the
step) and text embeddings, DDPM noise at uniform timesteps, epsilon MSE, backward, global-norm
clipping at 1.0 and AdamW (lr 1e-5, weight decay 1e-2), as diffusers' `train_controlnet.py`
does. jaxcontrol's side is `jaxcontrol.training.make_train_step` compiled by `jit_train_step`.

Each side runs in its own process. Peak memory is the process's VmHWM from /proc, reset (via
/proc/self/clear_refs) after the models are built, so it covers compilation and the steps;
the peak of the whole process, model construction included, is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
                 cross_attention_dim=768, sample_size=64)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=512)
# --tiny: a two-block U-Net with SD's 768-wide context and a four-level VAE (SD's 8x factor)
TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8, cross_attention_dim=768,
                 sample_size=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = dict(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, sample_size=32)


# SDXL base's U-Net (sd_xl_base.yaml through diffusers' converter); its VAE has SD's layout
SDXL_UNET = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, sample_size=128,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
# what fits a 24 GiB host: SDXL's layout and widths with 4 transformer layers per block at the
# lowest resolution instead of 10 (1.32B U-Net, 0.63B ControlNet; the full model's frozen U-Net,
# ControlNet, its gradients and Adam moments alone are 28 GiB in float32)
SDXL_REDUCED_UNET = dict(SDXL_UNET, transformer_layers_per_block=(1, 2, 4))
# --arch tiny-sdxl: diffusers' tiny SDXL test U-Net (its ControlNet-XL hint encoder needs 8x images)
TINY_SDXL_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                      use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                      transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                      cross_attention_dim=64, norm_num_groups=1)
ARCHS = {"sd15": (SD15_UNET, SD15_VAE, "SD-1.5"), "tiny": (TINY_UNET, TINY_VAE, "tiny"),
         "sdxl": (SDXL_UNET, SD15_VAE, "SDXL"),
         "sdxl-reduced": (SDXL_REDUCED_UNET, SD15_VAE, "SDXL layout, transformer_layers_per_block (1, 2, 4)"),
         "tiny-sdxl": (TINY_SDXL_UNET, TINY_VAE, "diffusers' tiny SDXL test")}


def _configs(arch: str) -> tuple[dict, dict]:
    return ARCHS[arch][:2]


def _is_xl(unet_config: dict) -> bool:
    return unet_config.get("addition_embed_type") == "text_time"


def _time_ids(size: int) -> list[float]:
    """SDXL's micro-conditioning for a size x size image (original, crop, target), as the scripts build it."""
    return [float(size), float(size), 0.0, 0.0, float(size), float(size)]


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _inputs(size: int, batch: int, unet_config: dict, seed: int = 0):
    """Precomputed latents (posterior moments), text embeddings (and SDXL's pooled ones), control images."""
    import numpy as np

    g = np.random.default_rng(seed)
    lat = size // 8
    out = dict(
        moments=g.standard_normal((batch, lat, lat, 8), dtype=np.float32) * 0.5,
        context=g.standard_normal((batch, 77, unet_config["cross_attention_dim"]), dtype=np.float32),
        cond=g.random((batch, size, size, 3), dtype=np.float32),
    )
    if _is_xl(unet_config):
        pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
        out["pooled"] = g.standard_normal((batch, pooled), dtype=np.float32)
    return out


def _override(config, assignments) -> None:
    """Apply "KEY=VALUE" strings to `config` (VALUE parsed as a Python literal when it is one)."""
    import ast

    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value


def run_jax(size: int, batch: int, steps: int, arch: str = "sd15", overrides: tuple = (),
            compile_only: bool = False) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxcontrol.models import AutoencoderKL, AutoencoderKLConfig, UNet2DConditionConfig, UNet2DConditionModel
    from jaxcontrol.models import ControlNetModel, controlnet_config_from_unet, controlnet_from_unet, init_params
    from jaxcontrol.models.params import param_shapes
    from jaxcontrol.schedulers import NoiseSchedule, make_betas
    from jaxcontrol.training import default_config, jit_train_step, make_mesh, make_train_step
    from jaxcontrol.training.config import to_plain
    from jaxcontrol.training.networks import Networks
    from jaxcontrol.training.sharding import (batch_sharding, param_shardings, release_free_memory, replicated,
                                              use_cpu_memory_scheduler)
    from jaxcontrol.training.state import create_train_state, learning_rate_schedule, make_optimizer

    base = _status("VmRSS")
    t0 = time.perf_counter()
    config = default_config()
    _override(config, overrides)
    config.task, config.batch_size = "controlnet", batch
    xla_note = use_cpu_memory_scheduler(bool(config.xla_cpu_memory_scheduler))  # as train.py, before JAX starts
    unet_config, vae_config = _configs(arch)
    unet = UNet2DConditionModel(UNet2DConditionConfig(**unet_config), attention_impl=config.model.attention_impl)
    if compile_only:  # shapes only: nothing is allocated or run
        unet_params = param_shapes(unet)
        cn = ControlNetModel(controlnet_config_from_unet(unet.config), attention_impl=unet.attention_impl)
        cparams = param_shapes(cn)
    else:
        unet_params = init_params(unet, 0)
        cn, cparams = controlnet_from_unet(unet, unet_params, jax.random.key(1))
    config.optim.learning_rate, config.optim.weight_decay, config.optim.max_grad_norm = 1e-5, 1e-2, 1.0
    nets = Networks(task="controlnet", unet=unet, vae=AutoencoderKL(AutoencoderKLConfig(**vae_config)),
                    text_encoder=None, tokenizer=None, scheduler_config={}, prediction_type="epsilon",
                    schedule=NoiseSchedule(make_betas(1000, 0.00085, 0.012, "scaled_linear")), controlnet=cn,
                    time_ids=np.asarray(_time_ids(size), np.float32) if _is_xl(unet_config) else None)
    sched = learning_rate_schedule(config.optim, 1000)
    tx = make_optimizer(config.optim, sched)
    mesh = make_mesh(1, 1, jax.devices()[:1])
    abstract = jax.eval_shape(lambda p: create_train_state(p, tx, 0, ema=False), {"controlnet": cparams})
    state_sh = param_shardings(abstract, mesh)
    frozen = {"unet": unet_params}
    frozen_sh = param_shardings(frozen, mesh, shard=False)
    bsh = batch_sharding(mesh, ("data", "fsdp"), leading=1)
    x = _inputs(size, batch, unet_config)
    b = {"latents": x["moments"][None], "encoder_hidden_states": x["context"][None],
         "conditioning_pixel_values": x["cond"][None]}
    if "pooled" in x:
        b["text_embeds"] = x["pooled"][None]
    if compile_only:
        state = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                       state_sh)
        frozen = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), frozen,
                                        frozen_sh)
        b = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=bsh), b)
    else:
        state = jax.jit(lambda p: create_train_state(p, tx, 0, ema=False), out_shardings=state_sh)(
            {"controlnet": cparams})
        frozen = jax.device_put(frozen, frozen_sh)
        b = jax.device_put(b, bsh)
    del cparams, unet_params
    options = to_plain(config.compiler_options) or None  # as train.py compiles it
    step = jit_train_step(make_train_step(nets, config, tx, sched), state_sh, frozen_sh, bsh, replicated(mesh),
                          options)
    setup_s = time.perf_counter() - t0
    whole_peak = _status("VmHWM")
    setup_rss = _status("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, b).compile()
    compile_s = time.perf_counter() - t0
    release_free_memory()  # as train.py does between compiling and running the step
    if compile_only:
        return {"side": "jaxcontrol (JAX/XLA), compiled only", "compile_s": compile_s, "setup_s": setup_s,
                "setup_rss_bytes": setup_rss, "peak_compile_bytes": _status("VmHWM") if reset else None,
                "settings": {"remat": config.remat.to_dict(), "attention_impl": config.model.attention_impl,
                             "compiler_options": options, "xla": xla_note},
                "temp_bytes": _temp_bytes(compiled)}
    state, m = compiled(state, frozen, b)  # warm-up
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, frozen, b)
    jax.block_until_ready((state, m))
    dt = time.perf_counter() - t0
    return {"side": "jaxcontrol (JAX/XLA)", "samples_per_s": steps * batch / dt, "step_s": dt / steps,
            "compile_s": compile_s, "setup_s": setup_s, "baseline_bytes": base, "setup_rss_bytes": setup_rss,
            "peak_step_bytes": _status("VmHWM") if reset else None,
            "peak_process_bytes": max(whole_peak, _status("VmHWM")), "loss": float(m["loss"]),
            "devices": str(jax.devices()[0].platform), "dtype": str(jnp.float32.dtype),
            "trainable": int(sum(a.size for a in jax.tree_util.tree_leaves(state.params))),
            "frozen": int(sum(a.size for a in jax.tree_util.tree_leaves(frozen))), "np": np.__version__,
            "settings": {"remat": config.remat.to_dict(), "attention_impl": config.model.attention_impl,
                         "compiler_options": options, "xla": xla_note},
            "temp_bytes": _temp_bytes(compiled)}


def _temp_bytes(compiled) -> int | None:
    """XLA's buffer assignment for the step: the temporary (activation) bytes, or None if not reported."""
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except (AttributeError, NotImplementedError, RuntimeError):  # not every backend reports it
        return None


def run_torch(size: int, batch: int, steps: int, arch: str = "sd15") -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel

    torch.set_num_threads(os.cpu_count() or 1)
    base = _status("VmRSS")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    unet_config = _configs(arch)[0]
    unet = UNet2DConditionModel(**unet_config)
    controlnet = ControlNetModel.from_unet(unet)
    unet.requires_grad_(False)
    unet.eval()
    controlnet.train()
    opt = torch.optim.AdamW(controlnet.parameters(), lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    x = _inputs(size, batch, unet_config)
    added = {}
    if "pooled" in x:  # train_controlnet_sdxl.py's unet_added_conditions, to the ControlNet and the U-Net
        added = {"added_cond_kwargs": {"text_embeds": torch.from_numpy(x["pooled"]),
                                       "time_ids": torch.tensor([_time_ids(size)] * batch)}}
    moments = torch.from_numpy(np.ascontiguousarray(x["moments"].transpose(0, 3, 1, 2)))
    context = torch.from_numpy(x["context"])
    cond = torch.from_numpy(np.ascontiguousarray(x["cond"].transpose(0, 3, 1, 2)))
    setup_s = time.perf_counter() - t0
    whole_peak = _status("VmHWM")
    reset = _reset_peak()

    def step():
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        latents = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * 0.18215
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],)).long()
        noisy = scheduler.add_noise(latents, noise, t)
        down, mid = controlnet(noisy, t, encoder_hidden_states=context, controlnet_cond=cond, return_dict=False,
                               **added)
        pred = unet(noisy, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid, return_dict=False, **added)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step()  # warm-up (allocates the optimizer state)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    dt = time.perf_counter() - t0
    return {"side": "diffusers (PyTorch eager)", "samples_per_s": steps * batch / dt, "step_s": dt / steps,
            "compile_s": 0.0, "setup_s": setup_s, "baseline_bytes": base,
            "peak_step_bytes": _status("VmHWM") if reset else None,
            "peak_process_bytes": max(whole_peak, _status("VmHWM")), "loss": float(loss),
            "trainable": sum(p.numel() for p in controlnet.parameters()),
            "frozen": sum(p.numel() for p in unet.parameters()), "torch": torch.__version__}


def child(which: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--size", str(args.size), "--batch", str(args.batch),
           "--steps", str(args.steps), "--arch", args.arch]
    cmd += [f"--set={item}" for item in args.set] + (["--compile-only"] if args.compile_only else [])
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user would have
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{which} side failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=256, help="image side in pixels (latents are size / 8)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--child", choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--tiny", action="store_true", help="tiny U-Net and VAE, 32x32 images, batch 1, one timed step")
    p.add_argument("--arch", choices=sorted(ARCHS), default="sd15",
                   help="the U-Net (and ControlNet) layout; sdxl-reduced is what fits 24 GiB (see ARCHS)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of jaxcontrol's default training config (repeatable)")
    p.add_argument("--side", choices=("both", "jax", "torch"), default="both", help="run one side only")
    p.add_argument("--compile-only", action="store_true",
                   help="jaxcontrol only: compile the step from shapes (nothing allocated) and report XLA's buffer "
                        "assignment and the compiler's peak memory")
    args = p.parse_args()
    if args.tiny and not args.child:
        args.size, args.batch, args.steps = 32, 1, 1
        args.arch = "tiny-sdxl" if "sdxl" in args.arch else "tiny"
    if args.child:
        if args.child == "jax":
            result = run_jax(args.size, args.batch, args.steps, args.arch, tuple(args.set), args.compile_only)
        else:
            result = run_torch(args.size, args.batch, args.steps, args.arch)
        print(json.dumps(result))
        return
    xl = _is_xl(_configs(args.arch)[0])
    print(f"{'ControlNet-XL' if xl else 'ControlNet'} training step, {ARCHS[args.arch][2]} architecture, "
          f"{args.size}x{args.size} images "
          f"({args.size // 8}x{args.size // 8} latents), batch {args.batch}, float32, {os.cpu_count()} CPU cores",
          flush=True)
    if args.compile_only:
        ours = child("jax", args)
        print(json.dumps(ours, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps({"jax": ours, "args": vars(args)}, indent=1))
        return
    ours = child("jax", args) if args.side in ("both", "jax") else None
    ref = child("torch", args) if args.side in ("both", "torch") else None
    if ours is not None:
        print("jaxcontrol settings: " + ", ".join(
            [f"remat.{k}={v}" for k, v in ours["settings"]["remat"].items()]
            + [f"model.attention_impl={ours['settings']['attention_impl']}",
               f"compiler_options={ours['settings']['compiler_options']}"])
              + (f"; {ours['settings']['xla']}" if ours["settings"]["xla"] else ""))
    rows = [
        ("samples/s", lambda r: f"{r['samples_per_s']:.4f}", "samples_per_s"),
        ("seconds/step", lambda r: f"{r['step_s']:.2f}", "step_s"),
        ("peak memory, compile + steps", lambda r: gib(r["peak_step_bytes"]), "peak_step_bytes"),
        ("peak memory, whole process", lambda r: gib(r["peak_process_bytes"]), "peak_process_bytes"),
        ("XLA temporaries (buffer assignment)", lambda r: gib(r.get("temp_bytes")), None),
        ("compile (one-off)", lambda r: f"{r['compile_s']:.0f} s" if r["compile_s"] else "-", None),
        ("trainable / frozen params", lambda r: f"{r['trainable'] / 1e6:.1f}M / {r['frozen'] / 1e6:.1f}M", None),
    ]
    table = []
    for name, fmt, key in rows:
        ratio = ""
        if ours is not None and ref is not None and key is not None and ours[key] is not None and ref[key]:
            ratio = f"{ours[key] / ref[key]:.2f}x"
        table.append((name, fmt(ours) if ours is not None else "-", fmt(ref) if ref is not None else "-", ratio))
    header = ("", "jaxcontrol", "diffusers", "ours/theirs")
    widths = [max(len(r[i]) for r in table + [header]) for i in range(4)]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in table:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    if args.json:
        Path(args.json).write_text(json.dumps({"jax": ours, "torch": ref, "args": vars(args)}, indent=1))

if __name__ == "__main__":
    main()
