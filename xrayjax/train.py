"""One training stage: init or restore, jitted train/predict steps, loop, best checkpoint."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow as tf
from absl import logging

from xrayjax import checkpoint, optim, sharding
from xrayjax.data import pipeline


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any  # BatchNorm running statistics ({} for models without BatchNorm)
  opt_state: Any

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}

  @classmethod
  def create(cls, variables: dict, tx: optax.GradientTransformation) -> TrainState:
    v = variables_of(variables)
    return cls(jnp.zeros((), jnp.int32), v["params"], v["batch_stats"], tx.init(v["params"]))


def variables_of(variables: dict) -> dict:
  """`variables` with a `batch_stats` collection (empty for models without BatchNorm)."""
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def make_train_step(model, tx: optax.GradientTransformation, key: jax.Array,
                    stats_rules=None) -> Callable:
  """Pure `train_step(state, batch) -> (state, metrics)`; randomness = fold_in(key, step).

  `stats_rules` (a pytree like `state.batch_stats` of "train"/"freeze", from
  optim.param_labels) keeps the running statistics of frozen layers' BatchNorms
  fixed. Those layers still normalise with the batch's statistics in training,
  where Keras runs a frozen BatchNorm in inference mode (README: deviations).
  """

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(key, state.step)

    def loss_fn(params):
      (logits, _), updated = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
          rngs={"dropout": rng}, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
      return loss, (logits, updated.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    if stats_rules is not None:
      batch_stats = jax.tree.map(lambda rule, new, old: old if rule == "freeze" else new,
                                 stats_rules, batch_stats, state.batch_stats)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, {"loss": loss, "accuracy": accuracy}

  return train_step


def make_predict_fn(model, mesh) -> Callable:
  """Jitted `predict(variables, batch)`: class probabilities with the batch's label, index and
  mask.

  Outputs are replicated, so on multi-host jobs every process sees the whole global batch.
  """

  def predict(variables, batch):
    logits, _ = model.apply(variables, batch["image"], train=False)
    return {"probs": jax.nn.softmax(logits.astype(jnp.float32)), "label": batch["label"],
            "index": batch["index"], "mask": batch["mask"]}

  return jax.jit(predict, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def predict_dataset(predict_fn, variables, ds, num_examples: int, batch_size: int, mesh):
  """(probs [n, C], labels [n], index [n]) for every example exactly once, sorted by index."""
  outs = []
  for batch in pipeline.eval_batches(ds, num_examples, batch_size, jax.process_index(),
                                     jax.process_count()):
    out = jax.device_get(predict_fn(variables, sharding.to_global(batch, mesh)))
    keep = out["mask"] > 0
    outs.append({k: np.asarray(v)[keep] for k, v in out.items()})
  probs, labels, index = (np.concatenate([o[k] for o in outs]) for k in ("probs", "label", "index"))
  order = np.argsort(index)
  return probs[order], labels[order], index[order]


def restore_selected(model, init_variables, ckpt_dir: str, cfg, rules, groups) -> dict:
  """The variables a finished stage selected (what its stage summary names), on the host.

  Raises FileNotFoundError when the stage has not finished.
  """
  ckpts = checkpoint.StageCheckpoints(ckpt_dir)
  try:
    if ckpts.summary() is None:
      raise FileNotFoundError(f"{ckpt_dir} holds no finished training stage: train it first "
                              "(python -m xrayjax.main ... --workdir=...)")
    init = variables_of(init_variables)
    tx = optim.make(cfg.optimizer, 1, init["params"], rules, groups)
    return jax.device_get(ckpts.best(TrainState.create(init, tx)).variables)
  finally:
    ckpts.close()


@dataclasses.dataclass
class StageData:
  """What a stage trains and validates on (datasets from `pipeline.select`)."""
  train: Any
  num_train: int
  val: Any = None
  num_val: int = 0


def train_stage(*, name: str, model, init_variables, rules, groups, cfg, data: StageData,
                select: str, ckpt_dir: str, seed: int, augment_cfg, mesh, log_every: int,
                tb_dir: str | None, require_finished: bool = False) -> tuple[Any, dict]:
  """Trains one stage (or skips it when finished) and returns (selected variables, summary).

  Args:
    name: label for logs, e.g. "stage_a" or "fold2/stage_b".
    model: Flax module.
    init_variables: starting {"params", "batch_stats"} (host or device pytrees).
    rules: freezing rules (see optim.param_labels); groups: the model's PARAM_GROUPS.
    cfg: the stage config (epochs, batch_size, eval_batch_size, optimizer).
    data: the stage's datasets.
    select: which checkpoint the stage returns: "best" validation accuracy or "last".
    ckpt_dir: this stage's checkpoint directory.
    seed: seeds the data order, augmentation and dropout.
    augment_cfg: config.augment.
    mesh: device mesh.
    log_every: steps between progress lines.
    tb_dir: TensorBoard directory (None: no events).
    require_finished: only restore (evaluation): fail if the stage never finished.
  """
  ckpts = checkpoint.StageCheckpoints(ckpt_dir)
  replicated = sharding.replicated(mesh)
  steps_per_epoch = pipeline.steps_per_epoch(data.num_train, cfg.batch_size)
  total_steps = steps_per_epoch * cfg.epochs
  init = jax.device_put(variables_of(init_variables), replicated)
  tx = optim.make(cfg.optimizer, total_steps, init["params"], rules, groups)
  stats_rules = optim.param_labels(init["batch_stats"], rules, groups)
  state = jax.jit(lambda v: TrainState.create(v, tx), out_shardings=replicated)(init)

  summary = ckpts.summary()
  if summary is not None:
    logging.info("[%s] finished earlier (best step %d): skipping", name, summary["selected_step"])
    variables = ckpts.best(state).variables
    ckpts.close()
    return variables, summary

  if require_finished:
    ckpts.close()
    raise FileNotFoundError(f"[{name}] has not finished training in {ckpt_dir}: run "
                            "--mode=train with this workdir first")
  if select == "best" and data.val is None:
    raise ValueError(f"[{name}] select='best' needs a validation split; use select='last'")
  sharding.check_batch_size(cfg.batch_size, mesh, f"[{name}] batch_size")
  sharding.check_batch_size(cfg.eval_batch_size, mesh, f"[{name}] eval_batch_size")
  state, step = ckpts.restore_or_init(state)
  if step % steps_per_epoch:
    raise ValueError(f"[{name}] checkpoint step {step} is not at an epoch end of "
                     f"{steps_per_epoch} steps: {ckpt_dir} was written by a different config")
  if step:
    logging.info("[%s] resuming from step %d (epoch %d of %d)", name, step,
                 step // steps_per_epoch, cfg.epochs)

  key = jax.random.PRNGKey(seed)
  predict_fn = make_predict_fn(model, mesh)
  step_fn = jax.jit(make_train_step(model, tx, key, stats_rules),
                    in_shardings=(replicated, sharding.batch_sharding(mesh)),
                    out_shardings=(replicated, replicated), donate_argnums=0)
  writer = tf.summary.create_file_writer(tb_dir) if tb_dir and jax.process_index() == 0 else None
  start_time, start_step = time.time(), step
  for epoch in range(step // steps_per_epoch, cfg.epochs):
    sums = None
    batches = pipeline.train_batches(data.train, data.num_train, cfg.batch_size, seed, epoch,
                                     augment_cfg, jax.process_index(), jax.process_count())
    for batch in batches:
      state, metrics = step_fn(state, sharding.to_global(batch, mesh))
      sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
      step += 1
      if step % log_every == 0:
        loss = float(metrics["loss"])
        _check_finite(name, step, loss, ckpts)
        rate = (step - start_step) / (time.time() - start_time)
        eta = (total_steps - step) / max(rate, 1e-9)
        logging.info("[%s] epoch %d/%d step %d/%d loss %.4f | %.2f steps/s, ETA %s", name,
                     epoch + 1, cfg.epochs, step, total_steps, loss, rate, _hms(eta))
        _write_scalars(writer, step, {"train/loss_step": loss})
    epoch_metrics = {f"train_{k}": float(v) / steps_per_epoch for k, v in sums.items()}
    _check_finite(name, step, epoch_metrics["train_loss"], ckpts)
    if data.val is not None:
      probs, labels, _ = predict_dataset(predict_fn, state.variables, data.val, data.num_val,
                                         cfg.eval_batch_size, mesh)
      epoch_metrics["val_accuracy"] = float(np.mean(probs.argmax(-1) == labels))
    epoch_metrics["select_metric"] = (epoch_metrics["val_accuracy"] if select == "best"
                                      else float(step))
    ckpts.save(state, step, epoch_metrics)
    _write_scalars(writer, step, epoch_metrics)
    logging.info("[%s] epoch %d/%d done: %s", name, epoch + 1, cfg.epochs,
                 ", ".join(f"{k} {v:.4f}" for k, v in epoch_metrics.items()
                           if k != "select_metric"))

  best_step = ckpts.best_step()
  variables = ckpts.best(state).variables
  summary = {"selected_step": int(best_step), "select": select, "total_steps": total_steps,
             "selected_metrics": ckpts.metrics(best_step)}
  ckpts.finish(summary)
  ckpts.close()
  if writer:
    writer.flush()
  return variables, summary


def _check_finite(name: str, step: int, loss: float, ckpts) -> None:
  if not math.isfinite(loss):
    raise FloatingPointError(
        f"[{name}] training loss is {loss} at step {step}. Nothing was saved after the last "
        f"good checkpoint (step {ckpts.latest_step()}) in {ckpts.directory}. Lower the "
        "learning rate (--config.stage_*.optimizer.lr) and run again with the same workdir to "
        "resume from it.")


def _write_scalars(writer, step: int, scalars: dict) -> None:
  if writer is None:
    return
  with writer.as_default(step=step):
    for k, v in scalars.items():
      tf.summary.scalar(k, v)


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
