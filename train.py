#!/usr/bin/env python
"""Train a ControlNet, a T2I-Adapter or a U-Net. See docs/TRAINING.md.

    python train.py --config configs/controlnet_fill50k.py --workdir runs/cn
    python train.py --config configs/controlnet_fill50k.py --workdir runs/cn --config.steps=2000 \\
        --config.model.pretrained_path=stable-diffusion-v1-5 --config.model.init=pretrained

`--config` is a Python file whose `get_config()` returns an ml_collections ConfigDict; any key can
be overridden with `--config.KEY=VALUE`. Rerunning a command with the same `--workdir` resumes
from its latest checkpoint.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "experiment config file (get_config() -> ConfigDict)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "run directory: checkpoints, logs, samples, exports")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    from jaxcontrol.errors import JaxControlError
    from jaxcontrol.training import train

    try:
        summary = train(flags.FLAGS.config, flags.FLAGS.workdir)
    except JaxControlError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    print(f"train.py: done at step {summary['step']}"
          + (f", last loss {summary['last_loss']:.6g}" if summary["last_loss"] is not None else ""))
    return 0


if __name__ == "__main__":
    app.run(main)
