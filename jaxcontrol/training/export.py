"""Export what a run trained, as diffusers folders and in jaxcontrol's own (Orbax) format.

    paths = export_trained(nets, params, frozen, out_dir, formats=("diffusers", "jaxcontrol"))

| task | written |
| --- | --- |
| controlnet | `<format>/controlnet` (a ControlNetModel folder); with `unlock_unet` also `<format>/unet` |
| adapter | `<format>/adapter` (a T2IAdapter folder) |
| unet | `<format>/pipeline` (a StableDiffusionPipeline folder: U-Net, VAE, text encoder, tokenizer, scheduler) |
| instruct_pix2pix | `<format>/pipeline`, the same as a StableDiffusionInstructPix2PixPipeline (8-channel U-Net) |
| vae | `<format>/vae` (an AutoencoderKL folder, `scaling_factor` from `config.vae`) |
| dreambooth | `<format>/pipeline` (its text encoder trained with `dreambooth.train_text_encoder`); with `use_lora` as lora |
| lora | `lora/pytorch_lora_weights.safetensors`: diffusers' layout, which `pipe.load_lora_weights` and `Pipeline(loras=...)` read |
| textual_inversion | `textual_inversion/learned_embeds.safetensors`: {word: (num_vectors, dim)}, diffusers' layout |

A LoRA run that trained a new word with its factors (pivotal tuning) writes both files; diffusers
loads them with `load_lora_weights` and `load_textual_inversion`, jaxcontrol with `loras=` and
`Pipeline.load_textual_inversion` (or infer.py's `--lora` and `--embedding`).

A diffusers folder loads with diffusers' `from_pretrained` and with `jaxcontrol.load_model` /
`load_pipeline`; a jaxcontrol folder with `load_model` / `load_pipeline`. A U-Net pipeline export
can be the `model.pretrained_path` of a later ControlNet or adapter run. Each folder is written
atomically (`overwrite` replaces an earlier export).

In a multi-host run only process 0 writes. Orbax (behind the jaxcontrol format) synchronises all
processes on every save, so there the jaxcontrol folders are converted from the diffusers ones in
a single-process child (CPU only, so it never competes for the accelerators).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ..convert import export_diffusers, save_checkpoint
from .networks import Networks, lora_layers, text_encoder_params, unet_params

FORMATS = ("diffusers", "jaxcontrol")
# tasks whose export is a whole pipeline, and its diffusers class
PIPELINE_TASKS = {"unet": "StableDiffusionPipeline", "instruct_pix2pix": "StableDiffusionInstructPix2PixPipeline",
                  "dreambooth": "StableDiffusionPipeline"}


def _components(nets: Networks, params: dict, frozen: dict) -> tuple[dict[str, tuple], bool]:
    """({name: (module, params)}, is_pipeline)."""
    if nets.task in PIPELINE_TASKS:
        return {
            "unet": (nets.unet, unet_params(params, frozen)),
            "vae": (nets.vae, frozen["vae"]),
            "text_encoder": (nets.text_encoder, text_encoder_params(params, frozen)),
        }, True
    out: dict[str, tuple] = {}
    if nets.task == "vae":
        return {"vae": (nets.vae, params["vae"])}, False
    if nets.controlnet is not None:
        out["controlnet"] = (nets.controlnet, params["controlnet"])
    if nets.adapter is not None:
        out["adapter"] = (nets.adapter, params["adapter"])
    if "unet" in params:  # unlocked decoder: the whole fine-tuned U-Net
        out["unet"] = (nets.unet, unet_params(params, frozen))
    return out, False


def export_trained(nets: Networks, params: dict, frozen: dict, out_dir: str | os.PathLike, *,
                   formats: tuple[str, ...] = FORMATS, dtype: str | None = "float32",
                   overwrite: bool = True) -> dict[str, Path]:
    """Write the trained components; returns {"<format>/<name>": path}. Params may be device arrays.
    Raises `CheckpointError` as `export_diffusers` / `save_checkpoint` do (e.g. an existing folder
    without `overwrite`)."""
    out_dir = Path(out_dir)
    if "lora" in params or "token_embeddings" in params:  # small files in diffusers' own layouts
        return export_personalization(nets, params, frozen, out_dir)
    if jax.process_count() > 1 and "jaxcontrol" in formats:
        return _export_multihost(nets, params, frozen, out_dir, formats=formats, dtype=dtype, overwrite=overwrite)
    comps, pipeline = _components(nets, params, frozen)
    comps = {k: (m, jax.tree_util.tree_map(np.asarray, p)) for k, (m, p) in comps.items()}
    written: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizers, scheduler = None, None
        if pipeline:
            tok_dir = Path(tmp) / "tokenizer"
            nets.tokenizer.save_pretrained(str(tok_dir))
            tokenizers = {"tokenizer": tok_dir}
            scheduler = dict(nets.scheduler_config)
        for fmt in formats:
            (out_dir / fmt).mkdir(parents=True, exist_ok=True)
            if pipeline:
                dest = out_dir / fmt / "pipeline"
                kw: dict[str, Any] = dict(dtype=dtype, pipeline_class=PIPELINE_TASKS[nets.task], tokenizers=tokenizers,
                                          scheduler_config=scheduler, overwrite=overwrite)
                if fmt == "diffusers":
                    export_diffusers(dest, comps, **kw)
                else:
                    save_checkpoint(dest, comps, prediction_type=nets.prediction_type, **kw)
                written[f"{fmt}/pipeline"] = dest
                continue
            for name, comp in comps.items():
                dest = out_dir / fmt / name
                if fmt == "diffusers":
                    export_diffusers(dest, {name: comp}, dtype=dtype, overwrite=overwrite)
                else:
                    save_checkpoint(dest, {name: comp}, dtype=dtype, overwrite=overwrite)
                written[f"{fmt}/{name}"] = dest
    return written


def export_personalization(nets: Networks, params: dict, frozen: dict, out_dir: Path) -> dict[str, Path]:
    """A trained LoRA as `lora/pytorch_lora_weights.safetensors` (diffusers' layout with its adapter
    metadata), and a trained word as `textual_inversion/learned_embeds.safetensors`."""
    from ..convert.embedding_file import save_embedding
    from ..convert.lora_file import save_lora
    from ..models.lora import Lora

    host = jax.tree_util.tree_map(np.asarray, {"params": params, "frozen": {
        k: frozen[k] for k in ("lora_multipliers",) if k in frozen}})
    written: dict[str, Path] = {}
    if "lora" in params:
        weights = {comp: lora_layers(host["params"], host["frozen"], comp) for comp in host["params"]["lora"]}
        folder = out_dir / "lora"
        folder.mkdir(parents=True, exist_ok=True)
        written["lora"] = save_lora(Lora("lora", weights), folder / "pytorch_lora_weights.safetensors")
    if "token_embeddings" in params:
        word, _ = nets.placeholder
        folder = out_dir / "textual_inversion"
        folder.mkdir(parents=True, exist_ok=True)
        written["textual_inversion"] = save_embedding(folder / "learned_embeds.safetensors", word,
                                                      host["params"]["token_embeddings"])
    return written


_CONVERT = """
import sys
from pathlib import Path
import jaxcontrol
src, dest, pipeline, dtype = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] != "0", sys.argv[4]
if pipeline:
    b = jaxcontrol.load_pipeline(src)
    comps = {k: (b.modules[k], b.params[k]) for k in ("unet", "vae", "text_encoder")}
    jaxcontrol.save_checkpoint(dest, comps, dtype=dtype, pipeline_class=sys.argv[3],
                               tokenizers={"tokenizer": src / "tokenizer"}, scheduler_config=b.scheduler_config,
                               prediction_type=b.scheduler_config.get("prediction_type"), overwrite=True)
else:
    module, params = jaxcontrol.load_model(src)
    jaxcontrol.save_checkpoint(dest, {sys.argv[5]: (module, params)}, dtype=dtype, overwrite=True)
"""


def _export_multihost(nets, params, frozen, out_dir: Path, *, formats, dtype, overwrite) -> dict[str, Path]:
    written = export_trained(nets, params, frozen, out_dir, formats=("diffusers",), dtype=dtype, overwrite=overwrite)
    comps, pipeline = _components(nets, params, frozen)
    names = ["pipeline"] if pipeline else list(comps)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for name in names:
        src, dest = out_dir / "diffusers" / name, out_dir / "jaxcontrol" / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", _CONVERT, str(src), str(dest), PIPELINE_TASKS[nets.task] if pipeline else "0",
                        dtype or "float32", name], check=True, env=env)
        written[f"jaxcontrol/{name}"] = dest
    if "diffusers" not in formats:
        import shutil

        for name in names:
            shutil.rmtree(out_dir / "diffusers" / name, ignore_errors=True)
            written.pop(f"diffusers/{name}", None)
    return written

