"""Hostile checkpoint files (issue 14, classes 8-12): names and links that escape their folder,
FIFOs, stride-0 pickles, overlapping safetensors offsets, bad config values, deeply nested JSON,
and what a killed or refused conversion leaves behind.

Every model here is a tiny jaxcontrol VAE (one block of 8 channels) written with our own
exporter, so each test takes a second or two; a few run a fresh Python in a subprocess (a FIFO
could hang, a kill must really kill).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxcontrol as jc
from jaxcontrol.convert import SafetensorsFile, convert, export_diffusers, open_weights, save_checkpoint, save_safetensors
from jaxcontrol import atomic
from jaxcontrol.convert import jax_format
from jaxcontrol.errors import CheckpointError, ConfigError
from jaxcontrol.models.adapter import T2IAdapterConfig
from jaxcontrol.models.clip import CLIPTextConfig, CLIPVisionConfig
from jaxcontrol.models.configs import ControlNetConfig, UNet2DConditionConfig
from jaxcontrol.models.vae import AutoencoderKLConfig
from jaxcontrol.testing.reference import tiny_clip_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY_VAE = dict(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, layers_per_block=1)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def vae():
    module = jc.AutoencoderKL(AutoencoderKLConfig(**TINY_VAE))
    return module, jc.init_params(module, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def pipeline_dir(vae, tmp_path_factory):
    """A diffusers pipeline folder: two VAEs, a tokenizer and a scheduler config."""
    root = tmp_path_factory.mktemp("pipe")
    tok = tiny_clip_tokenizer(root / "tok-src")
    export_diffusers(root / "pipe", {"vae": vae, "vae_b": vae}, pipeline_class="StableDiffusionPipeline",
                     tokenizers={"tokenizer": tok}, scheduler_config={"_class_name": "PNDMScheduler"})
    return root / "pipe"


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    return dest


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _victim(tmp_path: Path) -> tuple[Path, bytes]:
    """An existing model folder next to the output, which a write escaping `--to` would overwrite."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "config.json").write_text('{"precious": true}')
    return victim, (victim / "config.json").read_bytes()


# --- class 8: names and paths from files stay inside their folder -----------------------------------


@pytest.mark.parametrize("bad", ["../victim", "/abs/victim", "a/../../victim", "sub/dir"])
def test_model_index_component_names_cannot_escape(pipeline_dir, tmp_path, bad):
    victim, before = _victim(tmp_path)
    pipe = _copy(pipeline_dir, tmp_path / "pipe")
    _edit_json(pipe / "model_index.json", lambda d: d.update({bad: ["diffusers", "AutoencoderKL"]}))
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    with pytest.raises(CheckpointError, match=f"component {bad!r}"):
        jc.load_pipeline(pipe)
    with pytest.raises(CheckpointError, match=f"component {bad!r}"):
        convert(pipe, out)
    with pytest.raises(CheckpointError, match=f"component {bad!r}"):
        convert(pipe, out, format="diffusers")
    assert (victim / "config.json").read_bytes() == before and _listing(victim) == ["config.json"]
    assert _listing(out.parent) == []


def test_writers_refuse_component_names_outside_the_output(vae, tmp_path):
    victim, before = _victim(tmp_path)
    out = tmp_path / "out"
    for writer in (save_checkpoint, export_diffusers):
        with pytest.raises(CheckpointError, match="component name '../victim'"):
            writer(out, {"vae": vae, "../victim": vae})
        with pytest.raises(CheckpointError, match="component name"):
            writer(out, {"vae": vae, str(victim): vae})
    with pytest.raises(CheckpointError, match="tokenizer name '../victim'"):
        save_checkpoint(out, {"vae": vae, "vae_b": vae}, tokenizers={"../victim": tiny_clip_tokenizer(tmp_path / "t")},
                        scheduler_config={"_class_name": "PNDMScheduler"})
    assert (victim / "config.json").read_bytes() == before and _listing(victim) == ["config.json"]
    assert _listing(tmp_path) == ["t", "victim"]  # no output, no temporary folder


@pytest.mark.parametrize("field,value", [
    ("path", "../victim"), ("path", "/abs/vae"), ("tokenizers", "../tok"), ("scheduler", "../secret.json"),
])
def test_manifest_paths_cannot_escape(vae, tmp_path, field, value):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, {"vae": vae, "vae_b": vae}, tokenizers={"tokenizer": tiny_clip_tokenizer(tmp_path / "t")},
                    scheduler_config={"_class_name": "PNDMScheduler"})
    shutil.copytree(ckpt / "vae", tmp_path / "victim")  # a loadable component outside, which must not be read
    (tmp_path / "secret.json").write_text('{"_class_name": "PNDMScheduler"}')

    def change(m):
        if field == "path":
            m["components"]["vae"]["path"] = value
        elif field == "tokenizers":
            m["tokenizers"]["tokenizer"] = value
        else:
            m["scheduler"] = value

    _edit_json(ckpt / "jaxcontrol.json", change)
    with pytest.raises(CheckpointError, match=r"jaxcontrol.json: (components\['vae'\].path|tokenizers\['tokenizer'\]|"
                                              r"scheduler)"):
        jc.load_pipeline(ckpt)
    with pytest.raises(CheckpointError, match="jaxcontrol.json"):
        convert(ckpt, tmp_path / "out", format="diffusers")
    assert not (tmp_path / "out").exists()


def test_links_out_of_a_folder_are_not_read_or_copied(pipeline_dir, tmp_path):
    secret = tmp_path / "private.txt"
    secret.write_text("PRIVATE KEY")
    pipe = _copy(pipeline_dir, tmp_path / "pipe")
    (pipe / "tokenizer" / "added_tokens.json").symlink_to(secret)
    for call in (lambda: jc.load_pipeline(pipe), lambda: convert(pipe, tmp_path / "out"),
                 lambda: convert(pipe, tmp_path / "out", format="diffusers")):
        with pytest.raises(CheckpointError, match=r"added_tokens.json resolves to .*private.txt, outside"):
            call()
    assert not (tmp_path / "out").exists()

    # a tokenizer folder given with --tokenizer, and a weights file that links out
    tok = tiny_clip_tokenizer(tmp_path / "tok")
    (tok / "vocab.txt").symlink_to(secret)
    with pytest.raises(CheckpointError, match="vocab.txt resolves to"):
        convert(pipe / "vae", tmp_path / "out", tokenizer=tok)
    model = _copy(pipe / "vae", tmp_path / "model")
    (model / WEIGHTS).rename(tmp_path / "outside.safetensors")
    (model / WEIGHTS).symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(CheckpointError, match=f"{WEIGHTS} resolves to .*outside.safetensors, outside"):
        jc.load_model(model)
    # copying a tokenizer into an output: a link out is refused, a link that stays inside is copied as a file
    bundle = {"vae": jc.load_model(pipe / "vae"), "vae_b": jc.load_model(pipe / "vae_b")}
    with pytest.raises(CheckpointError, match="added_tokens.json resolves to"):
        save_checkpoint(tmp_path / "out", bundle, tokenizers={"tokenizer": pipe / "tokenizer"},
                        scheduler_config={"_class_name": "PNDMScheduler"})
    assert not (tmp_path / "out").exists()
    (pipe / "tokenizer" / "added_tokens.json").unlink()
    (pipe / "tokenizer" / "vocab-link.json").symlink_to(pipe / "tokenizer" / "vocab.json")
    for writer in (save_checkpoint, export_diffusers):
        out = tmp_path / f"ok-{writer.__name__}"
        writer(out, bundle, tokenizers={"tokenizer": pipe / "tokenizer"}, scheduler_config={"_class_name": "PNDMScheduler"})
        copied = out / "tokenizer" / "vocab-link.json"
        assert not copied.is_symlink() and copied.read_bytes() == (pipe / "tokenizer" / "vocab.json").read_bytes()


def test_hugging_face_cache_snapshot_links_into_blobs_still_load(pipeline_dir, tmp_path):
    """The HF cache layout: snapshots/REV/... are relative links into the repository's blobs/."""
    repo = tmp_path / "hub" / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    for i, f in enumerate(sorted(p for p in pipeline_dir.rglob("*") if p.is_file())):
        rel = f.relative_to(pipeline_dir)
        blob = blobs / f"{i:040x}"
        shutil.copyfile(f, blob)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    assert (snap / "vae" / WEIGHTS).is_symlink()
    bundle = jc.load_pipeline(snap)
    assert set(bundle.modules) == {"vae", "vae_b"} and bundle.tokenizer is not None
    module, _ = jc.load_model(snap / "vae")
    assert module.config.block_out_channels == (8,)
    convert(snap, tmp_path / "out", format="diffusers")
    export_diffusers(tmp_path / "out2", {"vae": jc.load_model(snap / "vae"), "vae_b": jc.load_model(snap / "vae_b")},
                     tokenizers={"tokenizer": snap / "tokenizer"})
    copied = tmp_path / "out2" / "tokenizer" / "vocab.json"
    assert not copied.is_symlink() and copied.read_bytes() == (pipeline_dir / "tokenizer" / "vocab.json").read_bytes()
    # a link out of the snapshot's own repository is still refused
    (tmp_path / "hub" / "models--other").mkdir()
    (tmp_path / "hub" / "models--other" / "x.json").write_text("{}")
    (snap / "tokenizer" / "extra.json").symlink_to(tmp_path / "hub" / "models--other" / "x.json")
    with pytest.raises(CheckpointError, match="extra.json resolves to"):
        jc.load_pipeline(snap)


def test_safe_join_rules(tmp_path):
    from jaxcontrol.convert.paths import safe_join

    assert safe_join(tmp_path, "unet", "x") == tmp_path / "unet"
    assert safe_join(tmp_path, "a/b.safetensors", "x") == tmp_path / "a" / "b.safetensors"
    for bad in ("", "..", "../x", "/etc/passwd", "a/../../x", "a\x00b", 3, None):
        with pytest.raises(CheckpointError, match="entry"):
            safe_join(tmp_path, bad, "entry")
    (tmp_path / "out-link").symlink_to(tmp_path.parent)
    with pytest.raises(CheckpointError, match="entry: .*out-link/x resolves to .*, outside"):
        safe_join(tmp_path, "out-link/x", "entry")


# --- class 9: shard indexes, FIFOs, stride-0 pickles, overlapping safetensors ------------------------


def _sharded(vae, folder: Path) -> Path:
    export_diffusers(folder, {"vae": vae})
    f = SafetensorsFile(folder / WEIGHTS)
    keys = f.keys()
    half = len(keys) // 2
    save_safetensors(folder / "a.safetensors", {k: f.load(k) for k in keys[:half]})
    save_safetensors(folder / "b.safetensors", {k: f.load(k) for k in keys[half:]})
    (folder / WEIGHTS).unlink()
    index = {"metadata": {}, "weight_map": {k: "a.safetensors" if i < half else "b.safetensors"
                                            for i, k in enumerate(keys)}}
    (folder / f"{WEIGHTS}.index.json").write_text(json.dumps(index))
    return folder / f"{WEIGHTS}.index.json"


@pytest.mark.parametrize("bad", ["../b.safetensors", "/tmp/b.safetensors", "x/../../b.safetensors"])
def test_shard_index_names_cannot_escape(vae, tmp_path, bad):
    index = _sharded(vae, tmp_path / "model")
    jc.load_model(tmp_path / "model")  # the sharded folder itself loads
    shutil.copyfile(tmp_path / "model" / "b.safetensors", tmp_path / "b.safetensors")
    _edit_json(index, lambda d: d["weight_map"].update({k: bad for k, v in d["weight_map"].items()
                                                         if v == "b.safetensors"}))
    with pytest.raises(CheckpointError, match=f"shard {bad!r}"):
        jc.load_model(tmp_path / "model")


def test_shard_index_naming_a_fifo_fails_fast(vae, tmp_path):
    index = _sharded(vae, tmp_path / "model")
    (tmp_path / "model" / "b.safetensors").unlink()
    os.mkfifo(tmp_path / "model" / "b.safetensors")
    code = f"""
        import jaxcontrol as jc
        try:
            jc.load_model({str(tmp_path / 'model')!r})
        except jc.CheckpointError as e:
            print("REFUSED", e)
    """
    # a regression would block in open() forever: the subprocess's timeout turns that into a failure
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert "REFUSED" in run.stdout, run.stderr[-2000:]
    assert "b.safetensors" in run.stdout and "not a regular file" in run.stdout
    assert index.exists()


def _expanded_bin(path: Path, shapes: dict, huge: bool = False) -> None:
    import torch

    sd = {k: torch.zeros(1).expand(*s) for k, s in shapes.items()}
    if huge:
        sd["huge"] = torch.zeros(1).expand(10**9)  # 4 GB once materialised, from 4 stored bytes
    torch.save(sd, path)


def test_stride0_pickle_is_refused_before_materialising(vae, tmp_path):
    module, params = vae
    model = tmp_path / "model"
    export_diffusers(model, {"vae": vae})
    f = SafetensorsFile(model / WEIGHTS)
    shapes = {k: f.shape(k) for k in f.keys()}
    (model / WEIGHTS).unlink()
    _expanded_bin(model / "diffusion_pytorch_model.bin", shapes)
    assert (model / "diffusion_pytorch_model.bin").stat().st_size < 64 * 1024
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.bin: tensor '.*' of shape .* overlapping"):
        jc.load_model(model)
    # a 1e9-element tensor: refused when the file is opened, in a process whose memory stays small
    _expanded_bin(tmp_path / "huge.bin", {}, huge=True)
    # the peak is VmHWM of the child's own address space: getrusage's ru_maxrss survives fork and
    # execve on Linux, so it would report the pytest worker's peak when that is larger
    code = f"""
        import jaxcontrol as jc
        from jaxcontrol.convert import open_weights
        try:
            open_weights({str(tmp_path / 'huge.bin')!r})
        except jc.CheckpointError as e:
            print("REFUSED", e)
        hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
        print("RSS_MB", int(hwm.split()[1]) / 1024)
    """
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert "REFUSED" in run.stdout and "'huge'" in run.stdout, run.stdout + run.stderr[-2000:]
    rss = float(run.stdout.split("RSS_MB")[1])
    assert rss < 3500, rss  # the expanded tensor alone would be 3815 MB


def test_pickle_tensor_layouts_that_are_fine(tmp_path):
    import torch

    base = torch.arange(24, dtype=torch.float32)
    sd = {"transposed": base.reshape(4, 6).t(), "slice": base[6:12], "scalar": torch.tensor(3.0),
          "strided": base[::2], "bf16": torch.ones(3, 2, dtype=torch.bfloat16), "empty": torch.zeros(0, 5)}
    torch.save(sd, tmp_path / "ok.bin")
    source = open_weights(tmp_path / "ok.bin")
    for k, v in sd.items():
        np.testing.assert_array_equal(np.asarray(source.load(k), np.float32), v.float().numpy())
    torch.save({"overlap": base.as_strided((4, 4), (2, 1))}, tmp_path / "overlap.bin")
    with pytest.raises(CheckpointError, match="'overlap'.*overlapping strides"):
        open_weights(tmp_path / "overlap.bin")
    # many keys viewing the same storage: bounded in total, not just per tensor
    big = torch.zeros(2**20)
    torch.save({f"view{i}": big for i in range(8)}, tmp_path / "views.bin")
    with pytest.raises(CheckpointError, match="the tensors add up to"):
        open_weights(tmp_path / "views.bin")


def _raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def test_safetensors_offsets_must_tile_the_data(tmp_path):
    data = np.arange(8, dtype=np.float32).tobytes()
    ok = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
          "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}
    _raw_safetensors(tmp_path / "ok.safetensors", ok, data)
    assert SafetensorsFile(tmp_path / "ok.safetensors").load("b").tolist() == [4, 5, 6, 7]
    overlap = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
               "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
               "c": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}
    _raw_safetensors(tmp_path / "overlap.safetensors", overlap, data)
    with pytest.raises(CheckpointError, match="overlaps tensor"):
        SafetensorsFile(tmp_path / "overlap.safetensors")
    hole = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}
    _raw_safetensors(tmp_path / "hole.safetensors", hole, data)
    with pytest.raises(CheckpointError, match="bytes 0..16 of the data section belong to no tensor"):
        SafetensorsFile(tmp_path / "hole.safetensors")
    tail = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    _raw_safetensors(tmp_path / "tail.safetensors", tail, data)
    with pytest.raises(CheckpointError, match="the tensors end at byte 8 but the data section has 32 bytes"):
        SafetensorsFile(tmp_path / "tail.safetensors")
    nested = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "x": json.loads("[" * 50 + "]" * 50)}
    _raw_safetensors(tmp_path / "bad.safetensors", nested, data[:16])
    with pytest.raises(CheckpointError, match="tensor 'x' has a malformed header entry"):
        SafetensorsFile(tmp_path / "bad.safetensors")
    deep = b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"
    (tmp_path / "deep.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep)
    with pytest.raises(CheckpointError, match="deep.safetensors: corrupted safetensors header"):
        SafetensorsFile(tmp_path / "deep.safetensors")


# --- class 10: bad config values and deeply nested JSON ------------------------------------------------

UNET = dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, cross_attention_dim=12,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            attention_head_dim=2)
CONTROLNET = {k: v for k, v in UNET.items() if k != "up_block_types"}
TEXT = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=100)
VISION = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
              patch_size=8)


@pytest.mark.parametrize("cls,base,change,field", [
    (UNet2DConditionConfig, UNET, dict(norm_num_groups=0), "norm_num_groups"),
    (UNet2DConditionConfig, UNET, dict(attention_head_dim=0), "attention_head_dim"),
    (UNet2DConditionConfig, UNET, dict(num_attention_heads=[0, 2]), "num_attention_heads"),
    (UNet2DConditionConfig, UNET, dict(block_out_channels=[-8, 16]), "block_out_channels"),
    (UNet2DConditionConfig, UNET, dict(block_out_channels=[], down_block_types=[], up_block_types=[]),
     "down_block_types"),
    (UNet2DConditionConfig, UNET, dict(layers_per_block=0), "layers_per_block"),
    (UNet2DConditionConfig, UNET, dict(norm_num_groups=[4]), "norm_num_groups"),
    (UNet2DConditionConfig, UNET, dict(cross_attention_dim={"dim": 12}), "cross_attention_dim"),
    (UNet2DConditionConfig, UNET, dict(in_channels=True), "in_channels"),
    (UNet2DConditionConfig, UNET, dict(norm_eps=0), "norm_eps"),
    (UNet2DConditionConfig, UNET, dict(norm_eps=float("nan")), "norm_eps"),
    (UNet2DConditionConfig, UNET, dict(conv_in_kernel=4), "conv_in_kernel"),
    (UNet2DConditionConfig, UNET, dict(transformer_layers_per_block=-1), "transformer_layers_per_block"),
    (ControlNetConfig, CONTROLNET, dict(conditioning_embedding_out_channels=[]), "conditioning_embedding_out_channels"),
    (ControlNetConfig, CONTROLNET, dict(conditioning_channels=0), "conditioning_channels"),
    (AutoencoderKLConfig, TINY_VAE, dict(norm_num_groups=0), "norm_num_groups"),
    (AutoencoderKLConfig, TINY_VAE, dict(latent_channels=-4), "latent_channels"),
    (AutoencoderKLConfig, TINY_VAE, dict(block_out_channels=[], down_block_types=[], up_block_types=[]),
     "down_block_types"),
    (AutoencoderKLConfig, TINY_VAE, dict(scaling_factor=0), "scaling_factor"),
    (AutoencoderKLConfig, TINY_VAE, dict(latents_mean=[0.0] * 3), "latents_mean"),
    (CLIPTextConfig, TEXT, dict(hidden_size=-32), "hidden_size"),
    (CLIPTextConfig, TEXT, dict(num_hidden_layers="2"), "num_hidden_layers"),
    (CLIPTextConfig, TEXT, dict(layer_norm_eps=0.0), "layer_norm_eps"),
    (CLIPTextConfig, TEXT, dict(text_config=[1, 2]), "text_config"),
    (CLIPVisionConfig, VISION, dict(num_channels=0), "num_channels"),
    (T2IAdapterConfig, dict(channels=[8, 16]), dict(channels="abc"), "channels"),
    (T2IAdapterConfig, dict(channels=[8, 16]), dict(channels=[8, 16.5]), "channels"),
    (T2IAdapterConfig, dict(channels=[8, 16]), dict(downscale_factor=[8]), "downscale_factor"),
])
def test_bad_config_values_are_config_errors_naming_the_field(cls, base, change, field):
    with pytest.raises(ConfigError, match=rf"config.json: .*{field}"):
        cls.from_dict({**base, **change}, source="config.json")


def test_config_that_is_not_an_object(tmp_path):
    with pytest.raises(ConfigError, match="must be a JSON object, found a list"):
        UNet2DConditionConfig.from_dict([1, 2], source="config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"config.json: invalid config.json: expected a JSON object"):
        jc.load_model(tmp_path)


DEEP = "[" * 200000 + "]" * 200000


def test_deeply_nested_json_is_a_named_error(vae, pipeline_dir, tmp_path):
    model = _copy(pipeline_dir / "vae", tmp_path / "model")
    (model / "config.json").write_text(DEEP)
    with pytest.raises(ConfigError, match=r"model/config.json: invalid config.json: nested too deeply"):
        jc.load_model(model)
    pipe = _copy(pipeline_dir, tmp_path / "pipe")
    (pipe / "model_index.json").write_text(DEEP)
    with pytest.raises(ConfigError, match=r"model_index.json: .*nested too deeply"):
        jc.load_pipeline(pipe)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, {"vae": vae})
    (ckpt / "jaxcontrol.json").write_text(DEEP)
    with pytest.raises(CheckpointError, match=r"jaxcontrol.json: invalid jaxcontrol manifest: nested too deeply"):
        jc.load_pipeline(ckpt)
    index = _sharded(vae, tmp_path / "sharded")
    index.write_text(DEEP)
    with pytest.raises(CheckpointError, match=r"index.json: invalid shard index: nested too deeply"):
        jc.load_model(tmp_path / "sharded")


# --- classes 11 and 12: the command line, killed conversions, replacement -----------------------------


def _cli(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "convert_weights.py"), *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_cli_errors_are_one_line_with_documented_exit_codes(pipeline_dir, tmp_path):
    # a place nobody can write (even root cannot create folders in /proc)
    run = _cli(["--from", str(pipeline_dir / "vae"), "--to", "/proc/jaxcontrol-out", "--no-progress"])
    assert run.returncode == 1, run.stderr
    assert run.stderr.strip().count("\n") == 0 and "Traceback" not in run.stderr
    assert run.stderr.startswith("convert_weights.py: error: /proc") and "writ" in run.stderr
    if os.geteuid() != 0:  # a read-only folder (root ignores the mode)
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        run = _cli(["--from", str(pipeline_dir / "vae"), "--to", str(ro / "out"), "--no-progress"])
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    run = _cli(["--from", str(pipeline_dir / "vae"), "--to", str(tmp_path / "o"), "--set", "vae.norm_num_groups"])
    assert run.returncode == 2 and run.stderr.strip() == (
        "convert_weights.py: error: --set expects COMPONENT.FIELD=VALUE, got 'vae.norm_num_groups'"), run.stderr
    run = _cli(["--from", str(pipeline_dir / "vae"), "--to", str(tmp_path / "o"), "--set", "vae.norm_num_groups=0",
                "--no-progress"])
    assert run.returncode == 1 and "Traceback" not in run.stderr and "norm_num_groups=0" in run.stderr, run.stderr
    assert not (tmp_path / "o").exists()
    run = _cli(["--help"])
    assert run.returncode == 0 and "130" in run.stdout


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _temp(dest: Path, kind: str, pid: int, host: str | None = None) -> Path:
    path = dest.parent / f".{dest.name}.{kind}-{host or jax_format._host_tag()}.{pid}.0123abcd"
    path.mkdir()
    (path / "partial").write_text("half-written")
    return path


def test_stale_temporaries_of_dead_writers_are_cleaned(vae, tmp_path):
    dest = tmp_path / "out"
    dead = _temp(dest, "tmp", _dead_pid())
    alive = _temp(dest, "tmp", os.getppid())  # a running writer: left alone
    foreign = _temp(dest, "tmp", _dead_pid(), host="ffffffff")  # another host's: cannot tell, left alone
    other = _temp(tmp_path / "other", "tmp", _dead_pid())  # another destination's: not ours to judge
    legacy = tmp_path / ".out.tmp-k2j3h4l5"  # no pid in the name: not provably stale
    legacy.mkdir()
    save_checkpoint(dest, {"vae": vae})
    assert not dead.exists()
    assert alive.exists() and foreign.exists() and other.exists() and legacy.exists()


KILL_SCRIPT = """
import os, sys
from pathlib import Path
from jaxcontrol import atomic
from jaxcontrol.convert import jax_format

dest, mode = Path(sys.argv[1]), sys.argv[2]
real_rename = os.rename
renames = []

def rename(src, dst):
    renames.append((src, dst))
    if mode == "between" and len(renames) == 2:
        os._exit(9)  # killed between the two renames of a replacement
    if mode == "after-exchange" and len(renames) == 1:
        os._exit(9)  # killed right after the exchange
    return real_rename(src, dst)

os.rename = rename
if mode == "between":
    atomic._renameat2 = lambda src, dst, flags: False  # a system without renameat2
with jax_format.atomic_directory(dest, overwrite=True) as tmp:
    (tmp / "version").write_text("new")
    if mode == "inside":
        os._exit(9)  # killed while writing
print("finished", renames)
"""


def _killed(dest: Path, mode: str) -> None:
    run = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(dest), mode], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert run.returncode == 9, run.stdout + run.stderr[-2000:]


def test_killed_replacements_leave_old_or_new_output(tmp_path):
    dest = tmp_path / "out"
    with jax_format.atomic_directory(dest) as tmp:
        (tmp / "version").write_text("old")

    _killed(dest, "inside")  # a kill while writing: the old output stays; the temporary goes on the next run
    assert (dest / "version").read_text() == "old" and len(_listing(tmp_path)) == 2
    jax_format.recover_destination(dest)
    assert _listing(tmp_path) == ["out"]

    if jax_format._libc_renameat2() is not None:  # Linux: one exchange, nothing between
        _killed(dest, "after-exchange")
        assert (dest / "version").read_text() == "new"
        jax_format.recover_destination(dest)
        assert _listing(tmp_path) == ["out"]
        (dest / "version").write_text("old")

    _killed(dest, "between")  # without renameat2: the old output is aside, --to is missing ...
    assert not dest.exists() and any(".out.old-" in n for n in _listing(tmp_path))
    with pytest.raises(ConfigError, match="no config.json"):  # ... until the next load puts it back
        jc.load_model(dest)
    assert (dest / "version").read_text() == "old" and _listing(tmp_path) == ["out"]


def test_replacement_never_moves_the_destination_away(tmp_path, monkeypatch):
    dest = tmp_path / "out"
    with jax_format.atomic_directory(dest) as tmp:
        (tmp / "version").write_text("old")
    renames = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda s, d: (renames.append((Path(s), Path(d))), real_rename(s, d))[1])
    if jax_format._libc_renameat2() is not None:
        with jax_format.atomic_directory(dest, overwrite=True) as tmp:
            (tmp / "version").write_text("new")
        assert (dest / "version").read_text() == "new"
        assert all(src != dest for src, _ in renames), renames  # exchanged in place, never renamed aside
    # the fallback's second rename failing: the old output is put back
    monkeypatch.setattr(atomic, "_renameat2", lambda src, dst, flags: False)
    calls = []

    def failing(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    before = (dest / "version").read_text()
    with pytest.raises(OSError, match="No space"):
        with jax_format.atomic_directory(dest, overwrite=True) as tmp:
            (tmp / "version").write_text("newer")
    assert (dest / "version").read_text() == before and _listing(tmp_path) == ["out"]


def test_an_output_appearing_meanwhile_is_not_replaced_without_overwrite(tmp_path):
    from jaxcontrol.convert.jax_format import atomic_directory

    dest = tmp_path / "out"
    with pytest.raises(CheckpointError, match="appeared while the output was being written"):
        with atomic_directory(dest) as tmp:
            (tmp / "mine.txt").write_text("second")
            dest.mkdir()  # another writer finished first
            (dest / "theirs.txt").write_text("first")
    assert sorted(p.name for p in dest.iterdir()) == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
