"""convert_weights: original single files in (LDM SD-1/2, ControlNet v1.0/v1.1, T2I-Adapter), jaxcontrol
(Orbax) and diffusers out, safely.

Every original-format file is built here from a random diffusers model with an inverse key
mapping written in this file (diffusers names -> original names), never with the converter's own
mapping. Where diffusers can read the same file offline (`from_single_file` with `config=` a local
folder: LDM SD-1.x and ControlNet), our import is compared with diffusers' tensor by tensor;
where it cannot (T2I-Adapter originals; OpenCLIP text encoders of other than 24 layers, whose
ignored keys diffusers hard-codes), with the source diffusers / transformers model directly.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, StableDiffusionPipeline, T2IAdapter
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import jaxcontrol as jc
from jaxcontrol.convert import convert, flax_to_torch_state_dict, format_summary, read_checkpoint
from jaxcontrol.models.params import flatten
from jaxcontrol.testing.parity import TINY_ADAPTER_TEST, controlnet_fields
from jaxcontrol.testing.reference import nchw_to_nhwc, randomize_, rel_err, tiny_clip_tokenizer

REPO = Path(__file__).resolve().parents[1]
TEXT = dict(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
            num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=1000)
VAE = dict(block_out_channels=[32, 64], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
           up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4)
# the standard hint encoder (16, 32, 96, 256): diffusers' single-file reader hard-codes its last conv at
# input_hint_block.14, so a smaller one could not be checked against it (ours reads any depth)
CN_EXTRA: dict = {}
# the tiny CLIP's 4 heads are not inferable (hidden 32 is no multiple of 64): given as a user would
HEADS = {"text_encoder": {"num_attention_heads": 4}}


# --- inverse mappings: diffusers names -> original layouts (independent of jaxcontrol.convert) ------

RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{RESNET_TO_LDM[head]}.{tail}"


def unet_to_ldm(sd: dict, lpb: int) -> dict:
    """diffusers U-Net / ControlNet keys -> openaimodel / cldm keys."""
    out, n = {}, lpb + 1
    hint_blocks = len({k.split(".")[2] for k in sd if k.startswith("controlnet_cond_embedding.blocks.")})
    for k, v in sd.items():
        if k.startswith("conv_in."):
            new = "input_blocks.0.0." + k[8:]
        elif k.startswith("time_embedding.linear_"):
            new = f"time_embed.{0 if k[22] == '1' else 2}.{k.split('.')[-1]}"
        elif k.startswith("add_embedding.linear_"):  # SDXL's pooled text + size embedding
            new = f"label_emb.0.{0 if k[21] == '1' else 2}.{k.split('.')[-1]}"
        elif k.startswith("conv_norm_out."):
            new = "out.0." + k.split(".")[-1]
        elif k.startswith("conv_out."):
            new = "out.2." + k.split(".")[-1]
        elif m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
            new = f"input_blocks.{1 + int(m[1]) * n + int(m[2])}.0.{_resnet(m[3])}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", k):
            new = f"input_blocks.{1 + int(m[1]) * n + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k):
            new = f"input_blocks.{(int(m[1]) + 1) * n}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d)\.(.*)", k):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", k):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
            new = f"output_blocks.{int(m[1]) * n + int(m[2])}.0.{_resnet(m[3])}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", k):
            new = f"output_blocks.{int(m[1]) * n + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k):
            attn = any(x.startswith(f"up_blocks.{m[1]}.attentions.") for x in sd)
            new = f"output_blocks.{int(m[1]) * n + lpb}.{2 if attn else 1}.conv.{m[2]}"
        elif m := re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", k):
            new = f"zero_convs.{m[1]}.0.{m[2]}"
        elif k.startswith("controlnet_mid_block."):
            new = "middle_block_out.0." + k.split(".")[-1]
        elif k.startswith("controlnet_cond_embedding.conv_in."):
            new = "input_hint_block.0." + k.split(".")[-1]
        elif m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.*)", k):
            new = f"input_hint_block.{2 * int(m[1]) + 2}.{m[2]}"
        elif k.startswith("controlnet_cond_embedding.conv_out."):
            new = f"input_hint_block.{2 * hint_blocks + 2}.{k.split('.')[-1]}"
        else:
            raise KeyError(k)
        out[new] = v
    return out


def vae_to_ldm(sd: dict) -> dict:
    """diffusers AutoencoderKL keys -> ldm.modules.diffusionmodules.model keys (1x1-conv attention)."""
    out = {}
    n_up = len({k.split(".")[2] for k in sd if k.startswith("decoder.up_blocks.")})
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for k, v in sd.items():
        new = k
        m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", k)
        if m:
            new = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and m[3] == "weight":
                v = v[:, :, None, None]
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", k):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
        out[new.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")] = v
    return out


def clip_to_ldm(sd: dict) -> dict:
    """transformers CLIPTextModel (5.x keys, no `text_model.`) -> FrozenCLIPEmbedder keys (with it, as SD-1.5)."""
    return {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in sd.items()}


def openclip_tower(sd: dict, prefix: str) -> dict:
    """transformers CLIPTextModel keys -> an OpenCLIP text tower's (embeddings, every layer with q/k/v
    fused into `attn.in_proj_*`, `ln_final`) under `prefix`; no projection."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    n = len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")})
    out = {prefix + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": sd["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": sd["final_layer_norm.weight"],
           prefix + "ln_final.bias": sd["final_layer_norm.bias"]}
    for i in range(n):
        r, L = f"{prefix}transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for leaf in ("weight", "bias"):
            out[r + f"attn.in_proj_{leaf}"] = torch.cat([sd[L + f"self_attn.{x}_proj.{leaf}"] for x in "qkv"])
            out[r + f"attn.out_proj.{leaf}"] = sd[L + f"self_attn.out_proj.{leaf}"]
            out[r + f"ln_1.{leaf}"] = sd[L + f"layer_norm1.{leaf}"]
            out[r + f"ln_2.{leaf}"] = sd[L + f"layer_norm2.{leaf}"]
            out[r + f"mlp.c_fc.{leaf}"] = sd[L + f"mlp.fc1.{leaf}"]
            out[r + f"mlp.c_proj.{leaf}"] = sd[L + f"mlp.fc2.{leaf}"]
    return out


def clip_to_openclip(sd: dict, extra_layer_seed: int = 5) -> dict:
    """transformers CLIPTextModel -> OpenCLIP text tower (`cond_stage_model.model.*`), plus one more final layer.

    SD-2.x conditions on the penultimate layer, so the file's last layer must be dropped on import.
    """
    p = "cond_stage_model.model."
    out = openclip_tower(sd, p)
    n = len({k.removeprefix("text_model.").split(".")[2] for k in sd if ".layers." in k})
    g = torch.Generator().manual_seed(extra_layer_seed)
    hidden = out[p + "token_embedding.weight"].shape[1]
    # the extra last layer: random, shaped like the others
    for k in [k for k in out if k.startswith(f"{p}transformer.resblocks.0.")]:
        out[k.replace("resblocks.0.", f"resblocks.{n}.")] = torch.randn(out[k].shape, generator=g)
    out[p + "text_projection"] = torch.randn(hidden, hidden, generator=g)
    out[p + "logit_scale"] = torch.tensor(4.6)
    return out


def adapter_to_original(sd: dict, light: bool, nrb: int) -> dict:
    """diffusers T2IAdapter keys -> TencentARC `Adapter` / `Adapter_light` keys (no `adapter.` prefix)."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("adapter.")
        if m := re.match(r"body\.(\d+)\.resnets\.(\d+)\.(.*)", k):
            new = f"body.{m[1]}.body.{m[2]}.{m[3]}" if light else f"body.{int(m[1]) * nrb + int(m[2])}.{m[3]}"
        elif (m := re.match(r"body\.(\d+)\.in_conv\.(.*)", k)) and not light:
            new = f"body.{int(m[1]) * nrb}.in_conv.{m[2]}"
        else:
            new = k
        out[new] = v
    return out


# --- helpers -------------------------------------------------------------------------------------


def cli_module():
    """convert_weights.py imported as a module (it lives at the repo root, outside the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_weights_cli", REPO / "convert_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def contiguous(sd: dict) -> dict:
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def torch_names(params, strip_text_model: bool = False) -> dict:
    out = flax_to_torch_state_dict(params)
    if strip_text_model:
        out = {k.removeprefix("text_model."): v for k, v in out.items()}
    return out


def assert_same_tensors(ours: dict, ref: dict, what: str) -> None:
    ref = {k: v for k, v in ref.items() if not k.endswith("position_ids")}
    assert set(ours) == set(ref), (what, sorted(set(ours) ^ set(ref))[:10])
    bad = [k for k in ref if not np.array_equal(np.asarray(ours[k], np.float32), ref[k].float().numpy())]
    assert not bad, (what, bad[:5])


def structural(config: dict) -> dict:
    drop = {"_class_name", "sample_size", "projection_dim"}
    return {k: v for k, v in config.items() if k not in drop}


def ours_config(module) -> dict:
    return structural(module.config.to_dict())


def saved_config(folder: Path) -> dict:
    """The structural fields of a diffusers / transformers folder's config.json, through our config class."""
    from jaxcontrol.convert.diffusers_folder import MODEL_TYPES, model_type_of, read_config

    raw = read_config(folder)
    name, _ = model_type_of(raw, str(folder))
    return structural(MODEL_TYPES[name].config.from_dict(raw).to_dict())


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny SD-1.x pipeline (diffusers folder), its LDM single file (.ckpt) and a tokenizer folder."""
    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    tok = tiny_clip_tokenizer(root / "tokenizer")
    parts = dict(unet=randomize_(UNet2DConditionModel(**TINY_ADAPTER_TEST), 1), vae=randomize_(AutoencoderKL(**VAE), 2),
                 text_encoder=randomize_(CLIPTextModel(CLIPTextConfig(**TEXT)), 3))
    StableDiffusionPipeline(**parts, tokenizer=CLIPTokenizer.from_pretrained(tok),
                            scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(root / "pipe")
    state = {}
    state.update({"model.diffusion_model." + k: v for k, v in unet_to_ldm(parts["unet"].state_dict(), 2).items()})
    state.update({"first_stage_model." + k: v for k, v in vae_to_ldm(parts["vae"].state_dict()).items()})
    state.update(clip_to_ldm(parts["text_encoder"].state_dict()))
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["betas"] = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    state["first_stage_model.loss.logvar"] = torch.zeros(())
    state = contiguous(state)
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 3}, root / "sd-tiny.ckpt")
    return dict(root=root, parts=parts, state=state, ckpt=root / "sd-tiny.ckpt", pipe=root / "pipe", tok=tok)


@pytest.fixture(scope="module")
def cn(tmp_path_factory):
    """A tiny ControlNet (diffusers folder) and its v1.1 original (`control_model.*`, .pth)."""
    root = tmp_path_factory.mktemp("cn")
    torch.manual_seed(1)
    model = randomize_(ControlNetModel(**controlnet_fields(TINY_ADAPTER_TEST, CN_EXTRA)), 4)
    model.save_pretrained(root / "diffusers")
    original = contiguous({"control_model." + k: v for k, v in unet_to_ldm(model.state_dict(), 2).items()})
    torch.save(original, root / "control_v11p_sd15_tiny.pth")
    return dict(root=root, model=model, pth=root / "control_v11p_sd15_tiny.pth", folder=root / "diffusers",
                original=original)


# --- import: LDM Stable Diffusion -------------------------------------------------------------------


def test_ldm_sd1_matches_diffusers_from_single_file(sd):
    ckpt = read_checkpoint(sd["ckpt"], overrides=HEADS)
    assert ckpt.format == "ldm-sd1" and list(ckpt.components) == ["unet", "vae", "text_encoder"]
    assert ckpt.pipeline_class == "StableDiffusionPipeline" and ckpt.prediction_type == "epsilon"
    assert ckpt.scheduler_config["prediction_type"] == "epsilon"
    assert any("noise-schedule" in n for n in ckpt.notes) and any("global_step 470000" in n for n in ckpt.notes)

    bundle = jc.load_single_file(sd["ckpt"], overrides=HEADS)
    # diffusers reads the same file offline when given a local config folder
    theirs = StableDiffusionPipeline.from_single_file(str(sd["ckpt"]), config=str(sd["pipe"]), local_files_only=True,
                                                      safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        ref = getattr(theirs, name).state_dict()
        # the file is a faithful LDM file: diffusers recovers the original model from it
        assert_same_tensors({k: v.numpy() for k, v in sd["parts"][name].state_dict().items()}, ref, f"{name} (file)")
        assert_same_tensors(torch_names(bundle.params[name], name == "text_encoder"), ref, name)
        assert ours_config(bundle.modules[name]) == saved_config(sd["pipe"] / name), name


def test_ldm_ema_and_safetensors(sd, tmp_path):
    unet_keys = [k for k in sd["state"] if k.startswith("model.diffusion_model.")]
    g = torch.Generator().manual_seed(9)
    state = dict(sd["state"])
    for k in unet_keys:  # the EMA copy holds the real weights, the regular copy noise
        state["model_ema." + k[len("model."):].replace(".", "")] = state[k]
        state[k] = torch.randn(state[k].shape, generator=g)
    state["model_ema.decay"], state["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(3, dtype=torch.int32)
    save_file(contiguous(state), tmp_path / "ema.safetensors")

    ref = sd["parts"]["unet"].state_dict()
    ema = jc.load_single_file(tmp_path / "ema.safetensors", ema=True, overrides=HEADS, components=["unet"])
    assert_same_tensors(torch_names(ema.params["unet"]), ref, "unet (EMA)")
    ckpt = read_checkpoint(tmp_path / "ema.safetensors", overrides=HEADS)
    assert any("--ema" in n for n in ckpt.notes)
    regular = jc.load_single_file(tmp_path / "ema.safetensors", overrides=HEADS, components=["unet"])
    some = "down_blocks.0.resnets.0.conv1.weight"
    np.testing.assert_array_equal(torch_names(regular.params["unet"])[some],
                                  state["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"].numpy())
    with pytest.raises(jc.CheckpointError, match="EMA weights requested but the file holds none"):
        read_checkpoint(sd["ckpt"], ema=True, overrides=HEADS)


def test_ldm_sd2_openclip_and_linear_projection(tmp_path):
    """SD-2.x layout: 1024-wide cross-attention, linear projections, OpenCLIP text tower (compared with the
    source models: diffusers' OpenCLIP reader hard-codes the 24-layer key names)."""
    torch.manual_seed(2)
    unet = randomize_(UNet2DConditionModel(
        block_out_channels=(64, 128), layers_per_block=1, norm_num_groups=8, cross_attention_dim=1024,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(1, 2), use_linear_projection=True), 5)
    text = randomize_(CLIPTextModel(CLIPTextConfig(**{**TEXT, "hidden_size": 64, "num_attention_heads": 1,
                                                      "num_hidden_layers": 3, "hidden_act": "gelu"})), 6)
    state = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet.state_dict(), 1).items()}
    state.update(clip_to_openclip(text.state_dict()))
    torch.save({"state_dict": contiguous(state), "global_step": 875000}, tmp_path / "sd2.ckpt")

    ckpt = read_checkpoint(tmp_path / "sd2.ckpt", overrides={"unet": {"norm_num_groups": 8}})
    assert ckpt.format == "ldm-sd2" and ckpt.prediction_type == "epsilon"  # global_step 875000: the 512 base
    assert ckpt.scheduler_config["_class_name"] == "DDIMScheduler"
    u, t = ckpt.components["unet"].config, ckpt.components["text_encoder"].config
    assert u["attention_head_dim"] == [1, 2] and u["use_linear_projection"] and u["cross_attention_dim"] == 1024
    assert t["hidden_act"] == "gelu" and t["num_hidden_layers"] == 3 and t["num_attention_heads"] == 1
    assert any("dropped" in n for n in ckpt.notes)

    bundle = jc.load_single_file(tmp_path / "sd2.ckpt", overrides={"unet": {"norm_num_groups": 8}})
    assert_same_tensors(torch_names(bundle.params["unet"]), unet.state_dict(), "unet")
    assert_same_tensors(torch_names(bundle.params["text_encoder"], True), text.state_dict(), "text_encoder")
    assert structural(bundle.configs["unet"]) == structural(
        {**jc.UNet2DConditionConfig.from_dict(dict(unet.config)).to_dict()})

    # a config given whole replaces the inferred one (here the source model's own, read as diffusers wrote it)
    given = read_checkpoint(tmp_path / "sd2.ckpt", configs={"unet": json.loads(json.dumps(dict(unet.config)))})
    assert given.components["unet"].config["norm_num_groups"] == 8 and any("config given" in n for n in given.notes)

    # without the 875000 marker an SD-2.x file is taken as v-prediction (768 models), unless told otherwise
    torch.save({"state_dict": contiguous(state)}, tmp_path / "sd2-v.ckpt")
    v = read_checkpoint(tmp_path / "sd2-v.ckpt", overrides={"unet": {"norm_num_groups": 8}})
    assert v.prediction_type == "v_prediction" and v.components["unet"].config["sample_size"] == 96
    e = read_checkpoint(tmp_path / "sd2-v.ckpt", prediction_type="epsilon", overrides={"unet": {"norm_num_groups": 8}})
    assert e.prediction_type == "epsilon" and e.scheduler_config["prediction_type"] == "epsilon"


# --- import: ControlNet -----------------------------------------------------------------------------


def test_controlnet_v11_matches_diffusers_from_single_file(cn, tmp_path):
    theirs = ControlNetModel.from_single_file(str(cn["pth"]), config=str(cn["folder"]), local_files_only=True)
    assert_same_tensors({k: v.numpy() for k, v in cn["model"].state_dict().items()}, theirs.state_dict(), "file")
    ckpt = read_checkpoint(cn["pth"])
    assert ckpt.format == "controlnet-v1.1" and list(ckpt.components) == ["controlnet"]
    assert ckpt.pipeline_class is None
    module, params = jc.load_model(cn["pth"])  # load_model reads single files too
    assert_same_tensors(torch_names(params), theirs.state_dict(), "controlnet")
    assert ours_config(module) == saved_config(cn["folder"])

    # no prefix (as community re-saves are), safetensors, and shuffle's global pooling from the file name
    bare = {k.removeprefix("control_model."): v for k, v in cn["original"].items()}
    save_file(bare, tmp_path / "control_v11e_sd15_shuffle.safetensors")
    ckpt = read_checkpoint(tmp_path / "control_v11e_sd15_shuffle.safetensors")
    assert ckpt.format == "controlnet-bare"
    assert ckpt.components["controlnet"].config["global_pool_conditions"] is True
    off = read_checkpoint(tmp_path / "control_v11e_sd15_shuffle.safetensors",
                          overrides={"controlnet": {"global_pool_conditions": False}})
    assert off.components["controlnet"].config["global_pool_conditions"] is False


def test_controlnet_v10_whole_controlldm(sd, cn, tmp_path):
    state = dict(sd["state"])
    state.update(cn["original"])
    torch.save({"state_dict": state}, tmp_path / "control_sd15_tiny.pth")
    ckpt = read_checkpoint(tmp_path / "control_sd15_tiny.pth", overrides=HEADS)
    assert ckpt.format == "controlnet-v1.0"
    assert set(ckpt.components) == {"controlnet", "unet", "vae", "text_encoder"}
    assert ckpt.pipeline_class == "StableDiffusionControlNetPipeline"
    only = jc.load_single_file(tmp_path / "control_sd15_tiny.pth", components=["controlnet"])
    assert set(only.modules) == {"controlnet"} and only.class_name == ""
    assert_same_tensors(torch_names(only.params["controlnet"]), cn["model"].state_dict(), "controlnet")


# --- import: T2I-Adapter ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["full_adapter", "light_adapter"])
def test_t2i_adapter_originals(kind, tmp_path):
    torch.manual_seed(3)
    light = kind == "light_adapter"
    channels = [32, 64] if light else [32, 64, 64]
    model = randomize_(T2IAdapter(in_channels=1 if light else 3, channels=channels, num_res_blocks=2,
                                  downscale_factor=8, adapter_type=kind), 7)
    original = adapter_to_original(model.state_dict(), light, nrb=2)
    if light:
        save_file(contiguous(original), tmp_path / "t2iadapter_color_sd14v1.safetensors")
        path = tmp_path / "t2iadapter_color_sd14v1.safetensors"
    else:  # some original adapters were saved from a wrapper, with an `adapter.` prefix
        torch.save(contiguous({"adapter." + k: v for k, v in original.items()}), tmp_path / "t2iadapter_depth.pth")
        path = tmp_path / "t2iadapter_depth.pth"
    ckpt = read_checkpoint(path)
    assert ckpt.format == ("t2i-adapter-light" if light else "t2i-adapter-full")
    adapter, params = jc.load_model(path)
    assert_same_tensors(torch_names(params), model.state_dict(), kind)
    cfg = adapter.config
    assert (cfg.in_channels, list(cfg.channels), cfg.num_res_blocks, cfg.adapter_type) == (
        model.config.in_channels, list(model.config.channels), model.config.num_res_blocks, kind)


def test_standalone_vae_bare_state_dict_and_diffusers_folders(sd, cn, tmp_path):
    # an LDM VAE on its own (as vae-ft-mse-*.ckpt), with its training loss keys
    vae = sd["parts"]["vae"]
    torch.save({"state_dict": {**contiguous(vae_to_ldm(vae.state_dict())), "loss.logvar": torch.zeros(())}},
               tmp_path / "vae-ft.ckpt")
    ckpt = read_checkpoint(tmp_path / "vae-ft.ckpt")
    assert ckpt.format == "ldm-vae" and list(ckpt.components) == ["vae"]
    module, params = jc.load_model(tmp_path / "vae-ft.ckpt")
    assert_same_tensors(torch_names(params), vae.state_dict(), "vae")
    assert ours_config(module) == saved_config(sd["pipe"] / "vae")
    # a diffusers state dict without its config.json
    weights = cn["folder"] / "diffusion_pytorch_model.safetensors"
    assert read_checkpoint(weights).format == "diffusers-state-dict"
    assert_same_tensors(torch_names(jc.load_model(weights)[1]), cn["model"].state_dict(), "controlnet")
    # a diffusers pipeline folder in, the jaxcontrol format out: tokenizer and scheduler carried along
    convert(sd["pipe"], tmp_path / "from-folder", components=["vae", "text_encoder"])
    ours = jc.load_pipeline(tmp_path / "from-folder")
    ref = jc.load_pipeline(sd["pipe"], components=("vae", "text_encoder", "tokenizer", "scheduler"))
    assert ours.tokenizer is not None and ours.scheduler_config == ref.scheduler_config
    for name in ("vae", "text_encoder"):
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                   zip(jax.tree_util.tree_leaves(ours.params[name]), jax.tree_util.tree_leaves(ref.params[name])))


# --- export and our format ----------------------------------------------------------------------------


def test_export_sd_pipeline_to_diffusers_round_trip(sd, tmp_path):
    out = tmp_path / "sd-diffusers"
    report = convert(sd["ckpt"], out, format="diffusers", overrides=HEADS, tokenizer=sd["tok"])
    assert [r.name for r in report.components] == ["unet", "vae", "text_encoder", "tokenizer"]
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "epsilon" and pipe.tokenizer is not None
    for name in ("unet", "vae", "text_encoder"):
        assert_same_tensors({k: v.numpy() for k, v in getattr(pipe, name).state_dict().items()},
                            sd["parts"][name].state_dict(), name)
    _, info = UNet2DConditionModel.from_pretrained(out, subfolder="unet", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    # same outputs: the exported pipeline's networks against the originals
    ids = torch.from_numpy(pipe.tokenizer(["a red circle"], padding="max_length", max_length=77,
                                          return_tensors="np")["input_ids"]).long()
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        ctx = pipe.text_encoder(ids)[0]
        torch.testing.assert_close(ctx, sd["parts"]["text_encoder"](ids)[0], rtol=0, atol=0)
        torch.testing.assert_close(pipe.unet(x, 10, ctx).sample, sd["parts"]["unet"](x, 10, ctx).sample, rtol=0, atol=0)
        torch.testing.assert_close(pipe.vae.decode(x).sample, sd["parts"]["vae"].decode(x).sample, rtol=0, atol=0)


def test_jaxcontrol_format_round_trip_is_exact(sd, tmp_path):
    out = tmp_path / "sd-jax"
    report = convert(sd["ckpt"], out, overrides=HEADS, tokenizer=sd["tok"])
    assert "ldm-sd1" in format_summary(report) and f"{report.components[0].param_count:,}" in format_summary(report)
    manifest = json.loads((out / "jaxcontrol.json").read_text())
    assert manifest["format"] == "jaxcontrol" and manifest["pipeline_class"] == "StableDiffusionPipeline"
    assert manifest["components"]["unet"]["dtype"] == "float32" and manifest["prediction_type"] == "epsilon"
    direct = jc.load_single_file(sd["ckpt"], overrides=HEADS)
    bundle = jc.load_pipeline(out)  # load_pipeline reads our format
    assert bundle.class_name == "StableDiffusionPipeline" and bundle.scheduler_config["prediction_type"] == "epsilon"
    for name in ("unet", "vae", "text_encoder"):
        a, b = flatten(bundle.params[name]), flatten(direct.params[name])
        assert set(a) == set(b)
        assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) and a[k].dtype == b[k].dtype for k in a), name
    # usable for text-to-image: the carried tokenizer and the text encoder run as the original's
    ids = jc.tokenizer.tokenize(bundle.tokenizer, ["a red circle"])
    te = bundle.text_encoder
    ctx = jax.jit(lambda p, i: te.apply({"params": p}, i).last_hidden_state)(bundle.params["text_encoder"], ids)
    with torch.no_grad():
        ref = sd["parts"]["text_encoder"](torch.from_numpy(ids).long())[0].numpy()
    np.testing.assert_allclose(np.asarray(ctx), ref, rtol=1e-4, atol=1e-4)

    # reduced precision (float16 is covered by the CLI test): stored as bf16, values are the float32 ones rounded
    convert(sd["ckpt"], tmp_path / "vae-bf16", dtype="bfloat16", components=["vae"])
    params = jc.load_checkpoint(tmp_path / "vae-bf16").params["vae"]
    ref = flatten(direct.params["vae"])
    for k, v in flatten(params).items():
        assert v.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(v), np.asarray(ref[k].astype(jnp.bfloat16)))


def test_trained_controlnet_back_to_pytorch(cn, tmp_path):
    """A ControlNet held in JAX (here: imported from the .pth) -> save_checkpoint -> export_diffusers ->
    diffusers' from_pretrained gives the outputs of our module."""
    controlnet, params = jc.load_model(cn["pth"])
    jc.save_checkpoint(tmp_path / "jax", {"controlnet": (controlnet, params)})
    module, restored = jc.load_model(tmp_path / "jax")
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(params)))
    convert(tmp_path / "jax", tmp_path / "torch", format="diffusers")  # the CLI path, jaxcontrol in
    theirs, info = ControlNetModel.from_pretrained(tmp_path / "torch", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))

    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    cond = torch.rand(1, 3, 64, 64, generator=g)  # three stride-2 blocks in the hint encoder: 8x the latent size
    with torch.no_grad():
        down, mid = theirs(x, 10, ctx, cond, return_dict=False)
    jd, jm = jax.jit(lambda p: module.apply({"params": p}, jnp.asarray(nchw_to_nhwc(x)), 10, jnp.asarray(ctx.numpy()),
                                            jnp.asarray(nchw_to_nhwc(cond))))(restored)
    assert rel_err(jm, mid)[2] <= 1e-4
    assert max(rel_err(a, b)[2] for a, b in zip(jd, down)) <= 1e-4


# --- safety and bad input -------------------------------------------------------------------------


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


class _LegacyObject:
    """Stands for the arbitrary classes old training scripts pickled next to the weights."""

    def __init__(self):
        self.lr = 1e-4


def test_malicious_pickle_is_refused_and_never_run(cn, tmp_path, capsys):
    marker = tmp_path / "pwned.txt"
    state = dict(cn["original"])
    state["payload"] = _Exploit(marker)
    torch.save({"state_dict": state}, tmp_path / "evil.ckpt")
    with pytest.raises(jc.CheckpointError, match=r"evil\.ckpt: refused to unpickle.*builtins\.exec"):
        read_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()
    # the command line: a non-zero exit and a message naming the file (run in-process, as main() is)
    code = cli_module().main(["--from", str(tmp_path / "evil.ckpt"), "--to", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "refused to unpickle" in err and "evil.ckpt" in err and "--unsafe-load-pickle" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_unsafe_flag_and_known_bookkeeping_objects(cn, tmp_path, monkeypatch):
    # a legacy object of an arbitrary class: refused by default, loaded with the explicit flag
    state = dict(cn["original"])
    torch.save({"state_dict": state, "hyper_parameters": _LegacyObject()}, tmp_path / "legacy.ckpt")
    with pytest.raises(jc.CheckpointError, match="_LegacyObject"):
        read_checkpoint(tmp_path / "legacy.ckpt")
    assert read_checkpoint(tmp_path / "legacy.ckpt", unsafe_load_pickle=True).format == "controlnet-v1.1"

    # PyTorch Lightning's ModelCheckpoint callback (in the SD-1.x .ckpt files) loads safely as an inert stand-in
    import types

    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_path = "x"

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    torch.save({"state_dict": state, "callbacks": {ModelCheckpoint: ModelCheckpoint()}}, tmp_path / "lightning.ckpt")
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.delitem(sys.modules, name)
    assert read_checkpoint(tmp_path / "lightning.ckpt").format == "controlnet-v1.1"


def test_bad_input_errors_name_file_and_problem(sd, cn, tmp_path):
    # truncated / corrupted safetensors
    save_file(cn["original"], tmp_path / "cn.safetensors")
    data = (tmp_path / "cn.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-1000])
    with pytest.raises(jc.CheckpointError, match=r"cut\.safetensors: truncated"):
        read_checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(jc.CheckpointError, match=r"junk\.safetensors: corrupted or truncated"):
        read_checkpoint(tmp_path / "junk.safetensors")
    # unknown formats
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, tmp_path / "bert.safetensors")
    with pytest.raises(jc.CheckpointError, match=r"bert\.safetensors: unknown checkpoint format.*encoder\.layer\.0"):
        read_checkpoint(tmp_path / "bert.safetensors")
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(jc.CheckpointError, match="unknown checkpoint format"):
        read_checkpoint(tmp_path / "model.onnx")
    # mismatched components: one tensor of the wrong shape, named with both shapes
    bad = dict(cn["original"])
    bad["control_model.input_blocks.1.0.in_layers.2.weight"] = torch.zeros(32, 32, 1, 1)
    save_file(bad, tmp_path / "control_bad.safetensors")
    with pytest.raises(jc.CheckpointError, match=r"(?s)control_bad\.safetensors \[controlnet\].*"
                                                 r"down_blocks\.0\.resnets\.0\.conv1\.weight: expected shape "
                                                 r"\(32, 32, 3, 3\), found \(32, 32, 1, 1\)"):
        jc.load_model(tmp_path / "control_bad.safetensors")
    # a key from another architecture inside a known prefix
    extra = dict(cn["original"])
    extra["control_model.input_blocks.1.7.weird.weight"] = torch.zeros(1)
    save_file(extra, tmp_path / "control_extra.safetensors")
    with pytest.raises(jc.CheckpointError, match=r"no known layout explains \(1\):\s+input_blocks\.1\.7\.weird"):
        read_checkpoint(tmp_path / "control_extra.safetensors")
    # a config of the wrong class, an unknown component, an unknown field, a missing head count
    with pytest.raises(jc.ConfigError, match="is a UNet2DConditionModel, but the checkpoint's controlnet"):
        read_checkpoint(cn["pth"], configs={"controlnet": {"_class_name": "UNet2DConditionModel"}})
    with pytest.raises(jc.ConfigError, match=r"no component \['adapter'\]"):
        read_checkpoint(cn["pth"], components=["adapter"])
    with pytest.raises(jc.ConfigError, match=r"has no config field \['heads'\]"):
        read_checkpoint(cn["pth"], overrides={"controlnet": {"heads": 3}})
    with pytest.raises(jc.ConfigError, match=r"--set text_encoder\.num_attention_heads=N"):
        read_checkpoint(sd["ckpt"])


# --- atomic output --------------------------------------------------------------------------------


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_failed_conversion_leaves_destination_untouched(cn, sd, tmp_path, monkeypatch):
    from jaxcontrol.convert import jax_format

    dest = tmp_path / "out"
    convert(cn["pth"], dest)  # a good existing output
    before = _tree(dest)
    real_save = jax_format.save_params
    for error in (RuntimeError("disk full"), KeyboardInterrupt()):
        calls = []

        def failing_save(directory, params):
            calls.append(directory)
            if len(calls) == 2:  # fail half-way: the first component is already written
                raise error
            return real_save(directory, params)

        monkeypatch.setattr(jax_format, "save_params", failing_save)
        with pytest.raises(type(error)):
            convert(sd["ckpt"], dest, overrides=HEADS, overwrite=True)
        assert len(calls) == 2
        assert _tree(dest) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left
    with pytest.raises(jc.CheckpointError, match="already exists"):
        convert(sd["ckpt"], dest, overrides=HEADS)

    monkeypatch.setattr(jax_format, "save_params", real_save)
    convert(sd["ckpt"], dest, overrides=HEADS, overwrite=True, components=["vae"])
    assert json.loads((dest / "jaxcontrol.json").read_text())["components"].keys() == {"vae"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(jc.CheckpointError, match="would overlap the input"):
        convert(dest, dest / "inside", format="diffusers")


# --- the command line ----------------------------------------------------------------------------


def test_cli_help_documents_every_option():
    run = subprocess.run([sys.executable, str(REPO / "convert_weights.py"), "--help"], capture_output=True, text=True,
                         cwd=REPO)
    assert run.returncode == 0
    cli = cli_module()
    text = " ".join(run.stdout.split())
    actions = [a for a in cli.build_parser()._actions if a.option_strings]
    assert len(actions) >= 13
    for action in actions:
        for flag in action.option_strings:
            assert flag in run.stdout, flag
        assert action.help and " ".join(action.help.split()) in text, action.option_strings


def test_cli_converts_and_prints_summary(cn, tmp_path):
    run = subprocess.run(
        [sys.executable, str(REPO / "convert_weights.py"), "--from", str(cn["pth"]), "--to", str(tmp_path / "out"),
         "--format", "diffusers", "--dtype", "float16", "--no-progress"],
        capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    n = sum(v.numel() for v in cn["model"].state_dict().values())
    assert "controlnet-v1.1" in run.stdout and f"{n:,}" in run.stdout and "float16" in run.stdout
    assert str(tmp_path / "out") in run.stdout
    theirs = ControlNetModel.from_pretrained(tmp_path / "out")
    assert_same_tensors({k: v.numpy() for k, v in theirs.state_dict().items()},
                        {k: v.half() for k, v in cn["model"].state_dict().items()}, "controlnet (float16)")
