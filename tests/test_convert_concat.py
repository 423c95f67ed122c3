"""convert_weights on the original single files of the concatenation-conditioned families: SD inpainting
(sd-v1-5-inpainting layout, 9 U-Net input channels), SD-2 depth (512-depth-ema layout: OpenCLIP, 5
channels, a MiDaS estimator under `depth_model.*`) and InstructPix2Pix (instruct-pix2pix-00-22000, 8).

Each file is built from a tiny random diffusers pipeline of its kind (`save_tiny_pipeline`) with the
inverse key mappings of `test_convert.py` (independent of `jaxcontrol.convert`). Our import is compared
tensor by tensor with diffusers' own `from_single_file` on the same file, offline (`config=` the saved
pipeline folder): the whole pipeline for inpainting and InstructPix2Pix; for depth, diffusers has no
`StableDiffusionDepth2ImgPipeline.from_single_file`, so its U-Net and VAE come from the model classes'
`from_single_file` and the OpenCLIP text tower is compared with the source model (diffusers' OpenCLIP
reader hard-codes the 24-layer key names). The tiny models' GroupNorm groups and CLIP head count are
not inferable from shapes and are given as a user would (`--set`).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_convert import (
    assert_same_tensors,
    cli_module,
    clip_to_ldm,
    clip_to_openclip,
    contiguous,
    torch_names,
    unet_to_ldm,
    vae_to_ldm,
)

import diffusers
import jaxcontrol as jc
from jaxcontrol.convert import convert, read_checkpoint
from jaxcontrol.convert.pipeline_kind import KIND_CHOICES
from jaxcontrol.pipeline import Pipeline
from jaxcontrol.testing.pipeline_parity import save_tiny_pipeline

# the tiny models' values the weights do not record (GroupNorm groups 1 and 2, 4 CLIP heads of width 8)
SET = {"unet": {"norm_num_groups": 1}, "vae": {"norm_num_groups": 2}, "text_encoder": {"num_attention_heads": 4}}
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
# save_tiny_pipeline's kind -> (our kind, diffusers pipeline class, U-Net input channels)
FAMILIES = {
    "inpaint": ("inpaint", "StableDiffusionInpaintPipeline", 9),
    "depth": ("depth", "StableDiffusionDepth2ImgPipeline", 5),
    "instruct-pix2pix": ("instruct_pix2pix", "StableDiffusionInstructPix2PixPipeline", 8),
}
# a few tensors in the names of the MiDaS DPT-Hybrid estimator LDM's depth model carries
MIDAS = {"depth_model.model.pretrained.model.patch_embed.backbone.stem.conv.weight": (8, 3, 7, 7),
         "depth_model.model.pretrained.model.blocks.0.attn.qkv.weight": (24, 8),
         "depth_model.model.scratch.refinenet1.out_conv.weight": (4, 4, 1, 1),
         "depth_model.model.scratch.output_conv.0.bias": (4,)}


def ldm_state(pipe, *, openclip: bool) -> dict:
    """An LDM `LatentDiffusion` state dict of a diffusers pipeline's U-Net, VAE and text encoder."""
    lpb = pipe.unet.config.layers_per_block
    state = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(pipe.unet.state_dict(), lpb).items()}
    state.update({"first_stage_model." + k: v for k, v in vae_to_ldm(pipe.vae.state_dict()).items()})
    state.update(clip_to_openclip(pipe.text_encoder.state_dict()) if openclip else
                 clip_to_ldm(pipe.text_encoder.state_dict()))
    state["betas"] = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    return state


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """Per kind: the tiny diffusers pipeline (in memory and saved) and its original single file (.safetensors)."""
    out = {}
    for seed, name in enumerate(FAMILIES):
        root = tmp_path_factory.mktemp(name)
        pipe = save_tiny_pipeline(root, kind=name, seed=seed)
        state = ldm_state(pipe, openclip=name == "depth")  # 512-depth-ema is an SD-2 file (OpenCLIP ViT-H)
        if name == "depth":
            g = torch.Generator().manual_seed(7)
            state.update({k: torch.randn(s, generator=g) for k, s in MIDAS.items()})
        file = root / f"{name}-tiny.safetensors"
        save_file(contiguous(state), file)
        out[name] = dict(root=root, pipe=pipe, folder=root / "pipeline", file=file, state=state,
                         tokenizer=root / "pipeline" / "tokenizer")
    return out


def source_tensors(module) -> dict:
    return {k: v.numpy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_import_detects_the_kind_and_matches_diffusers_from_single_file(families, name):
    fam = families[name]
    kind, cls, width = FAMILIES[name]
    ckpt = read_checkpoint(fam["file"], overrides=SET)
    assert ckpt.format == ("ldm-sd2" if name == "depth" else "ldm-sd1")
    assert ckpt.components["unet"].config["in_channels"] == width
    assert ckpt.pipeline_class == cls
    assert ckpt.prediction_type == "epsilon" and ckpt.scheduler_config["prediction_type"] == "epsilon"
    assert any(f"kind {kind!r}" in n and f"({ckpt.components['unet'].config['block_out_channels'][0]}, {width}, 3, 3)"
               in n for n in ckpt.notes), ckpt.notes
    bundle = jc.load_single_file(fam["file"], overrides=SET)
    assert bundle.class_name == cls

    if name == "depth":
        # diffusers has no Depth2Img from_single_file: its model classes read the same file offline
        refs = {part: getattr(diffusers, type(getattr(fam["pipe"], part)).__name__).from_single_file(
            str(fam["file"]), config=str(fam["folder"]), subfolder=part, local_files_only=True).state_dict()
            for part in ("unet", "vae")}
        refs["text_encoder"] = fam["pipe"].text_encoder.state_dict()  # the OpenCLIP tower against its source
        # SD-2 without global_step 875000 would be v-prediction; a depth model predicts epsilon
        assert any("epsilon assumed for an SD-2.x depth model" in n for n in ckpt.notes)
        assert ckpt.scheduler_config["_class_name"] == "DDIMScheduler"
        assert bundle.modules["unet"].config.sample_size == 64  # not the 768-v size
        # the MiDaS estimator is recognised and skipped with its own note, not listed as unknown
        assert any(n.startswith(f"depth_model.* ({len(MIDAS)} tensors): the MiDaS depth estimator") for n in ckpt.notes)
        assert not any("skipped" in n and "depth_model" in n for n in ckpt.notes)
    else:
        theirs = getattr(diffusers, cls).from_single_file(str(fam["file"]), config=str(fam["folder"]),
                                                          local_files_only=True, safety_checker=None)
        assert theirs.unet.config.in_channels == width
        refs = {part: getattr(theirs, part).state_dict() for part in ("unet", "vae", "text_encoder")}
    for part, ref in refs.items():
        # the file is a faithful original: diffusers (or the source) gives back the source model
        assert_same_tensors(source_tensors(getattr(fam["pipe"], part)), ref, f"{name} {part} (file)")
        assert_same_tensors(torch_names(bundle.params[part], part == "text_encoder"), ref, f"{name} {part}")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_loads_in_diffusers_and_as_the_right_pipeline_kind(families, name, tmp_path):
    fam = families[name]
    kind, cls, width = FAMILIES[name]
    # to diffusers: model_index.json names the kind's pipeline, which from_pretrained loads offline
    report = convert(fam["file"], tmp_path / "diffusers", format="diffusers", overrides=SET,
                     tokenizer=fam["tokenizer"])
    assert report.pipeline_class == cls
    index = json.loads((tmp_path / "diffusers" / "model_index.json").read_text())
    assert index["_class_name"] == cls
    extra = {}
    if name == "depth":  # no MiDaS weights to write: the slots are empty, and diffusers must be told so
        assert index["depth_estimator"] == [None, None] and index["feature_extractor"] == [None, None]
        assert "safety_checker" not in index and "requires_safety_checker" not in index
        extra = dict(depth_estimator=None, feature_extractor=None)
    else:
        assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    theirs = getattr(diffusers, cls).from_pretrained(tmp_path / "diffusers", local_files_only=True, **extra)
    assert type(theirs).__name__ == cls and theirs.unet.config.in_channels == width
    for part in ("unet", "vae", "text_encoder"):
        assert_same_tensors(source_tensors(getattr(theirs, part)), getattr(fam["pipe"], part).state_dict(), part)

    # to the jaxcontrol format: the manifest carries the class, and both outputs load as the right kind
    convert(fam["file"], tmp_path / "jax", overrides=SET, tokenizer=fam["tokenizer"])
    manifest = json.loads((tmp_path / "jax" / "jaxcontrol.json").read_text())
    assert manifest["pipeline_class"] == cls and manifest["source"]["file"] == fam["file"].name
    for out in ("jax", "diffusers"):
        pipeline = Pipeline.from_pretrained(tmp_path / out)
        assert pipeline.kind == kind and pipeline.bundle.class_name == cls, out
    if name == "inpaint":  # and back out of our format to diffusers, class kept (the same code for every kind)
        convert(tmp_path / "jax", tmp_path / "again", format="diffusers")
        assert json.loads((tmp_path / "again" / "model_index.json").read_text())["_class_name"] == cls


def test_kind_override_is_checked_against_the_width(families, tmp_path):
    inpaint, pix = families["inpaint"]["file"], families["instruct-pix2pix"]["file"]
    assert read_checkpoint(inpaint, overrides=SET, kind="inpaint").pipeline_class == "StableDiffusionInpaintPipeline"
    assert read_checkpoint(inpaint, overrides=SET, kind="auto").pipeline_class == "StableDiffusionInpaintPipeline"
    with pytest.raises(jc.ConfigError) as e:
        read_checkpoint(inpaint, overrides=SET, kind="depth")
    msg = str(e.value)
    assert str(inpaint) in msg and CONV_IN in msg
    assert "expects" in msg and "(4, 5, 3, 3)" in msg and "found (4, 9, 3, 3) (kind 'inpaint')" in msg
    # relabelling a 4-channel-wide difference is refused too, also for a lone U-Net (no pipeline class)
    with pytest.raises(jc.ConfigError, match=r"kind 'inpaint' .*\(4, 9, 3, 3\).*found \(4, 8, 3, 3\)"):
        read_checkpoint(pix, overrides=SET, kind="inpaint", components=["unet"])
    with pytest.raises(jc.ConfigError, match=r"kind must be one of \['auto', 'text2image', 'depth', "
                                             r"'instruct_pix2pix', 'inpaint'\], got 'pix2pix'"):
        read_checkpoint(pix, overrides=SET, kind="pix2pix")
    with pytest.raises(jc.ConfigError, match=r"kind 'inpaint' \(--kind\) describes a U-Net.*\(\['vae'\]\) have none"):
        read_checkpoint(inpaint, overrides=SET, kind="inpaint", components=["vae"])

    # the command line: the same refusal as a one-line error (exit 1), an unknown kind is a usage error (2)
    cli = cli_module()
    code = cli.main(["--from", str(inpaint), "--to", str(tmp_path / "out"), "--kind", "text2image", "--no-progress",
                     *[f"--set={c}.{k}={v}" for c, f in SET.items() for k, v in f.items()]])
    assert code == 1 and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--from", str(inpaint), "--to", str(tmp_path / "out"), "--kind", "pix2pix"])
    assert exit_.value.code == 2
    kind_flag = next(a for a in cli.build_parser()._actions if "--kind" in a.option_strings)
    assert tuple(kind_flag.choices) == KIND_CHOICES and kind_flag.default == "auto"


def test_unknown_conv_in_width_is_refused_for_a_pipeline(families, tmp_path):
    """A U-Net of a width no kind has (here 7 inputs) cannot be named a pipeline; it converts on its own."""
    state = dict(families["inpaint"]["state"])
    g = torch.Generator().manual_seed(3)
    state[CONV_IN] = torch.randn(4, 7, 3, 3, generator=g)
    file = tmp_path / "seven.safetensors"
    save_file(contiguous(state), file)
    with pytest.raises(jc.ConfigError) as e:
        read_checkpoint(file, overrides=SET)
    msg = str(e.value)
    assert str(file) in msg and f"{CONV_IN} has shape (4, 7, 3, 3)" in msg
    assert "(4, 4, 3, 3) text2image, (4, 5, 3, 3) depth, (4, 8, 3, 3) instruct_pix2pix, (4, 9, 3, 3) inpaint" in msg
    assert "--component unet" in msg
    alone = jc.load_single_file(file, components=["unet"], overrides={"unet": SET["unet"]})
    assert alone.class_name == "" and alone.modules["unet"].config.in_channels == 7  # no pipeline class
    np.testing.assert_array_equal(torch_names(alone.params["unet"])["conv_in.weight"], state[CONV_IN].numpy())


def test_depth_estimator_keys_are_skipped_with_a_note(families, tmp_path):
    """512-depth-ema's `depth_model.*` keys: accounted for, never an error, however many there are; the
    noise-schedule buffers are still reported on their own."""
    fam = families["depth"]
    ckpt = read_checkpoint(fam["file"], overrides=SET)
    skipped = [n for n in ckpt.notes if n.startswith("not part of any component")]
    assert skipped == ["not part of any component, skipped: 1 noise-schedule buffers"]
    # the same file without the estimator: no depth note, same components
    bare = {k: v for k, v in fam["state"].items() if not k.startswith("depth_model.")}
    save_file(contiguous(bare), tmp_path / "no-midas.safetensors")
    plain = read_checkpoint(tmp_path / "no-midas.safetensors", overrides=SET)
    assert not any("depth_model" in n for n in plain.notes)
    assert plain.pipeline_class == ckpt.pipeline_class == "StableDiffusionDepth2ImgPipeline"


def test_folders_are_relabelled_or_checked_by_the_width(families, tmp_path):
    """A diffusers folder labelled StableDiffusionPipeline around a 9-channel U-Net (as older conversions
    wrote) gets the inpainting class; a class naming another kind than the width is refused."""
    folder = tmp_path / "pipe"
    shutil.copytree(families["inpaint"]["folder"], folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    ckpt = read_checkpoint(folder)
    assert ckpt.pipeline_class == "StableDiffusionInpaintPipeline"
    assert any("StableDiffusionPipeline -> StableDiffusionInpaintPipeline" in n for n in ckpt.notes)
    index_path.write_text(json.dumps({**index, "_class_name": "StableDiffusionInstructPix2PixPipeline"}))
    with pytest.raises(jc.ConfigError, match=r"unet conv_in\.weight of shape \(4, 9, 3, 3\).*"
                                             r"StableDiffusionInstructPix2PixPipeline is a 'instruct_pix2pix' model"):
        read_checkpoint(folder)
    with pytest.raises(jc.ConfigError, match="kind 'depth'"):
        read_checkpoint(families["inpaint"]["folder"], kind="depth")


def test_a_whole_controlldm_gets_the_controlnet_class_of_its_kind():
    """ControlNet v1.0 files (a ControlLDM) around an inpainting U-Net become diffusers' ControlNet inpainting
    pipeline; diffusers has no depth or InstructPix2Pix pipeline with a ControlNet, so those are refused
    (configs only: `resolve_kind` reads no tensor)."""
    from pathlib import Path

    from jaxcontrol.convert.components import Checkpoint, Component
    from jaxcontrol.convert.pipeline_kind import resolve_kind

    def controlldm(width):
        unet = {"_class_name": "UNet2DConditionModel", "in_channels": width, "out_channels": 4,
                "block_out_channels": [32, 64]}
        comps = {"controlnet": Component("controlnet", {"_class_name": "ControlNetModel"}),
                 "unet": Component("unet", unet)}
        return Checkpoint(Path("control_sd15_x.pth"), "controlnet-v1.0", comps,
                          pipeline_class="StableDiffusionControlNetPipeline")

    for width, cls in ((9, "StableDiffusionControlNetInpaintPipeline"), (4, "StableDiffusionControlNetPipeline")):
        ckpt = controlldm(width)
        resolve_kind(ckpt)
        assert ckpt.pipeline_class == cls
    with pytest.raises(jc.ConfigError, match=r"control_sd15_x\.pth: model\.diffusion_model\.input_blocks\.0\.0\.weight "
                                             r"of shape \(32, 5, 3, 3\).*no depth pipeline with a ControlNet"):
        resolve_kind(controlldm(5))
