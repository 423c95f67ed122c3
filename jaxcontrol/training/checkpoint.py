"""Orbax checkpoints of a training run: the state, the data-iterator position and run metadata.

    ckpt = Checkpointer(workdir / "checkpoints", keep=3, async_save=True)
    ckpt.save(step, state, data_iterator, meta)       # returns at once; written in the background
    state = ckpt.restore(ckpt.latest_step(), abstract_state, data_iterator)

One Orbax `CheckpointManager` step directory holds three items: `state` (the `TrainState`:
trainable params, optimizer state, EMA, RNG, step), `data` (the grain iterator's position, one
JSON file per host) and `meta` (the run's batch geometry, checked on resume). Orbax writes each
step into a temporary directory and renames it when complete, so a run killed mid-save leaves
the previous checkpoints intact and the partial one is ignored (and removed) on restart.

`restore` takes an abstract state whose leaves carry the *current* mesh's shardings, so a
checkpoint saved on one mesh shape restores onto another.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from ..errors import CheckpointError

# meta keys that must match for the data iterator's saved position to mean the same batches
DATA_GEOMETRY = ("batch_size", "grad_accum_steps", "process_count", "dataset", "seed")


class Checkpointer:
    """An Orbax `CheckpointManager` under `directory` keeping the last `keep` steps (see the module
    docstring for what a step holds); `async_save` writes in the background."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(os.path.abspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        """The newest complete step, or None when there is none."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every complete step kept, ascending."""
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any | None = None, meta: dict | None = None) -> bool:
        """Start saving `step` (asynchronously unless disabled); returns whether Orbax started a save.
        The arrays are copied before it returns."""
        import grain

        items: dict[str, Any] = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None,
                meta: dict | None = None) -> Any:
        """The state at `step`, placed by `abstract_state`'s shardings; `data_iterator` is moved to its position.

        `meta` (this run's) is compared with the saved one on the keys that decide what the
        iterator's position means; a mismatch raises `CheckpointError` naming the key.
        """
        import grain

        saved_meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {}
        if meta is not None and data_iterator is not None:
            for key in DATA_GEOMETRY:
                if key in saved_meta and key in meta and saved_meta[key] != meta[key]:
                    raise CheckpointError(
                        f"{self.directory}/{step}: saved with {key}={saved_meta[key]!r}, this run has "
                        f"{key}={meta[key]!r}; the data iterator's position would not carry over "
                        f"(restore with the same {key}, or start a new workdir)")
        target = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), abstract_state)
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(target)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"{self.directory}/{step}: cannot restore the train state: {e}") from e
        return restored["state"]

    def read_meta(self, step: int) -> dict:
        """The `meta` dict saved with `step` ({} when none was)."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {}

    def wait(self) -> None:
        """Block until every background save has finished."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves, then release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
