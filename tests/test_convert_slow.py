"""Full-size conversions: a random SD-1.5 LDM single file (4.3 GB) through the CLI, measuring wall time
and peak memory, and a full-size ControlNet v1.1 file against diffusers' own `from_single_file`.

The original files are built with the inverse mappings of `tests/test_convert.py`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

import jaxcontrol as jc
from jaxcontrol.convert import convert, flax_to_torch_state_dict
from jaxcontrol.testing.memory import SD15_TEXT, SD15_VAE
from jaxcontrol.testing.parity import SD15, controlnet_fields
from jaxcontrol.testing.reference import tiny_clip_tokenizer
from test_convert import assert_same_tensors, clip_to_ldm, unet_to_ldm, vae_to_ldm

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _time_v(stderr: str) -> tuple[float, int]:
    """(wall seconds, peak resident bytes) from GNU time's -v report."""
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", stderr)[1]
    seconds = 0.0
    for part in wall.split(":"):
        seconds = seconds * 60 + float(part)
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)[1])
    return seconds, peak_kb * 1024


def test_full_size_sd15_single_file(tmp_path):
    torch.manual_seed(0)
    parts = {"unet": UNet2DConditionModel(**SD15).eval(), "vae": AutoencoderKL(**SD15_VAE).eval(),
             "text_encoder": CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).eval()}
    state = {}
    state.update({"model.diffusion_model." + k: v for k, v in unet_to_ldm(parts["unet"].state_dict(), 2).items()})
    state.update({"first_stage_model." + k: v for k, v in vae_to_ldm(parts["vae"].state_dict()).items()})
    state.update(clip_to_ldm(parts["text_encoder"].state_dict()))
    path = tmp_path / "v1-5-random.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    del state
    size = path.stat().st_size
    assert size > 4.0e9

    tok = tiny_clip_tokenizer(tmp_path / "tokenizer")
    out = tmp_path / "sd15-jax"
    run = subprocess.run(["/usr/bin/time", "-v", sys.executable, str(REPO / "convert_weights.py"), "--from", str(path),
                          "--to", str(out), "--tokenizer", str(tok), "--no-progress"],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    wall, peak = _time_v(run.stderr)
    summary = run.stdout
    assert "ldm-sd1" in summary and "859,520,964" in summary
    for name, model in parts.items():
        assert f"{sum(p.numel() for p in model.parameters()):,}" in summary, name
    counts = {k: v["param_count"] for k, v in json.loads((out / "jaxcontrol.json").read_text())["components"].items()}
    param_bytes = 4 * sum(counts.values())
    result = {"file_bytes": size, "wall_seconds": round(wall, 1), "peak_rss_bytes": peak,
              "param_bytes_f32": param_bytes, "peak_over_params": round(peak / param_bytes, 3),
              "param_counts": counts}
    print("\nfull-size SD-1.5 single-file conversion:", json.dumps(result))
    print(summary)
    # one component at a time, read tensor by tensor and written without a second copy: the peak stays near
    # the largest component (the U-Net, 3.4 GB) plus the runtime; measured 0.93x of all params' bytes
    assert peak < 1.2 * param_bytes, result

    # every tensor arrives exactly, component by component
    for name, model in parts.items():
        bundle = jc.load_checkpoint(out, components=(name,))
        ours = flax_to_torch_state_dict(bundle.params[name])
        if name == "text_encoder":
            ours = {k.removeprefix("text_model."): v for k, v in ours.items()}
        assert_same_tensors(ours, model.state_dict(), name)
        del bundle, ours
    assert jc.tokenizer.load_tokenizer(out / "tokenizer") is not None


def test_full_size_controlnet_v11(tmp_path):
    torch.manual_seed(1)
    model = ControlNetModel(**controlnet_fields(SD15, {})).eval()
    with torch.no_grad():  # zero convolutions would make the comparison trivial
        for name, p in model.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                "controlnet_cond_embedding.conv_out")):
                p.normal_(0, 0.02)
    model.save_pretrained(tmp_path / "diffusers")
    original = {"control_model." + k: v.contiguous() for k, v in unet_to_ldm(model.state_dict(), 2).items()}
    torch.save(original, tmp_path / "control_v11p_sd15_random.pth")
    del original

    theirs = ControlNetModel.from_single_file(str(tmp_path / "control_v11p_sd15_random.pth"),
                                              config=str(tmp_path / "diffusers"), local_files_only=True)
    module, params = jc.load_model(tmp_path / "control_v11p_sd15_random.pth")
    assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)) == sum(
        p.numel() for p in model.parameters())
    assert_same_tensors(flax_to_torch_state_dict(params), theirs.state_dict(), "controlnet")
    del theirs, params

    report = convert(tmp_path / "control_v11p_sd15_random.pth", tmp_path / "torch", format="diffusers",
                                dtype="float16")
    assert report.detected_format == "controlnet-v1.1"
    back = ControlNetModel.from_pretrained(tmp_path / "torch", torch_dtype=torch.float16)
    assert_same_tensors({k: v.numpy() for k, v in back.state_dict().items()},
                        {k: v.half() for k, v in model.state_dict().items()}, "controlnet (float16 export)")
