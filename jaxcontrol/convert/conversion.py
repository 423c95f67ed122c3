"""`convert`: any supported checkpoint in, the jaxcontrol format or a diffusers folder out.

    report = convert("v1-5-pruned-emaonly.safetensors", "sd15-jax", format="jaxcontrol", dtype="bfloat16",
                     tokenizer="sd15-tokenizer")
    print(format_summary(report))

Components are converted one at a time (read, checked against the module's parameter shapes,
cast, written, released), so host memory peaks near the largest component, not the whole file.
Output goes through `atomic_directory`: nothing appears at the destination unless every
component was converted and written.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import CheckpointError, ConfigError
from .components import DTYPES, Progress
from .export import DiffusersWriter
from .jax_format import JaxcontrolWriter, atomic_directory, check_not_overlapping, recover_destination
from .single_file import read_checkpoint

OUTPUT_FORMATS = ("jaxcontrol", "diffusers")


@dataclasses.dataclass
class ComponentReport:
    """One row of a `ConversionReport`: a component written (or a tokenizer copied, `param_count` 0).

    `class_name` is the diffusers/transformers class, `dtype` the parameters' dtype name, `path`
    where it was written.
    """

    name: str
    class_name: str
    param_count: int
    dtype: str
    path: Path


@dataclasses.dataclass
class ConversionReport:
    """What `convert` did (`format_summary` prints it as the CLI's table).

    The source and its detected format, the output and its format, the dtype, one `ComponentReport`
    per component, the pipeline class and prediction type found (or None), the notes gathered while
    reading, and the wall time in seconds.
    """

    source: Path
    detected_format: str
    description: str
    output: Path
    output_format: str
    dtype: str
    components: list[ComponentReport]
    pipeline_class: str | None
    prediction_type: str | None
    notes: list[str]
    seconds: float


def convert(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    format: str = "jaxcontrol",
    dtype: str = "float32",
    components: Iterable[str] | None = None,
    unsafe_load_pickle: bool = False,
    ema: bool | None = None,
    prediction_type: str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    configs: Mapping[str, Mapping[str, Any]] | None = None,
    tokenizer: str | os.PathLike | None = None,
    kind: str | None = None,
    overwrite: bool = False,
    tokenizer_2: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> ConversionReport:
    """Convert `src` (single file or folder, format detected) to `dest` (`format` "jaxcontrol" or "diffusers").

    See `read_checkpoint` for the reading options (`kind`: the U-Net's kind, checked against its
    input width; the pipeline class written names it). `dtype` ("float32", "bfloat16", "float16") is the
    dtype of every floating-point parameter written. `progress(description, total)` may return a
    progress bar (tqdm works). Raises `CheckpointError` / `ConfigError`; on any failure `dest` is unchanged.
    """
    start = time.perf_counter()
    if format not in OUTPUT_FORMATS:
        raise ConfigError(f"output format must be one of {OUTPUT_FORMATS}, got {format!r}")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    dest = Path(os.path.abspath(dest))
    check_not_overlapping(src, dest)
    recover_destination(dest)  # an earlier run killed half-way: put its old output back, drop its temporaries
    # the cheap checks come before reading a multi-gigabyte input
    if dest.exists() and not overwrite:
        raise CheckpointError(f"{dest}: already exists; pass overwrite=True (--overwrite) to replace it")
    if not dest.parent.is_dir():
        raise CheckpointError(f"{dest.parent}: the destination's parent folder does not exist")
    if not os.access(dest.parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"{dest.parent}: not writable; cannot create {dest.name} there")
    ckpt = read_checkpoint(src, unsafe_load_pickle=unsafe_load_pickle, ema=ema, prediction_type=prediction_type,
                           overrides=overrides, configs=configs, components=components, tokenizer=tokenizer,
                           kind=kind, tokenizer_2=tokenizer_2)
    param_dtype = DTYPES[dtype]
    rows: list[ComponentReport] = []
    single = len(ckpt.components) == 1
    with atomic_directory(dest, overwrite=overwrite) as tmp:
        writer: Any = JaxcontrolWriter(tmp) if format == "jaxcontrol" else DiffusersWriter(tmp, single=single)
        for name, comp in ckpt.components.items():
            module = comp.build(param_dtype=param_dtype)
            params = comp.load_params(module, param_dtype=param_dtype, progress=progress)
            if format == "jaxcontrol":
                n = writer.add(name, comp.config, params, dtype)
                where = dest / name
            else:
                n = writer.add(name, comp.config, params)
                where = dest if single else dest / name
            del params
            rows.append(ComponentReport(name, comp.class_name, n, dtype, where))
        if format == "jaxcontrol":
            writer.finish(pipeline_class=ckpt.pipeline_class, tokenizers=ckpt.tokenizers,
                          scheduler_config=ckpt.scheduler_config, prediction_type=ckpt.prediction_type,
                          source={"file": Path(src).name, "format": ckpt.format}, options=ckpt.options)
        else:
            writer.finish(pipeline_class=ckpt.pipeline_class, tokenizers=ckpt.tokenizers,
                          scheduler_config=ckpt.scheduler_config, options=ckpt.options)
    for name in ckpt.tokenizers if ckpt.pipeline_class else ():
        rows.append(ComponentReport(name, "tokenizer (copied)", 0, "-", dest / name))
    return ConversionReport(Path(src), ckpt.format, ckpt.description, dest, format, dtype, rows,
                            ckpt.pipeline_class, ckpt.prediction_type, list(ckpt.notes), time.perf_counter() - start)


def format_summary(report: ConversionReport) -> str:
    """The summary table the CLI prints: format, parameters per component, dtype, output paths."""
    lines = [
        f"source      {report.source}",
        f"detected    {report.detected_format} ({report.description})",
        f"output      {report.output} ({report.output_format}"
        + (f", {report.pipeline_class}" if report.pipeline_class else "") + ")",
    ]
    if report.prediction_type:
        lines.append(f"prediction  {report.prediction_type}")
    header = f"{'component':<14} {'class':<30} {'parameters':>14}  {'dtype':<9} path"
    lines += ["", header, "-" * (len(header) + 20)]
    total = 0
    for r in report.components:
        count = f"{r.param_count:,}" if r.param_count else "-"
        total += r.param_count
        lines.append(f"{r.name:<14} {r.class_name:<30} {count:>14}  {r.dtype:<9} {r.path}")
    lines.append(f"{'total':<14} {'':<30} {total:>14,}")
    if report.notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in report.notes]
    lines += ["", f"done in {report.seconds:.1f} s"]
    return "\n".join(lines)
