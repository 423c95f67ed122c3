"""The code in the README and the guides runs.

- Every ```python block of README.md, docs/TRAINING.md and docs/GUIDANCE.md is executed, each
  file's blocks in order in one namespace, in a temporary working directory. The model paths the
  README uses (`stable-diffusion-v1-5`, `control_v11p_sd15_canny`, the original single files)
  hold tiny random models of the same formats there, built with diffusers: nothing is downloaded.
- Every `infer.py` / `convert_weights.py` command in their ```bash blocks is parsed by that
  tool's own argument parser (an option that does not exist fails), the README's conversions
  run for real on the tiny files, every `train.py --config.KEY=...` names a key of its config
  file, and every `make TARGET` is a target of the Makefile.
"""

from __future__ import annotations

import importlib.util
import re
import runpy
import shlex
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = ("README.md", "docs/TRAINING.md", "docs/GUIDANCE.md")
TOOLS = ("infer.py", "convert_weights.py", "train.py")


def python_blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / name).read_text(), re.S)


def shell_commands(name: str) -> list[list[str]]:
    """The commands of a file's ```bash / ```sh blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", (ROOT / name).read_text(), re.S):
        pending = ""
        for line in block.replace("\\\n", " ").splitlines():
            pending += line + "\n"
            try:
                words = shlex.split(pending, comments=True)
            except ValueError:  # a quotation spanning lines: read on
                continue
            pending = ""
            if words:
                commands.append(words)
    return commands


def tool_commands(name: str, tool: str) -> list[list[str]]:
    """The arguments of every `[.venv/bin/]python TOOL ...` command of a file."""
    return [words[2:] for words in shell_commands(name)
            if len(words) >= 2 and Path(words[0]).name.startswith("python") and words[1] == tool]


def load_tool(tool: str):
    spec = importlib.util.spec_from_file_location(f"docs_cli_{Path(tool).stem}", ROOT / tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_blocks(name: str, namespace: dict | None = None) -> dict:
    namespace = {"__name__": "docs_example"} if namespace is None else namespace
    for i, code in enumerate(python_blocks(name)):
        exec(compile(code, f"{name}[python block {i}]", "exec"), namespace)
    return namespace


# --- tiny models at the paths the README uses --------------------------------------------------------

TEXT = dict(bos_token_id=0, eos_token_id=2, hidden_size=64, intermediate_size=37, layer_norm_eps=1e-5,
            num_attention_heads=1, num_hidden_layers=2, pad_token_id=1, vocab_size=1000)
# diffusers' tiny adapter-test U-Net with one layer per block (compile time follows the layer count)
UNET = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, cross_attention_dim=64,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
# 4 VAE levels and the standard hint encoder: the 8x image / latent factor of SD
VAE = dict(block_out_channels=[32, 32, 32, 32], in_channels=3, out_channels=3, layers_per_block=1,
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4)


def _ldm_mappings():
    """The inverse key mappings (diffusers -> original LDM names) that tests/test_convert.py writes."""
    spec = importlib.util.spec_from_file_location("docs_convert_mappings", ROOT / "tests" / "test_convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def readme_models(tmp_path_factory) -> Path:
    return build_readme_models(tmp_path_factory.mktemp("readme"))


def build_readme_models(root: Path) -> Path:
    """A folder with what the README's examples read, as tiny random models (SD-1.x layout)."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, StableDiffusionPipeline
    from diffusers import UNet2DConditionModel
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from jaxcontrol.testing.reference import randomize_, tiny_clip_tokenizer

    ldm = _ldm_mappings()
    torch.manual_seed(0)
    tok = tiny_clip_tokenizer(root / "sd15" / "tokenizer")
    unet = randomize_(UNet2DConditionModel(**UNET), 1)
    vae = randomize_(AutoencoderKL(**VAE), 2)
    text = randomize_(CLIPTextModel(CLIPTextConfig(**TEXT)), 3)
    StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(tok),
        scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                skip_prk_steps=True, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(root / "stable-diffusion-v1-5")
    single = {"model.diffusion_model." + k: v for k, v in ldm.unet_to_ldm(unet.state_dict(), 1).items()}
    single.update({"first_stage_model." + k: v for k, v in ldm.vae_to_ldm(vae.state_dict()).items()})
    single.update(ldm.clip_to_ldm(text.state_dict()))
    save_file(ldm.contiguous(single), root / "v1-5-pruned-emaonly.safetensors")

    controlnet = randomize_(ControlNetModel.from_unet(unet), 4)
    controlnet.save_pretrained(root / "control_v11p_sd15_canny")
    original = {"control_model." + k: v for k, v in ldm.unet_to_ldm(controlnet.state_dict(), 1).items()}
    torch.save(ldm.contiguous(original), root / "control_v11p_sd15_canny.pth")

    import jaxcontrol

    jaxcontrol.save_checkpoint(root / "my-controlnet-jax",
                               {"controlnet": jaxcontrol.load_model(root / "control_v11p_sd15_canny")})
    rng = np.random.default_rng(0)
    bird = np.zeros((64, 64, 3), np.uint8)
    bird[16:48, 20:44] = rng.integers(100, 255, 3, dtype=np.uint8)
    Image.fromarray(bird).save(root / "bird.png")
    Image.fromarray(bird).save(root / "outline.png")
    from jaxcontrol.data.fill50k import fill50k_example

    Image.fromarray(fill50k_example(0, image_size=64, colors="basic").image).save(root / "circle.png")
    _concat_models(root, vae, text, CLIPTokenizer.from_pretrained(tok))
    from jaxcontrol.testing.sdxl_parity import save_tiny_sdxl_pipeline

    for kind, name in (("base", "stable-diffusion-xl-base-1.0"), ("refiner", "stable-diffusion-xl-refiner-1.0")):
        save_tiny_sdxl_pipeline(root / f"_{kind}", kind=kind)
        (root / f"_{kind}" / "pipeline").rename(root / name)
    _lora_and_embedding(root)
    return root


def _lora_and_embedding(root: Path) -> None:
    """The README's LoRAs (diffusers' layout, on the tiny U-Net: a file and a folder) and A1111
    embedding (a .pt)."""
    import jax.numpy as jnp
    import torch

    import jaxcontrol
    from jaxcontrol.models.lora import Lora, init_lora, lora_targets

    _, unet = jaxcontrol.load_model(root / "stable-diffusion-v1-5" / "unet")
    layers = init_lora(unet, lora_targets(unet, ["to_q", "to_v"]), rank=2, seed=0)
    layers = {m: {**v, "up": jnp.full(v["up"].shape, 0.05, jnp.float32)} for m, v in layers.items()}
    jaxcontrol.save_lora(Lora("watercolor", {"unet": layers}), root / "watercolor.safetensors")
    (root / "detail-lora").mkdir()  # a LoRA folder, as diffusers' save_lora_weights writes one
    jaxcontrol.save_lora(Lora("detail", {"unet": layers}), root / "detail-lora" / "pytorch_lora_weights.safetensors")
    vectors = torch.randn(2, TEXT["hidden_size"], generator=torch.Generator().manual_seed(0))
    torch.save({"string_to_param": {"*": vectors}, "name": "<my-style>"}, root / "my-style.pt")


def _concat_models(root: Path, vae, text, tokenizer) -> None:
    """The README's concatenation-conditioned models (inpainting 9, depth 5, InstructPix2Pix 8
    channels), a tiny DPT depth estimator, and the images its commands read."""
    import diffusers
    import torch
    import transformers
    from PIL import Image

    from jaxcontrol.testing.reference import randomize_

    common = dict(vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=diffusers.PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1))
    no_checker = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for folder, cls, width, extra in (
            ("stable-diffusion-inpainting", diffusers.StableDiffusionInpaintPipeline, 9, no_checker),
            ("stable-diffusion-2-depth", diffusers.StableDiffusionDepth2ImgPipeline, 5,
             dict(depth_estimator=None, feature_extractor=None)),
            ("instruct-pix2pix", diffusers.StableDiffusionInstructPix2PixPipeline, 8, no_checker)):
        unet = randomize_(diffusers.UNet2DConditionModel(**UNET, in_channels=width), width)
        cls(unet=unet, **common, **extra).save_pretrained(root / folder)
    dpt = transformers.DPTForDepthEstimation(transformers.DPTConfig(
        hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, image_size=32, patch_size=8,
        backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8,
        reassemble_factors=[4, 2, 1, 0.5]))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # weights large enough that the estimate has a range (a fresh DPT predicts ~0)
        for param in dpt.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=g))
    dpt.save_pretrained(root / "dpt-hybrid-midas")
    transformers.DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dpt-hybrid-midas")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "room.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[20:50, 10:40] = 255
    Image.fromarray(mask).save(root / "sofa_mask.png")
    Image.fromarray((np.mgrid[0:64, 0:64][1] * 1000 + 7).astype(np.uint16)).save(root / "depth16.png")


def _workdir(models: Path, dest: Path) -> Path:
    """A fresh working directory that sees the models (symlinked) but writes its own outputs."""
    dest.mkdir()
    for p in models.iterdir():
        (dest / p.name).symlink_to(p, target_is_directory=p.is_dir())
    return dest


# --- ```python blocks -------------------------------------------------------------------------------


def example_groups(name: str) -> list[list[int]]:
    """A file's python blocks grouped into examples: a block that imports jaxcontrol starts a new one."""
    groups: list[list[int]] = []
    for i, code in enumerate(python_blocks(name)):
        if not groups or re.search(r"^import jaxcontrol\b", code, re.M):
            groups.append([])
        groups[-1].append(i)
    return groups


README_GROUPS = example_groups("README.md")


def test_readme_examples_cover_every_block():
    assert len(README_GROUPS) >= 2 and sum(README_GROUPS, []) == list(range(len(python_blocks("README.md"))))


@pytest.mark.parametrize("group", [  # SDXL's base -> refiner example compiles two more pipelines: slow
    pytest.param(g, marks=[pytest.mark.slow] if any("denoising_end" in python_blocks("README.md")[i] for i in grp)
                 else []) for g, grp in enumerate(README_GROUPS)])
def test_readme_python_blocks_run(group, readme_models, tmp_path, monkeypatch):
    """Each README example (its blocks in order, one namespace) runs on the tiny models."""
    monkeypatch.chdir(_workdir(readme_models, tmp_path / "cwd"))
    blocks = python_blocks("README.md")
    ns = {"__name__": "docs_example"}
    for i in README_GROUPS[group]:
        exec(compile(blocks[i], f"README.md[python block {i}]", "exec"), ns)
    if "refined" in ns:  # SDXL: base -> refiner
        assert ns["latents"].shape == (1, 32, 32, 4) and ns["refined"].shape == (1, 64, 64, 3)
        assert ns["refined"].dtype == np.uint8
    elif "images" in ns:  # Pipeline, then the score-function API
        images = np.asarray(ns["images"])
        assert images.dtype == np.uint8 and images.shape == (1, 64, 64, 3)
        assert np.isfinite(np.asarray(ns["x"])).all() and ns["x"].shape == (1, 8, 8, 4)
    else:  # load_model and the raw calls, load_pipeline, controlnet_from_unet, the conversions
        assert len(ns["down"]) == 4 and ns["eps"].shape == (2, 8, 8, 4)
        assert (tmp_path / "cwd" / "canny-torch" / "config.json").is_file()


GUIDANCE_BLOCKS = python_blocks("docs/GUIDANCE.md")


@pytest.mark.parametrize("index", [pytest.param(i, marks=[pytest.mark.slow] if "load_embedded(" in b else [])
                                   for i, b in enumerate(GUIDANCE_BLOCKS)])
def test_guidance_blocks_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(GUIDANCE_BLOCKS[index], f"docs/GUIDANCE.md[python block {index}]", "exec"),
         {"__name__": "docs_example"})


def test_there_is_a_worked_example():
    assert GUIDANCE_BLOCKS, "docs/GUIDANCE.md lost its worked example"


@pytest.mark.slow
def test_training_python_blocks_run(tmp_path, monkeypatch):
    assert python_blocks("docs/TRAINING.md"), "docs/TRAINING.md has no Python example"
    work = tmp_path / "cwd"
    work.mkdir()
    (work / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    monkeypatch.chdir(work)
    run_blocks("docs/TRAINING.md")


# --- ```bash blocks ---------------------------------------------------------------------------------


def test_every_documented_command_uses_options_that_exist():
    checked = 0
    for tool in ("infer.py", "convert_weights.py"):
        parser = load_tool(tool).build_parser()
        for name in DOC_FILES:
            for argv in tool_commands(name, tool):
                try:
                    parser.parse_args(argv)
                except SystemExit as e:
                    pytest.fail(f"{name}: `{tool} {shlex.join(argv)}` does not parse (exit {e.code})")
                checked += 1
    assert checked >= 6


def _config_keys(config_arg: str, overrides: list[str]) -> list[str]:
    """The `--config.KEY` overrides whose KEY is not in the config file's config."""
    file, *arg = config_arg.split(":", 1)
    config = runpy.run_path(str(ROOT / file))["get_config"](*arg)
    unknown = []
    for key in overrides:
        node = config
        for part in key.split("."):
            if part not in node:
                unknown.append(key)
                break
            node = node[part]
    return unknown


def test_every_documented_train_command_names_existing_config_keys():
    checked = 0
    for name in DOC_FILES:
        for argv in tool_commands(name, "train.py"):
            flags = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
            it = iter(argv)
            for a in it:  # `--flag value` form
                if a in ("--config", "--workdir"):
                    flags[a[2:]] = next(it)
            assert {"config", "workdir"} <= set(flags), f"{name}: train.py {shlex.join(argv)}"
            assert (ROOT / flags["config"].split(":")[0]).is_file(), f"{name}: no config file {flags['config']}"
            overrides = [k[len("config."):] for k in flags if k.startswith("config.")]
            unknown = _config_keys(flags["config"], overrides)
            assert not unknown, f"{name}: train.py {shlex.join(argv)}: unknown config keys {unknown}"
            checked += 1
    assert checked >= 4


def test_every_documented_make_target_exists():
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    used = {w[1] for name in DOC_FILES for w in shell_commands(name) if w[0] == "make" and len(w) > 1}
    assert used and used <= targets, used - targets


def test_every_documented_script_exists():
    scripts = {w[1] for name in DOC_FILES for w in shell_commands(name)
               if len(w) > 1 and Path(w[0]).name.startswith("python") and w[1].endswith(".py")}
    assert scripts and all((ROOT / s).is_file() for s in scripts), [s for s in scripts if not (ROOT / s).is_file()]


def test_readme_conversions_run(readme_models, tmp_path, monkeypatch, capsys):
    work = _workdir(readme_models, tmp_path / "cwd")
    monkeypatch.chdir(work)
    cli = load_tool("convert_weights.py")
    commands = tool_commands("README.md", "convert_weights.py")
    assert len(commands) == 3
    for argv in commands:
        assert cli.main(argv) == 0, f"convert_weights.py {shlex.join(argv)}"
        dest = work / argv[argv.index("--to") + 1]
        assert any(dest.iterdir()), dest
    import jaxcontrol

    jaxcontrol.load_pipeline(work / "sd15-jax")
    assert (work / "my-controlnet-torch" / "config.json").is_file()


@pytest.mark.slow
def test_readme_infer_commands_run(readme_models, tmp_path, monkeypatch):
    """The README's infer.py commands, run as written (the SD-1.5 paths hold the tiny models) except
    for the image size: 512x512 is 4096-token self-attention, gigabytes of scores even on a tiny U-Net."""
    work = _workdir(readme_models, tmp_path / "cwd")
    monkeypatch.chdir(work)
    cli = load_tool("infer.py")
    commands = tool_commands("README.md", "infer.py")
    assert len(commands) >= 3
    for argv in commands:
        argv = [("64" if i and argv[i - 1] in ("--height", "--width") else a) for i, a in enumerate(argv)]
        assert cli.main(argv) == 0, f"infer.py {shlex.join(argv)}"
    assert len(list((work / "out").glob("image_*.png"))) >= 4
