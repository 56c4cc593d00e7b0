"""Checkpoints: the only module that imports orbax.

One CheckpointManager per (fold, stage) directory keeps the latest checkpoint
(to resume) and the best by validation accuracy (to evaluate). A stage that
finished writes `summary.json` beside them; its presence means "skip me".

Arrays go through host (numpy) copies both ways: orbax writes and reads a numpy array in about
half the time of a jax.Array, and its per-array cost is most of a small model's checkpoint
(docs/performance.md, "Checkpoints"). The training state is replicated over the devices, so each
process's copy is the whole of it, and orbax writes numpy arrays from process 0 alone.

Every saved step's files are hashed (SHA-256) into `checksums.json`; a restore checks them
first, so a damaged or half-deleted checkpoint is reported (which stage, which files, how to
recover) instead of being loaded or crashing inside orbax.
"""

from __future__ import annotations

import hashlib
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from xrayjax import files

SUMMARY = "summary.json"
CHECKSUMS = "checksums.json"
ITEM = "default"  # the CheckpointManager's name for a single saved item
VARIABLES = ("params", "batch_stats")


def _metric(metrics) -> float:
  return float(metrics["select_metric"])


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be trusted: `kind` is "missing" (files or the step are gone:
  a half-deleted directory) or "damaged" (a file's bytes changed)."""

  def __init__(self, message: str, kind: str):
    super().__init__(message)
    self.kind = kind


class StageCheckpoints:
  """Latest + best checkpoints of one training stage; `name` (as plan.json names it, e.g.
  "fold3/<stage>") is how messages and `--retrain` name it."""

  def __init__(self, directory: str, name: str | None = None):
    self.directory = os.path.abspath(directory)
    self.name = name or os.path.basename(self.directory)
    options = ocp.CheckpointManagerOptions(
        best_fn=_metric, best_mode="max",
        preservation_policy=pp.AnyPreservationPolicy(
            [pp.LatestN(1), pp.BestN(get_metric_fn=_metric, n=1)]),
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, state, step: int, metrics: dict) -> None:
    """Saves `state` at `step` with `metrics` (which must hold `select_metric`)."""
    # Orbax silently skips a step that exists even with force=True: never re-save one.
    if step in self._manager.all_steps():
      return
    try:
      self._manager.save(step, args=ocp.args.StandardSave(jax.device_get(state)),
                         metrics={k: float(v) for k, v in metrics.items()})
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - orbax wraps its writers' errors
      if not files.no_space(e):
        raise
      latest = self.latest_step()
      raise files.disk_full(
          f"the checkpoint of step {step} of stage {self.name}", self.directory,
          f"from step {latest}" if latest is not None else "this stage from its start"
      ) from None
    if jax.process_index() == 0:
      kept = {str(s) for s in self._manager.all_steps()}
      sums = {k: v for k, v in self._checksums().items() if k in kept}
      sums[str(step)] = self._digest(step)
      files.write_json(os.path.join(self.directory, CHECKSUMS), sums)

  def _checksums(self) -> dict:
    path = os.path.join(self.directory, CHECKSUMS)
    return files.read_json(path) if os.path.exists(path) else {}

  def _digest(self, step: int) -> dict[str, str]:
    root = os.path.join(self.directory, str(step))
    out = {}
    for dirpath, _, names in os.walk(root):
      for n in names:
        path = os.path.join(dirpath, n)
        with open(path, "rb") as f:
          out[os.path.relpath(path, root)] = hashlib.file_digest(f, "sha256").hexdigest()
    return out

  def verify(self, step: int) -> None:
    """Raises CheckpointError unless every file recorded for `step` is there, unchanged.
    (A checkpoint written before checksums existed is not checked.)"""
    recorded = self._checksums().get(str(step))
    if recorded is None:
      if not os.path.isdir(os.path.join(self.directory, str(step))):
        raise self._error(step, "missing", "its directory is gone")
      return
    found = self._digest(step)
    missing = sorted(set(recorded) - set(found))
    if missing:
      raise self._error(step, "missing", f"{len(missing)} of its {len(recorded)} files are "
                        f"gone ({', '.join(missing[:3])})")
    changed = sorted(k for k in recorded if found[k] != recorded[k])
    if changed:
      raise self._error(step, "damaged", f"{len(changed)} file(s) differ from their checksum "
                        f"({', '.join(changed[:3])})")

  def _error(self, step: int, kind: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint step {step} of stage {self.name} ({self.directory}) is {kind}: {what}. "
        f"Retrain the stage with the same command plus --retrain={self.name} (its old "
        "directory is kept beside it, and stages started from it are retrained too).", kind)

  def reached_preemption(self, step: int) -> bool:
    """True once the cluster's preemption notice has reached every process (multi-host)."""
    return self._manager.reached_preemption(step)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    return self._manager.best_step()

  def restore(self, step: int, like):
    """Restores `step` into the structure and shardings of `like`."""
    self.verify(step)
    host = jax.tree.map(lambda x: np.empty(x.shape, x.dtype), like)  # shapes and dtypes only
    host = self._manager.restore(step, args=ocp.args.StandardRestore(host))
    # Each process places its own devices' shards (no cross-process check, as device_put's).
    return jax.tree.map(lambda h, x: jax.make_array_from_callback(h.shape, x.sharding,
                                                                  lambda i: h[i]), host, like)

  def restore_variables(self, step: int) -> dict:
    """{"params", "batch_stats"} saved at `step`, read from the checkpoint's own metadata
    (no model, optimizer or config needed; the optimizer state is not read) and placed on
    this process's first device, whatever devices the run trained on."""
    self.verify(step)
    path = epath.Path(self.directory) / str(step) / ITEM
    handler = ocp.PyTreeCheckpointHandler()
    try:
      tree = handler.metadata(path).tree
      wanted = {k: tree[k] for k in VARIABLES if tree.get(k)}
      is_leaf = lambda x: hasattr(x, "shape")  # noqa: E731
      item = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), wanted, is_leaf=is_leaf)
      restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), wanted,
                                  is_leaf=is_leaf)
      out = handler.restore(path, args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))
    finally:
      handler.close()
    out = jax.device_put(out, jax.local_devices()[0])
    return {k: out.get(k, {}) for k in VARIABLES}

  def restore_or_init(self, init_state):
    """(state, step): the latest checkpoint, or `init_state` and 0 if there is none."""
    step = self.latest_step()
    if step is None:
      return init_state, 0
    return self.restore(step, init_state), step

  def best(self, like):
    step = self.best_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}; train this stage first")
    return self.restore(step, like)

  def metrics(self, step: int) -> dict:
    return dict(self._manager.metrics(step) or {})

  def finish(self, summary: dict) -> None:
    if jax.process_index() == 0:  # one writer: concurrent writers collide in write_with
      files.write_json(os.path.join(self.directory, SUMMARY), summary)

  def summary(self) -> dict | None:
    path = os.path.join(self.directory, SUMMARY)
    if not os.path.exists(path):
      return None
    return files.read_json(path)

  def close(self) -> None:
    self._manager.close()

