"""Inference: the one padded-batch loop, and trained variables restored without an optimizer.

Validation, test evaluation, Grad-CAM audits and `predict` all run `batched`: every example
of a dataset exactly once, in fixed-size batches padded with `mask` = 0 (one compiled
shape), split over the mesh, results returned in the dataset's `index` order. A dataset is a
tf.data one (data/pipeline.py pads it) or anything with `eval_batches` (arrays.ArrayData):
this module imports TensorFlow only for the former.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from xrayjax import checkpoint, models, sharding


def batched(fn: Callable, variables, ds, num_examples: int, batch_size: int, mesh
            ) -> dict[str, np.ndarray]:
  """`fn(variables, batch) -> {name: [B, ...]}` over every example of `ds` once.

  `ds` yields {image, label, index, ...} (pipeline.select or pipeline.from_arrays); the
  batch fn sees images normalised to [-1, 1]. Keys of its output that start with "_" are
  dropped; in multi-process jobs its (replicated, global) output must carry the batch's
  mask and index as "_mask" and "_index" (make_predict_fn does). Returns
  {name: [num_examples, ...]} sorted by `index` (and `index` itself).
  """
  outs = []
  # A mesh of this process's devices alone (process 0's Grad-CAM in a multi-host run) reads
  # every batch here; a global one splits each batch over the processes.
  process, count = ((0, 1) if sharding.is_local(mesh) else
                    (jax.process_index(), jax.process_count()))
  for batch in eval_batches(ds, num_examples, batch_size, process, count):
    keep = batch["mask"] > 0
    index = batch["index"]
    out = jax.device_get(fn(variables, sharding.to_global(batch, mesh)))
    if count > 1:  # outputs are replicated: every process has the global batch
      keep, index = out.pop("_mask") > 0, out.pop("_index")
    outs.append({"index": np.asarray(index)[keep],
                 **{k: np.asarray(v)[keep] for k, v in out.items() if not k.startswith("_")}})
  result = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
  order = np.argsort(result["index"])
  return {k: v[order] for k, v in result.items()}


def eval_batches(ds, num_examples: int, batch_size: int, process: int, count: int):
  """`ds`'s padded evaluation batches for process `process` of `count`: its own
  `eval_batches`, or data/pipeline.py's for a tf.data dataset."""
  if hasattr(ds, "eval_batches"):
    return ds.eval_batches(num_examples, batch_size, process, count)
  from xrayjax.data import pipeline  # (TensorFlow: only for tf.data datasets)
  return pipeline.eval_batches(ds, num_examples, batch_size, process, count)


def model_builder(model_name: str, model_config, mesh) -> Callable:
  """model_for(num_classes) -> (model, its compiled predict fn, one per model: below)."""

  def model_for(num_classes):
    model = models.build(model_name, num_classes, model_config)
    return model, make_predict_fn(model, mesh)
  return model_for


@functools.lru_cache(maxsize=8)
def make_predict_fn(model, mesh) -> Callable:
  """Jitted `predict(variables, batch) -> {"probs", "label"}` with replicated outputs; one per
  (model, mesh), so a run's folds and its scoring compile it once."""

  def predict(variables, batch):
    logits, _ = model.apply(variables, batch["image"], train=False)
    return {"probs": jax.nn.softmax(logits.astype(jnp.float32)), "label": batch["label"],
            "_mask": batch["mask"], "_index": batch["index"]}

  return jax.jit(predict, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def predict(predict_fn, variables, ds, num_examples: int, batch_size: int, mesh
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(probs [n, C], labels [n], index [n]) of every example once, sorted by index."""
  out = batched(predict_fn, variables, ds, num_examples, batch_size, mesh)
  return out["probs"], out["label"], out["index"]


def restore(stage_dir: str, name: str | None = None) -> tuple[dict, dict]:
  """({"params", "batch_stats"} a finished stage selected, its summary), read from the
  checkpoint's own structure: no model, optimizer or config needed. `name` is the stage's
  name in messages.

  Raises FileNotFoundError when the stage has not finished, checkpoint.CheckpointError when
  its checkpoint is damaged or incomplete.
  """
  ckpts = checkpoint.StageCheckpoints(stage_dir, name)
  try:
    summary = ckpts.summary()
    if summary is None:
      raise FileNotFoundError(f"{stage_dir} holds no finished training stage: train it first "
                              "(python -m xrayjax.main --mode=train with this --workdir)")
    return ckpts.restore_variables(summary["selected_step"]), summary
  finally:
    ckpts.close()
