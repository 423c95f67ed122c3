"""The device benchmark: bf16 throughput and MFU of the U-Net forward, the SD-1.5 + ControlNet
pipeline and the ControlNet training step, once per attention path.

    python benchmarks/device_bench.py                          # full size, every attention path valid here
    python benchmarks/device_bench.py --attention auto cudnn --json bench.json
    python benchmarks/device_bench.py --tiny                   # tiny models, seconds on a CPU (the suite's run)
    benchmarks/device_run.sh OUT_DIR                           # on a lent GPU or TPU host, under a timeout

Every network has random weights (no hub): built from its config and drawn by
`models.params.init_params`. What runs:

| section       | full size                                                     | `--tiny`                         |
| ------------- | ------------------------------------------------------------- | -------------------------------- |
| U-Net forward | SD-1.5 U-Net (859.5M), batch 8, 64x64 latents, 77x768 context | two-block U-Net, batch 2, 8x8    |
| pipeline      | SD-1.5 + ControlNet + CLIP-L + VAE: 8 images of 512x512, 20 DDIM steps, CFG 7.5 (16 rows per U-Net call), `Pipeline.__call__` as a user calls it (host work included) | tiny models, 1 image of 64x64, 2 steps |
| train step    | ControlNet (361M, float32 master weights, AdamW, clipping) on the frozen U-Net, batch 8 at 512x512 (64x64 latents; precomputed latents and text embeddings, as `benchmarks/train_step.py`) | tiny, batch 2 at 64x64 |

Compute is `--dtype` (bfloat16 by default); inference weights and the frozen U-Net are held in
`--param-dtype` (bfloat16 by default); the VAE runs in `--vae-dtype` (float32, `Pipeline`'s
default). The attention path is the `attention_impl` of the U-Net and the ControlNet (94% of the
pipeline's FLOPs, all of the others'); the text encoder and the VAE keep "auto" (cuDNN refuses the
float32 VAE's 512-wide head). Default paths: every one that runs on the platform (`DEFAULT_PATHS`); `--attention` picks.

Columns:

* **compile s**: lowering plus XLA compilation, once per configuration (the pipeline's call
  reuses the program compiled from `Pipeline.lower`); the first (warm-up) call is separate, in
  the JSON as `first_call_s`, and not in the median. Rows whose lowered program equals an
  earlier row's ("auto" where it picks cuDNN for every layer, or "plain" for short sequences on
  the CPU) reuse that row's measurement and say so.
* **s/call**: median of `--repeats` steady calls, each ended by `block_until_ready` (the pipeline
  returns host arrays, so its calls end there).
* **TFLOP**: the call's model FLOPs, from XLA's cost analysis (`Lowered.cost_analysis()["flops"]`)
  of a reference lowering of the same computation with attention "plain". XLA counts a
  multiply-add as 2 FLOPs (a 256x256 by 256x256 dot counts 2 * 256^3) and each elementwise op as
  1, but it counts nothing inside a custom call (cuDNN's fused attention, the Pallas kernels), and
  a while loop's body (`lax.scan`, `lax.map`: the sampler, the "chunked" kernel) once whatever its
  trip count. "plain" attention is two einsums (4 * B * heads * Lq * Lk * D FLOPs forward, and
  their transposes backward, all visible to XLA) and no loops, so every path is charged the same
  model FLOPs. The pipeline's sampling loop is one `lax.scan`: its FLOPs are the program's count
  plus (evaluations - 1) x one guided evaluation (U-Net + ControlNet on the CFG batch); the
  reference programs are checked to hold exactly the loops this assumes. For cuDNN and Pallas
  attention this charges the analytic 4 * B * heads * Lq * Lk * D per attention forward, and the
  plain einsums' transposes (twice that) backward, not the kernels' own recomputation.

  Model FLOPs at full size, as jax 0.10.2 counts them on the CPU (dots and convolutions count
  the same on every backend; elementwise ops may differ slightly):
  U-Net forward at batch 8, 6.32 TFLOP (0.79 per image, 1.01 of it attention scores and outputs);
  one guided evaluation (U-Net + ControlNet, 16 rows), 17.13; the pipeline's 8 images, 362.9
  (20 evaluations, 20.0 for the float32 VAE decode, the rest the text encoder); the training
  step at batch 8, 17.84.
* **XLA saw**: the compiled program's own `cost_analysis()` FLOPs over the model FLOPs: below
  100% where attention runs in a custom call or a loop (not reported for the pipeline, whose
  sampling loop alone would put it far below).
* **MFU** = TFLOP / (s/call) / peak, peak bf16 dense FLOP/s from `PEAK_TFLOPS` by
  `jax.devices()[0].device_kind` or `--peak-tflops`; "n/a" on the CPU unless given.
* **mem GiB**: XLA's buffer assignment of the compiled program (`memory_analysis()`: arguments +
  outputs + temporaries - donated aliases), the device memory the call needs; the device's
  measured `memory_stats()["peak_bytes_in_use"]` of the whole process (all rows, so the largest
  of them) is printed under the table and each row's running value is in the JSON (n/a on the CPU).

The full default run must end within 8 minutes on one H200: `--budget-s` (default 420 s) skips,
and marks, a configuration that would end past it if it took as long as its section's longest
configuration so far. Configurations run "auto" first for all three sections, then each other path.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Dense bf16 peak FLOP/s (TFLOP/s) by device kind, from the vendors' datasheets: the first entry
# whose key is in `device_kind.lower()` wins, so more specific keys come first.
PEAK_TFLOPS = (
    ("h100 pcie", 756.0),
    ("h100", 989.0),  # SXM
    ("h200", 989.0),  # SXM
    ("a100", 312.0),
    ("tpu v4", 275.0),
    ("tpu v5 lite", 197.0),  # v5e
    ("tpu v5e", 197.0),
    ("tpu v5p", 459.0),
    ("tpu v5", 459.0),  # v5p reports "TPU v5"
    ("tpu v6 lite", 918.0),  # v6e (Trillium)
    ("tpu v6e", 918.0),
)
# every attention path that runs on each platform, "auto" first
DEFAULT_PATHS = {
    "gpu": ("auto", "cudnn", "dot_product", "chunked", "plain"),
    "tpu": ("auto", "tpu_flash", "dot_product", "plain"),
    "cpu": ("auto", "plain", "chunked", "dot_product"),
}
SECTIONS = ("unet", "pipeline", "train")
TARGET_MFU = {"unet": 0.50, "pipeline": 0.40, "train": 0.35}  # issue 16's targets on a GPU, bf16


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Batch sizes, image / latent sides, steps and repeats of one run."""

    unet_batch: int
    unet_latent: int
    pipe_batch: int
    pipe_size: int
    pipe_steps: int
    train_batch: int
    train_size: int
    repeats: tuple[int, int, int]  # steady calls timed per section (unet, pipeline, train)


FULL = Sizes(unet_batch=8, unet_latent=64, pipe_batch=8, pipe_size=512, pipe_steps=20, train_batch=8,
             train_size=512, repeats=(10, 3, 5))
TINY = Sizes(unet_batch=2, unet_latent=8, pipe_batch=1, pipe_size=64, pipe_steps=2, train_batch=2,
             train_size=64, repeats=(2, 2, 2))


@dataclasses.dataclass
class Row:
    """One configuration's measurement (times in seconds, FLOPs per call, bytes)."""

    section: str
    attention: str
    what: str
    batch: int
    unit: str  # "images/s" or "samples/s"
    compile_s: float | None = None
    first_call_s: float | None = None
    times_s: list = dataclasses.field(default_factory=list)
    step_s: float | None = None
    throughput: float | None = None
    flops: float | None = None  # model FLOPs per call
    xla_flops: float | None = None  # what the compiled program's cost analysis saw
    tflops_per_s: float | None = None
    mfu: float | None = None
    mem_bytes: int | None = None  # XLA's buffer assignment of the compiled program
    device_peak_bytes: int | None = None  # memory_stats() peak of the process after this row
    note: str = ""


# ------------------------------------------------------------------------------------------------
# pure helpers
# ------------------------------------------------------------------------------------------------


def peak_tflops(device_kind: str, platform: str, override: float | None = None) -> float | None:
    """The dense bf16 peak in TFLOP/s: `override` if given, else `PEAK_TFLOPS`' entry for
    `device_kind` (e.g. "NVIDIA H200", "TPU v5 lite"); None on the CPU or an unknown kind."""
    if override is not None:
        return float(override)
    if platform == "cpu":
        return None
    kind = device_kind.lower()
    for key, value in PEAK_TFLOPS:
        if key in kind:
            return value
    return None


def mfu(flops: float | None, seconds: float | None, peak: float | None) -> float | None:
    """Achieved FLOP/s over peak: `flops` per call / `seconds` per call / (`peak` TFLOP/s * 1e12);
    None when any of them is unknown."""
    if not flops or not seconds or not peak:
        return None
    return flops / seconds / (peak * 1e12)


def attention_paths(platform: str, requested=None) -> tuple[str, ...]:
    """The attention paths to run on `platform` ("cpu", "gpu", "tpu"): `requested` (checked) or
    `DEFAULT_PATHS[platform]`. Raises `ValueError` for a name not in `ATTENTION_IMPLS` or a
    platform-only kernel ("cudnn", "tpu_flash") off its platform."""
    from jaxcontrol.models.attention import _PLATFORM_ONLY, check_attention_impl

    if not requested:
        return DEFAULT_PATHS.get(platform, ("auto", "plain"))
    for impl in requested:
        check_attention_impl(impl)
        if impl in _PLATFORM_ONLY and _PLATFORM_ONLY[impl] != platform:
            raise ValueError(f"attention path {impl!r} runs on {_PLATFORM_ONLY[impl]} only; this is {platform}")
    return tuple(dict.fromkeys(requested))


def run_order(paths: tuple[str, ...], sections: tuple[str, ...]) -> list[tuple[str, str]]:
    """(section, path) pairs: the first path for every section, then the next path, and so on, so
    a run cut short by its time budget has the first path (normally "auto") everywhere."""
    return [(s, p) for p in paths for s in sections]


def cost(stage) -> dict:
    """The cost-analysis dict of a `jax.stages.Lowered` or `Compiled` (JAX returned a one-element
    list of dicts in older versions)."""
    out = stage.cost_analysis()
    if isinstance(out, (list, tuple)):
        out = out[0] if out else {}
    return dict(out or {})


def count_loops(lowered) -> int:
    """The number of while loops (`stablehlo.while`) in a lowered program's text, leaving out those
    of the threefry random-bit generator (a loop of rounds on some backends, no FLOPs to speak of)."""
    loops = 0
    for func in lowered.as_text().split("func.func")[1:]:
        name = func.split("(", 1)[0]
        if "threefry" not in name:
            loops += func.count("stablehlo.while")
    return loops


def reference_flops(lowered, loops: int = 0) -> float:
    """Model FLOPs of a reference lowering (attention "plain"): its cost analysis' "flops". Raises
    `RuntimeError` when the program holds another number of while loops than `loops` (the count
    would then miss iterations) or the analysis has no FLOPs."""
    found = count_loops(lowered)
    if found != loops:
        raise RuntimeError(f"the reference program has {found} while loop(s), expected {loops}: "
                           "XLA's count of it would miss loop iterations")
    flops = cost(lowered).get("flops")
    if not flops:
        raise RuntimeError("XLA's cost analysis gave no FLOPs for the reference program")
    return float(flops)


def program_bytes(compiled) -> int | None:
    """Device memory a compiled program needs by XLA's buffer assignment: arguments + outputs +
    temporaries - aliased (donated) bytes; None where the backend gives no memory analysis."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def device_peak_bytes() -> int | None:
    """`peak_bytes_in_use` of the first device's allocator since the process started; None where
    the backend keeps no statistics (the CPU)."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def fingerprint(lowered) -> str:
    """A hash of a lowered program's text: equal for programs XLA would compile identically."""
    return hashlib.sha256(lowered.as_text().encode()).hexdigest()


def finish(row: Row, peak: float | None) -> Row:
    """Fill `row`'s median, throughput, TFLOP/s and MFU from its times and FLOPs."""
    if row.times_s:
        row.step_s = statistics.median(row.times_s)
        row.throughput = row.batch / row.step_s
        if row.flops:
            row.tflops_per_s = row.flops / row.step_s / 1e12
        row.mfu = mfu(row.flops, row.step_s, peak)
    return row


def _fmt(value, spec: str, none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def format_table(rows: list[Row], header: str, footer: list[str]) -> str:
    """The markdown table of `rows` (section order), with `header` above and `footer` lines below."""
    cols = ("benchmark", "attention", "batch", "compile s", "s/call", "throughput", "TFLOP", "TFLOP/s", "MFU",
            "XLA saw", "mem GiB")
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in sorted(rows, key=lambda r: SECTIONS.index(r.section)):
        if r.step_s is None:
            cells = (r.what, r.attention, str(r.batch), _fmt(r.compile_s, ".1f", "-"), "-", r.note or "-",
                     *(("-",) * 5))
        else:
            seen = None if not (r.xla_flops is not None and r.flops) else r.xla_flops / r.flops
            cells = (r.what, r.attention, str(r.batch), _fmt(r.compile_s, ".1f", "-"), f"{r.step_s:.4g}",
                     f"{r.throughput:.3g} {r.unit}", _fmt(r.flops and r.flops / 1e12, ".3g"),
                     _fmt(r.tflops_per_s, ".3g"), _fmt(r.mfu and 100 * r.mfu, ".1f") + ("%" if r.mfu else ""),
                     _fmt(seen and 100 * seen, ".0f", "-") + ("%" if seen else ""),
                     _fmt(r.mem_bytes and r.mem_bytes / 2**30, ".2f"))
            if r.note:
                cells = (cells[0], f"{cells[1]} ({r.note})", *cells[2:])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + footer)


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Models:
    """The networks of every section (modules with attention "auto") and their parameters."""

    unet: Any
    controlnet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    params: dict  # unet, controlnet, vae, text_encoder
    description: str

    def with_attention(self, name: str, impl: str):
        """The module `name` with `attention_impl=impl`."""
        return getattr(self, name).clone(attention_impl=impl)


def build_models(tiny: bool, dtype, param_dtype, vae_dtype, workdir: Path) -> Models:
    """SD-1.5's U-Net, a ControlNet of the same size, SD's VAE and CLIP-L's text encoder (or the
    tiny ones of `benchmarks/_tiny.py`), with random weights (`models.params.init_params`: drawn on
    the host with numpy, Flax's default distributions, no XLA compilation; 33 s per 10^9 weights
    on a loaded 2-core CPU) placed on the default device. The ControlNet's weights are its own draw, zero
    convolutions included, so it changes the U-Net's output."""
    import jax

    from jaxcontrol.models import (
        AutoencoderKL,
        AutoencoderKLConfig,
        CLIPTextConfig,
        CLIPTextModel,
        ControlNetModel,
        UNet2DConditionConfig,
        UNet2DConditionModel,
        controlnet_config_from_unet,
        init_params,
    )
    from jaxcontrol.models.vae import SD_VAE
    from jaxcontrol.testing.reference import tiny_clip_tokenizer
    from jaxcontrol.tokenizer import load_tokenizer

    if tiny:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from _tiny import TINY_TEXT, TINY_UNET, TINY_VAE

        unet_cfg, vae_cfg = UNet2DConditionConfig(**TINY_UNET), AutoencoderKLConfig(**TINY_VAE)
        text_cfg = CLIPTextConfig(**TINY_TEXT)
        description = "tiny SD-layout U-Net + ControlNet + CLIP + VAE (benchmarks/_tiny.py)"
    else:
        from jaxcontrol.testing.parity import SD15

        unet_cfg, vae_cfg = UNet2DConditionConfig(**SD15), SD_VAE
        # CLIP ViT-L/14's text tower, as SD-1.5 uses it
        text_cfg = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, max_position_embeddings=77, vocab_size=49408,
                                  hidden_act="quick_gelu")
        description = "SD-1.5 U-Net (859.5M) + ControlNet (361M) + CLIP-L text encoder + SD VAE"
    kw = {"dtype": dtype, "param_dtype": param_dtype}
    unet = UNet2DConditionModel(unet_cfg, **kw)
    controlnet = ControlNetModel(controlnet_config_from_unet(unet_cfg), **kw)
    vae = AutoencoderKL(vae_cfg, dtype=vae_dtype, param_dtype=vae_dtype)
    text_encoder = CLIPTextModel(text_cfg, **kw)
    params = {}
    for seed, (name, module) in enumerate((("unet", unet), ("controlnet", controlnet), ("vae", vae),
                                           ("text_encoder", text_encoder))):
        start = time.perf_counter()
        params[name] = jax.block_until_ready(init_params(module, seed))
        log(f"  {name}: random weights in {time.perf_counter() - start:.1f} s")
    tokenizer = load_tokenizer(tiny_clip_tokenizer(workdir / "tokenizer"))
    return Models(unet, controlnet, vae, text_encoder, tokenizer, params, description)


def log(message: str) -> None:
    """Progress, on stderr (the table goes to stdout)."""
    print(message, file=sys.stderr, flush=True)


def timed(fn: Callable, repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of `fn`, each ended by `jax.block_until_ready` on its result."""
    import jax

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


# ------------------------------------------------------------------------------------------------
# the three sections: each builds its program for one attention path, compiles, warms up, times
# ------------------------------------------------------------------------------------------------


class Bench:
    """The configurations of one run, sharing the models and each section's reference FLOPs."""

    def __init__(self, models: Models, sizes: Sizes, peak: float | None):
        self.m, self.sizes, self.peak = models, sizes, peak
        self._flops: dict[str, float | None] = {}
        self._seen: dict[tuple[str, str], Row] = {}  # (section, program fingerprint) -> its row
        self._plain: dict[str, Any] = {}  # section -> its "plain" lowering (or Pipeline), made once

    def row(self, section: str, impl: str) -> Row:
        """An empty row of `section` for attention path `impl`."""
        s = self.sizes
        what, batch, unit = {
            "unet": (f"U-Net forward, {s.unet_latent}x{s.unet_latent} latents", s.unet_batch, "images/s"),
            "pipeline": (f"pipeline {s.pipe_size}x{s.pipe_size}, {s.pipe_steps} steps, CFG, ControlNet",
                         s.pipe_batch, "images/s"),
            "train": (f"ControlNet train step, {s.train_size}x{s.train_size}", s.train_batch, "samples/s"),
        }[section]
        return Row(section, impl, what, batch, unit)

    def run(self, section: str, impl: str) -> Row:
        """Measure `section` ("unet", "pipeline", "train") with attention path `impl`."""
        row = {"unet": self.unet, "pipeline": self.pipe, "train": self.train}[section](impl)
        return finish(row, self.peak)

    # ---------------------------------------------------------------- shared steps
    def _repeat_of(self, row: Row, lowered) -> Row | None:
        """A copy of the earlier row of `row`'s section that ran the same program, or None (and
        `row` is registered as the one that runs it)."""
        key = (row.section, fingerprint(lowered))
        if key in self._seen:
            prev = self._seen[key]
            return dataclasses.replace(prev, attention=row.attention, note=f"same program as {prev.attention}")
        self._seen[key] = row
        return None

    def _measure(self, row: Row, lowered, call_of: Callable[[Any], Callable[[], Any]], repeats: int,
                 lower_s: float, xla_flops: bool = True) -> Row:
        """Compile `lowered` (unless an earlier row of the section ran the same program), warm up
        with one call, time `repeats` calls of `call_of(compiled)`. `xla_flops`: record the
        compiled program's own FLOP count."""
        repeat = self._repeat_of(row, lowered)
        if repeat is not None:
            return repeat
        start = time.perf_counter()
        compiled = lowered.compile()
        row.compile_s = lower_s + time.perf_counter() - start
        row.xla_flops = cost(compiled).get("flops") if xla_flops else None
        row.mem_bytes = program_bytes(compiled)
        call = call_of(compiled)
        row.first_call_s = timed(call, 1)[0]
        row.times_s = timed(call, repeats)
        row.device_peak_bytes = device_peak_bytes()
        return row

    def _lowering(self, section: str, impl: str, lower: Callable[[str], Any]):
        """`lower(impl)`, kept for "plain" (the reference lowering, measured too when "plain" runs)."""
        if impl != "plain":
            return lower(impl)
        if section not in self._plain:
            self._plain[section] = lower(impl)
        return self._plain[section]

    def reference(self, section: str, make: Callable[[], float]) -> float | None:
        """The section's model FLOPs per call, computed once by `make`; None (and the error on
        stderr) when that fails, so the row still has its times."""
        if section not in self._flops:
            start = time.perf_counter()
            try:
                self._flops[section] = make()
            except Exception as e:  # noqa: BLE001 - a failed count must not lose the measurement
                log(f"  {section}: no model FLOPs: {type(e).__name__}: {e}")
                self._flops[section] = None
            else:
                log(f"  {section}: model FLOPs {self._flops[section] / 1e12:.4g} T per call "
                    f"(reference lowering, {time.perf_counter() - start:.1f} s)")
        return self._flops[section]

    # ---------------------------------------------------------------- U-Net forward
    def unet_inputs(self) -> tuple:
        """(latents (B, h, w, 4) float32, timesteps (B,) float32, context (B, 77, D) float32), fixed."""
        import jax.numpy as jnp
        import numpy as np

        if "unet_inputs" not in self._plain:
            s, g = self.sizes, np.random.default_rng(0)
            ctx_dim = self.m.unet.config.cross_attention_dims[0]
            self._plain["unet_inputs"] = (
                jnp.asarray(g.standard_normal((s.unet_batch, s.unet_latent, s.unet_latent, 4), np.float32)),
                jnp.asarray(g.integers(0, 1000, (s.unet_batch,)).astype(np.float32)),
                jnp.asarray(g.standard_normal((s.unet_batch, 77, ctx_dim), np.float32)))
        return self._plain["unet_inputs"]

    def unet_lowering(self, impl: str):
        """The jitted U-Net forward with `impl`, lowered for the benchmark's inputs."""
        import jax

        def lower(impl):
            unet = self.m.with_attention("unet", impl)
            fwd = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))
            return fwd.lower(self.m.params["unet"], *self.unet_inputs())

        return self._lowering("unet", impl, lower)

    def unet(self, impl: str) -> Row:
        row = self.row("unet", impl)
        row.flops = self.reference("unet", lambda: reference_flops(self.unet_lowering("plain")))
        start = time.perf_counter()
        lowered = self.unet_lowering(impl)
        args = (self.m.params["unet"], *self.unet_inputs())
        return self._measure(row, lowered, lambda c: lambda: c(*args), self.sizes.repeats[0],
                             time.perf_counter() - start)

    # ---------------------------------------------------------------- pipeline
    def pipeline(self, impl: str):
        """A `Pipeline` over the models with `impl` in the U-Net and ControlNet, "auto" in the text
        encoder and VAE ("plain" everywhere for "plain", the reference)."""
        import jax

        from jaxcontrol.convert.pipeline_index import SCHEDULER, PipelineBundle
        from jaxcontrol.pipeline import Pipeline, default_mesh

        def make(impl):
            other = "plain" if impl == "plain" else "auto"
            m = self.m
            modules = {"unet": m.with_attention("unet", impl), "vae": m.with_attention("vae", other),
                       "text_encoder": m.with_attention("text_encoder", other)}
            scheduler = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                         "beta_end": 0.012, "beta_schedule": "scaled_linear", "skip_prk_steps": True,
                         "steps_offset": 1}
            bundle = PipelineBundle(Path("random-sd15"), "StableDiffusionPipeline", modules,
                                    {k: m.params[k] for k in modules}, {SCHEDULER: scheduler},
                                    {"tokenizer": m.tokenizer})
            # one device, as the other sections: a pipeline's default mesh spans every device of the host
            return Pipeline(bundle, controlnets=[(m.with_attention("controlnet", impl), m.params["controlnet"])],
                            mesh=default_mesh(jax.devices()[:1]))

        return self._lowering("pipeline", impl, make)

    def pipeline_call(self) -> tuple[list[str], dict]:
        """(prompts, options) of the benchmark's pipeline call: txt2img, DDIM, CFG 7.5, one ControlNet."""
        import numpy as np

        from jaxcontrol.pipeline import ControlInput

        s = self.sizes
        control = np.random.default_rng(1).random((s.pipe_batch, s.pipe_size, s.pipe_size, 3), np.float32)
        options = {"height": s.pipe_size, "width": s.pipe_size, "num_inference_steps": s.pipe_steps,
                   "guidance_scale": 7.5, "scheduler": "ddim", "controls": [ControlInput(control, 1.0)],
                   "output_type": "float", "seed": 0}
        return ["a red circle on a light blue background"] * s.pipe_batch, options

    def guided_evaluation_flops(self, rows: int, side: int) -> float:
        """Model FLOPs of one guided evaluation: U-Net + ControlNet ("plain") on `rows` latents of
        `side` x `side` (the CFG batch) with their control images."""
        import jax
        import jax.numpy as jnp

        from jaxcontrol.models.forward import ControlNetCall, model_forward

        m, size = self.m, self.sizes.pipe_size
        unet, cn = m.with_attention("unet", "plain"), m.with_attention("controlnet", "plain")

        def guided(up, cp, x, t, text, image):
            return model_forward(unet, up, x, t, text, controlnets=[ControlNetCall(cn, cp, image)])

        f32 = jnp.float32
        args = (jax.ShapeDtypeStruct((rows, side, side, 4), f32), jax.ShapeDtypeStruct((rows,), f32),
                jax.ShapeDtypeStruct((rows, 77, unet.config.cross_attention_dims[0]), f32),
                jax.ShapeDtypeStruct((rows, size, size, 3), f32))
        return reference_flops(jax.jit(guided).lower(m.params["unet"], m.params["controlnet"], *args))

    def pipeline_flops(self) -> float:
        """The reference program's count (its sampling scan's body once) plus (evaluations - 1)
        guided evaluations."""
        pipe = self.pipeline("plain")
        prompts, options = self.pipeline_call()
        program = reference_flops(pipe.lower(prompts, **options), loops=1)
        settings, *_ = pipe.check_inputs(prompts, **options)
        evals = pipe.compiled(settings)[1].num_evals
        one = self.guided_evaluation_flops(2 * self.sizes.pipe_batch, self.sizes.pipe_size // pipe.vae_scale_factor)
        if one > program:
            raise RuntimeError(f"one guided evaluation ({one:.4g} FLOPs) counts more than the whole program "
                               f"({program:.4g}): the program's loop is not the sampler's")
        log(f"  pipeline: program {program / 1e12:.4g} TFLOP with its loop body once; one guided evaluation "
            f"{one / 1e12:.4g} TFLOP; {evals} evaluations")
        return program + (evals - 1) * one

    def pipe(self, impl: str) -> Row:
        row = self.row("pipeline", impl)
        row.flops = self.reference("pipeline", self.pipeline_flops)
        start = time.perf_counter()
        pipe = self.pipeline(impl)
        prompts, options = self.pipeline_call()
        lowered = pipe.lower(prompts, **options)
        # compiling the lowered call fills the jit cache the pipeline's own calls use; its compiled
        # cost analysis counts the sampling loop's body once, so "XLA saw" is left out here
        row = self._measure(row, lowered, lambda c: lambda: pipe(prompts, **options), self.sizes.repeats[1],
                            time.perf_counter() - start, xla_flops=False)
        if row.first_call_s is not None and row.compile_s and row.first_call_s > 0.5 * row.compile_s:
            log(f"  pipeline / {impl}: the first call took {row.first_call_s:.1f} s after a {row.compile_s:.1f} s "
                "compile: it may have compiled again")
        return row

    # ---------------------------------------------------------------- ControlNet training step
    def train_parts(self, impl: str) -> dict:
        """A ControlNet training step with `impl`: {"step" (jitted), "abstract" (the state's shapes),
        "new_state" (makes the state), "frozen", "batch"}. As `benchmarks/train_step.py`: AdamW
        (lr 1e-5, weight decay 1e-2), clipping at 1.0, epsilon loss, precomputed latents and text
        embeddings, float32 master weights."""
        import jax
        import jax.numpy as jnp
        import numpy as np

        from jaxcontrol.schedulers import NoiseSchedule, make_betas
        from jaxcontrol.training import (
            default_config,
            jit_train_step,
            make_mesh,
            make_train_step,
        )
        from jaxcontrol.training.networks import Networks
        from jaxcontrol.training.sharding import (
            batch_sharding,
            param_shardings,
            replicated,
        )
        from jaxcontrol.training.state import (
            create_train_state,
            learning_rate_schedule,
            make_optimizer,
        )

        s, m = self.sizes, self.m
        config = default_config()
        config.task, config.batch_size = "controlnet", s.train_batch
        config.model.attention_impl = impl
        config.optim.learning_rate, config.optim.weight_decay, config.optim.max_grad_norm = 1e-5, 1e-2, 1.0
        cn = m.with_attention("controlnet", impl).clone(param_dtype=jnp.float32)
        nets = Networks(task="controlnet", unet=m.with_attention("unet", impl), vae=m.vae, text_encoder=None,
                        tokenizer=None, scheduler_config={}, prediction_type="epsilon",
                        schedule=NoiseSchedule(make_betas(1000, 0.00085, 0.012, "scaled_linear")), controlnet=cn)
        sched = learning_rate_schedule(config.optim, 1000)
        tx = make_optimizer(config.optim, sched)
        mesh = make_mesh(1, 1, jax.devices()[:1])

        def trainable():
            return {"controlnet": jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), m.params["controlnet"])}

        def init(p):
            return create_train_state(p, tx, 0, ema=False)

        abstract = jax.eval_shape(init, jax.eval_shape(trainable))
        state_sh = param_shardings(abstract, mesh)
        frozen = {"unet": m.params["unet"]}
        frozen_sh = param_shardings(frozen, mesh, shard=False)
        bsh = batch_sharding(mesh, ("data", "fsdp"), leading=1)
        g, lat = np.random.default_rng(2), s.train_size // 8
        ctx_dim = m.unet.config.cross_attention_dims[0]
        batch = {"latents": g.standard_normal((1, s.train_batch, lat, lat, 8), np.float32) * 0.5,
                 "encoder_hidden_states": g.standard_normal((1, s.train_batch, 77, ctx_dim), np.float32),
                 "conditioning_pixel_values": g.random((1, s.train_batch, s.train_size, s.train_size, 3), np.float32)}
        step = jit_train_step(make_train_step(nets, config, tx, sched), state_sh, frozen_sh, bsh, replicated(mesh))
        return {"step": step, "abstract": abstract, "frozen": frozen, "batch": jax.device_put(batch, bsh),
                "new_state": lambda: jax.jit(init, out_shardings=state_sh)(trainable())}

    def train_lowering(self, impl: str):
        """(lowered step, its parts) for `impl`, lowered for the state's shapes."""

        def lower(impl):
            parts = self.train_parts(impl)
            return parts["step"].lower(parts["abstract"], parts["frozen"], parts["batch"]), parts

        return self._lowering("train", impl, lower)

    def train(self, impl: str) -> Row:
        row = self.row("train", impl)
        row.flops = self.reference("train", lambda: reference_flops(self.train_lowering("plain")[0]))
        start = time.perf_counter()
        lowered, parts = self.train_lowering(impl)
        holder = {}

        def call_of(compiled):
            holder["state"] = parts["new_state"]()

            def call():
                holder["state"], metrics = compiled(holder["state"], parts["frozen"], parts["batch"])
                return metrics

            return call

        row = self._measure(row, lowered, call_of, self.sizes.repeats[2], time.perf_counter() - start)
        holder.clear()
        return row


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    """The command line (see the module docstring). Exits 0 when every configuration ran or was
    skipped for the budget, 1 when one failed, 2 for a bad argument, 130 when interrupted."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny models, small sizes, 2 steps (seconds on a CPU)")
    ap.add_argument("--attention", nargs="+", metavar="PATH",
                    help="attention paths to run (default: every path valid on this platform)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype (default bfloat16)")
    ap.add_argument("--param-dtype", default="bfloat16",
                    help="dtype of the inference weights and the frozen U-Net (default bfloat16)")
    ap.add_argument("--vae-dtype", default="float32", help="the VAE's dtype (default float32, as Pipeline's)")
    ap.add_argument("--repeats", type=int, help="steady calls timed per configuration (default 10/3/5, tiny 2)")
    ap.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s (default: by device kind)")
    ap.add_argument("--budget-s", type=float,
                    help="skip configurations that would end after this many seconds (default 420; tiny: none)")
    ap.add_argument("--json", help="also write the rows (and the run's settings) to this JSON file, after each row")
    args = ap.parse_args(argv)
    start = time.perf_counter()

    import jax

    from jaxcontrol.platform import backend, to_dtype

    platform = backend()
    try:
        paths = attention_paths(platform, args.attention)
        dtypes = [to_dtype(args.dtype), to_dtype(args.param_dtype), to_dtype(args.vae_dtype)]
    except ValueError as e:
        ap.error(str(e))
    if args.repeats is not None and args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    sizes = TINY if args.tiny else FULL
    if args.repeats:
        sizes = dataclasses.replace(sizes, repeats=(args.repeats,) * 3)
    budget = args.budget_s if args.budget_s is not None else (None if args.tiny else 420.0)
    device = jax.devices()[0]
    peak = peak_tflops(device.device_kind, platform, args.peak_tflops)
    names = [jax.numpy.dtype(d).name for d in dtypes]
    log(f"device_bench: {jax.device_count()} x {device.device_kind} ({platform}), jax {jax.__version__}, "
        f"peak {peak if peak else 'n/a'} TFLOP/s, paths {', '.join(paths)}")
    rows: list[Row] = []
    meta = {"device_kind": device.device_kind, "platform": platform, "devices": jax.device_count(),
            "jax": jax.__version__, "peak_tflops": peak, "sizes": dataclasses.asdict(sizes), "dtype": names[0],
            "param_dtype": names[1], "vae_dtype": names[2], "tiny": args.tiny, "paths": list(paths)}

    def report(models: Models | None) -> None:
        total = time.perf_counter() - start
        header = (f"{models.description if models else 'no models built'}, random weights; compute {names[0]}, "
                  f"weights {names[1]} (trained ControlNet float32), VAE {names[2]}; {jax.device_count()} x "
                  f"{device.device_kind} ({platform}), jax {jax.__version__}; median of "
                  f"{'/'.join(map(str, sizes.repeats))} steady calls")
        peak_mem = device_peak_bytes()
        footer = [
            (f"Peak {'n/a' if peak is None else f'{peak:g}'} TFLOP/s dense bf16"
             f"{' (--peak-tflops)' if args.peak_tflops else ''}. TFLOP: model FLOPs per call, by XLA's cost "
             "analysis of the same computation with attention 'plain' (2 FLOPs per multiply-add); XLA counts "
             "nothing inside custom calls (cuDNN, Pallas) and a loop body once, which 'XLA saw' (the compiled "
             "program's own count) shows."),
            (f"mem: XLA's buffer assignment per program; the device's measured peak over the run: "
             f"{'n/a' if peak_mem is None else f'{peak_mem / 2**30:.2f} GiB'}. Targets on a GPU: MFU >= "
             f"{', '.join(f'{100 * v:.0f}% ({k})' for k, v in TARGET_MFU.items())}. Total {total:.0f} s."),
        ]
        print(format_table(rows, header, footer), flush=True)

    def save() -> None:
        if args.json:
            from jaxcontrol.atomic import write_json

            write_json(args.json, {**meta, "total_s": time.perf_counter() - start,
                                   "device_peak_bytes": device_peak_bytes(),
                                   "rows": [dataclasses.asdict(r) for r in rows]}, indent=1)

    models = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            log("building models (random weights)")
            models = build_models(args.tiny, *dtypes, Path(tmp))
            bench = Bench(models, sizes, peak)
            longest: dict[str, float] = {}  # section -> its longest configuration so far, seconds
            for section, impl in run_order(paths, tuple(args.sections)):
                elapsed = time.perf_counter() - start
                estimate = longest.get(section, 0.0)
                if budget is not None and elapsed + estimate > budget:
                    log(f"{section} / {impl}: skipped ({elapsed:.0f} s spent, a {section} configuration has "
                        f"taken {estimate:.0f} s, budget {budget:.0f} s)")
                    rows.append(dataclasses.replace(bench.row(section, impl), note="skipped: time budget"))
                    continue
                log(f"{section} / {impl} ...")
                t0 = time.perf_counter()
                try:
                    row = bench.run(section, impl)
                except Exception as e:  # noqa: BLE001 - one failed configuration must not lose the others
                    log(f"{section} / {impl}: FAILED: {type(e).__name__}: {e}")
                    row = dataclasses.replace(bench.row(section, impl), note=f"failed: {type(e).__name__}")
                took = time.perf_counter() - t0
                longest[section] = max(longest.get(section, 0.0), took)
                rows.append(row)
                save()
                if row.step_s is not None:
                    log(f"{section} / {impl}: {row.step_s:.4g} s/call, {row.throughput:.3g} {row.unit}, MFU "
                        f"{_fmt(row.mfu and 100 * row.mfu, '.1f')}% ({took:.0f} s in all)")
    except KeyboardInterrupt:
        log("interrupted: the table holds the configurations that finished")
        report(models)
        save()
        return 130
    report(models)
    save()
    return 0 if all(r.step_s is not None or r.note.startswith("skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
