"""DreamBooth's data (Ruiz et al. 2022, as diffusers' `train_dreambooth.py` arranges it): the
instance images under one instance prompt, and for prior preservation class images that the base
model itself generates before training, cached on disk, paired with the instance images.

    manifest = class_images(config, workdir)                    # generated once, reused after
    source = PairedSource(instance_source, class_source)        # record i: instance i % n, class i % m

Record i of a `PairedSource` holds instance example `i % len(instance)` and class example
`i % len(class)` (as "class_image" / "class_text"), and has `max(len(instance), len(class))`
records, which is diffusers' `DreamBoothDataset`. Its batches put the class rows after the instance
rows in the step, where the loss is mean(instance) + prior_loss_weight x mean(class).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..atomic import atomic_file, write_json, write_text
from ..errors import ConfigError

BLOCK = 8  # class images are generated in blocks of this many, each from its own seed


def class_prompts(config) -> list[str]:
    """The class prompt(s): `dreambooth.class_prompt`, one per non-blank line."""
    return [line.strip() for line in str(config.dreambooth.class_prompt).splitlines() if line.strip()]


def class_data_dir(config, workdir) -> Path:
    return Path(config.dreambooth.class_data_dir or Path(workdir) / "class_images")


def _settings(config) -> dict:
    db = config.dreambooth
    return {"model": os.path.abspath(str(config.model.pretrained_path)), "prompts": class_prompts(config),
            "resolution": int(config.data.resolution), "num_inference_steps": int(db.class_num_inference_steps),
            "guidance_scale": float(db.class_guidance_scale), "seed": int(config.seed)}


def class_images(config, workdir, *, progress=print) -> Path:
    """Generate the missing class images of a prior-preservation run (process 0; the others wait)
    and return their manifest. Image i shows class prompt i mod P; images come in blocks of 8 with
    seed (seed, block), so a cached image equals a regenerated one. A folder written for other
    settings (model, prompts, size, steps, guidance, seed) is a `ConfigError` naming the difference,
    and a non-empty folder that jaxcontrol did not write is never touched."""
    import jax

    folder = class_data_dir(config, workdir)
    n = int(config.dreambooth.num_class_images)
    settings = _settings(config)
    record = folder / "class_images.json"
    manifest = folder / f"manifest_{n}.jsonl"
    if jax.process_index() == 0:
        if folder.exists() and any(folder.iterdir()) and not record.is_file():
            raise ConfigError(f"config.dreambooth.class_data_dir={str(folder)!r} holds files that jaxcontrol did not "
                              "write (no class_images.json); give an empty or new folder")
        if record.is_file():
            old = json.loads(record.read_text())
            diff = sorted(k for k in settings if old.get(k) != settings[k])
            if diff:
                raise ConfigError(f"{folder}: its class images were generated with other {diff} "
                                  f"({ {k: old.get(k) for k in diff} } vs { {k: settings[k] for k in diff} }); "
                                  "use another config.dreambooth.class_data_dir")
        folder.mkdir(parents=True, exist_ok=True)
        write_json(record, settings, indent=1)
        names = [f"class_{i:05d}.png" for i in range(n)]
        missing = sorted({i // BLOCK for i in range(n) if not (folder / names[i]).is_file()})
        if missing:
            _generate(config, folder, names, missing, settings, progress)
        lines = [json.dumps({"image": names[i], "text": settings["prompts"][i % len(settings["prompts"])]})
                 for i in range(n)]
        write_text(manifest, "\n".join(lines) + "\n")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxcontrol_class_images")
    return manifest


def _generate(config, folder: Path, names: list[str], blocks: Sequence[int], settings: dict, progress) -> None:
    import time

    from PIL import Image

    import jax

    from ..pipeline import Pipeline, default_mesh

    t0 = time.perf_counter()
    # this process's devices only: the other processes wait at a barrier, not in the program
    pipe = Pipeline.from_pretrained(config.model.pretrained_path, mesh=default_mesh(jax.local_devices()))
    prompts, n, res = settings["prompts"], len(names), settings["resolution"]
    done = 0
    for block in blocks:
        idx = list(range(block * BLOCK, min(n, (block + 1) * BLOCK)))
        images = pipe([prompts[i % len(prompts)] for i in idx], height=res, width=res,
                      num_inference_steps=settings["num_inference_steps"], guidance_scale=settings["guidance_scale"],
                      seed=settings["seed"] * 1_000_003 + block)
        for i, image in zip(idx, images):
            with atomic_file(folder / names[i]) as f:
                Image.fromarray(np.asarray(image)).save(f, format="PNG")
        done += len(idx)
        if progress:
            progress(f"class images: {done} generated ({time.perf_counter() - t0:.0f} s)")
    del pipe


class PairedSource:
    """Random access to (instance, class) pairs: see the module docstring. Both sources give the
    records of a folder dataset ("image", "text", ...)."""

    def __init__(self, instance: Sequence, classes: Sequence):
        if len(instance) == 0 or len(classes) == 0:
            raise ConfigError(f"DreamBooth needs instance and class images; got {len(instance)} and {len(classes)}")
        self.instance, self.classes = instance, classes

    def __len__(self) -> int:
        return max(len(self.instance), len(self.classes))

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        record = dict(self.instance[i % len(self.instance)])
        other = self.classes[i % len(self.classes)]
        record["class_image"], record["class_text"] = other["image"], other["text"]
        return record


class CaptionedSource:
    """A source whose records all carry `caption` as their "text" (DreamBooth's instance prompt)."""

    def __init__(self, source: Sequence, caption: str):
        self.source, self.caption = source, caption

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        return {**self.source[i], "text": self.caption}
