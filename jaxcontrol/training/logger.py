"""Where metrics and images go: the console (with a progress bar), TensorBoard and `metrics.jsonl`.

Only process 0 writes. `metrics.jsonl` gets one JSON line per optimizer step (`step`, `loss`,
`grad_norm`, `learning_rate`), flushed as written; a resumed run appends the steps it (re)computes,
so a line for a step may appear twice, with the same values when the resume is exact. TensorBoard
event files (tensorboardX, no TensorFlow needed) go to WORKDIR/tensorboard; validation images
also to WORKDIR/samples/step_NNNNNNN.png.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..images import make_grid, save_png


def image_grid(rows: list[np.ndarray]) -> np.ndarray:
    """Stack rows of images, each (N, H, W, 3) uint8 with the same N, H, W, into one (rows*H, N*W, 3)
    image: `images.make_grid` without padding, one row per entry."""
    return make_grid([img for row in rows for img in row], columns=len(rows[0]), pad=0)


def to_uint8(images: np.ndarray, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """Images with values in [low, high] (default [-1, 1]) as uint8 0..255 (rounded, clipped), same shape."""
    x = (np.asarray(images, np.float32) - low) / (high - low)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


class MetricsWriter:
    """The trainer's outputs (see the module docstring) under `workdir`; with `enabled=False` (processes
    other than 0) every method does nothing, but `summary` still returns the rates."""

    def __init__(self, workdir: str | os.PathLike, *, total_steps: int, initial_step: int, batch_size: int,
                 tensorboard: bool = True, progress_bar: bool = True, enabled: bool = True):
        self.workdir = Path(workdir)
        self.enabled = enabled
        self.batch_size = batch_size
        self.total = total_steps
        self._tb = None
        self._bar = None
        self._jsonl = None
        self._last_time = time.perf_counter()
        self._last_step = initial_step
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def reset_clock(self, step: int) -> None:
        """Start timing samples/s from here (after compilation, say)."""
        self._last_time = time.perf_counter()
        self._last_step = step

    def steps(self, records: list[tuple[int, Mapping[str, float]]]) -> None:
        """Per-step records (step, {name: value}) into metrics.jsonl and the progress bar."""
        if not self.enabled or not records:
            return
        for step, values in records:
            self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in values.items()}}) + "\n")
        self._jsonl.flush()
        if self._bar is not None:
            last = records[-1]
            self._bar.n = int(last[0])
            self._bar.set_postfix(loss=f"{float(last[1]['loss']):.4f}", refresh=False)
            self._bar.refresh()

    def summary(self, step: int, values: Mapping[str, float]) -> dict:
        """Averages over the last interval, with samples/s, to the console and TensorBoard."""
        now = time.perf_counter()
        done = step - self._last_step
        out = dict(values)
        if done > 0 and now > self._last_time:
            out["samples_per_sec"] = done * self.batch_size / (now - self._last_time)
            out["steps_per_sec"] = done / (now - self._last_time)
        self._last_time, self._last_step = now, step
        if not self.enabled:
            return out
        text = " ".join(f"{k}={v:.4g}" for k, v in out.items())
        self.console(f"step {step}/{self.total}: {text}")
        if self._tb is not None:
            for k, v in out.items():
                self._tb.add_scalar(f"train/{k}", float(v), step)
            self._tb.flush()
        return out

    def image(self, step: int, name: str, image: np.ndarray) -> Path | None:
        """Write an (H, W, 3) uint8 image to WORKDIR/samples/{name}_step_NNNNNNN.png and TensorBoard;
        returns its path (None when disabled)."""
        if not self.enabled:
            return None
        path = save_png(image, self.workdir / "samples" / f"{name}_step_{step:07d}.png")
        if self._tb is not None:
            self._tb.add_image(name, image, step, dataformats="HWC")
            self._tb.flush()
        self.console(f"step {step}: validation images -> {path}")
        return path

    def console(self, text: str) -> None:
        """Print a line (above the progress bar, when there is one)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        """Close the progress bar, TensorBoard writer and metrics.jsonl."""
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (a torn last line, from a killed run, is skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
