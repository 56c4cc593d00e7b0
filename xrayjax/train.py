"""One training stage: init or restore, jitted train/predict steps, loop, best checkpoint."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import shutil
import signal
import threading
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from xrayjax import checkpoint, infer, optim, sharding
from xrayjax.models import keras_weights


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


def make_train_step(model, tx: optax.GradientTransformation, stats_rules=None) -> Callable:
  """Pure `train_step(state, batch, key) -> (state, metrics)`; randomness = fold_in(key, step).

  The stage's key is an argument (not a constant of the compiled step), so the folds of a
  run share one compiled step.

  `stats_rules` (a pytree like `state.batch_stats` of "train"/"freeze", from
  optim.param_labels) keeps the running statistics of frozen layers' BatchNorms
  fixed. Those layers still normalise with the batch's statistics in training,
  where Keras runs a frozen BatchNorm in inference mode (docs/models.md).
  """

  def train_step(state: TrainState, batch, key):
    rng = jax.random.fold_in(key, state.step)

    def loss_fn(params):
      (logits, _), updated = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
          rngs={"dropout": rng}, mutable=["batch_stats"])
      logits = logits.astype(jnp.float32)  # a bfloat16 model's too: the loss is float32
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


def init_variables(model, image_size: int, seed: int, init_from: str | None = None,
                   spec=None) -> dict:
  """{"params", "batch_stats"} of `model` for 1-channel images: random, or Keras weights.

  `init_from` (config.model.init_from): Keras weight files (comma separated) to load over the
  random initialisation (see models/keras_weights.py); `spec` is the model's module.
  """
  variables = _random_variables(model, image_size, jax.random.PRNGKey(seed))
  if init_from:
    variables = keras_weights.load(init_from, jax.device_get(variables), spec)
  return variables


def fresh_layers(model, image_size: int, seed: int, pattern: str) -> dict:
  """The arrays of `init_variables(model, image_size, seed)` whose path within their
  collection ("layer/.../name") matches the regex `pattern`, and no others: the same values,
  bit for bit, from a program that leaves out every other layer's draws (JAX drops them
  before XLA compiles, so a head alone compiles in a fraction of the whole network's time)."""
  return _random_variables(model, image_size, jax.random.PRNGKey(seed), pattern)


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def _random_variables(model, image_size: int, key, pattern: str | None = None) -> dict:
  # One jitted init per (model, size, pattern): the folds of a run compile it once.
  dummy = jnp.zeros((1, image_size, image_size, 1), jnp.float32)
  variables = variables_of(model.init({"params": key}, dummy, train=False))
  if pattern is None:
    return variables
  keep = re.compile(pattern).search
  return {col: flax.traverse_util.unflatten_dict(
      {k: v for k, v in flax.traverse_util.flatten_dict(tree, sep="/").items() if keep(k)},
      sep="/") for col, tree in variables.items()}


def transfer(source, head, head_layer: str):
  """`source` variables with the layer `head_layer` taken from `head` (a head swap): every
  other layer, BatchNorm statistics included, stays. Both are {"params", "batch_stats"}
  collections; `head` holds `head_layer` alone."""
  return {col: {**{name: layer for name, layer in source.get(col, {}).items()
                   if name != head_layer}, **head.get(col, {})}
          for col in ("params", "batch_stats")}


def initial_variables(stage, model, spec, image_size: int, trained: dict,
                      init_from: str | None) -> dict:
  """Where `stage` starts (as flax's create_train_state): the weights of the earlier stage it
  names with its own head swapped in (init="stage", from `trained`: {stage name: variables};
  only the new head is drawn), or a random initialisation with the Keras files `init_from`
  over it (keras_init)."""
  if stage.init == "stage":
    head = fresh_layers(model, image_size, stage.init_seed, f"^{spec.HEAD_LAYER}/")
    return transfer(trained[stage.init_from], head, spec.HEAD_LAYER)
  return init_variables(model, image_size, stage.init_seed,
                        init_from if stage.keras_init else None, spec)


def describe_starts(stages, init_from: str | None) -> str:
  """Where every stage's weights start, for reports (stages with one start named together)."""
  starts: dict[str, list[str]] = {}
  for s in stages:
    if s.init == "stage":
      how = f"{s.init_from}'s weights, head swapped"
    elif s.keras_init and init_from:
      how = f"Keras weights {init_from}"
    else:
      how = "random"
    starts.setdefault(how, []).append(s.name)
  return "; ".join(f"{names[0] if len(names) == 1 else f'{names[0]} .. {names[-1]}'}: {how}"
                   for how, names in starts.items())


@dataclasses.dataclass
class StageData:
  """What a stage trains and validates on: per phase (dataset, images), and the validation
  dataset (None: no validation). A dataset is a tf.data one from `Cohort.dataset` (batched
  and augmented by data/pipeline.py) or anything with `train_batches` / `eval_batches`
  (arrays.ArrayData): training imports TensorFlow only for the former."""
  phases: list[tuple[Any, int]]
  val: Any = None
  num_val: int = 0


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  """Full batches per epoch (the remainder is dropped)."""
  steps = num_examples // global_batch
  if steps == 0:
    raise ValueError(f"the training split has {num_examples} images, fewer than one batch of "
                     f"{global_batch}; lower batch_size or add data")
  return steps


def _train_batches(ds, *args, **kwargs):
  """One epoch of `ds`'s training batches: its own `train_batches`, or data/pipeline.py's."""
  if hasattr(ds, "train_batches"):
    return ds.train_batches(*args, **kwargs)
  from xrayjax.data import pipeline  # (TensorFlow: only for tf.data datasets)
  return pipeline.train_batches(ds, *args, **kwargs)


def epoch_schedule(phase_sizes: list[int], phase_epochs: list[int], batch_size: int
                   ) -> list[dict]:
  """Every epoch of a stage in order: {phase, epoch (within the phase), steps, end (the
  stage's step count when it ends)}; a checkpoint's step maps to the epoch it ends."""
  out, end = [], 0
  for p, (n, epochs) in enumerate(zip(phase_sizes, phase_epochs)):
    steps = steps_per_epoch(n, batch_size)
    for e in range(epochs):
      end += steps
      out.append({"phase": p, "epoch": e, "steps": steps, "end": end})
  return out


class Interrupted(Exception):
  """Training stopped on SIGTERM or SIGINT after writing a checkpoint; `code` is the exit
  status (128 + the signal's number). The same command resumes from that checkpoint."""

  def __init__(self, message: str, code: int):
    super().__init__(message)
    self.code = code


class _StopSignals:
  """While active, SIGTERM and SIGINT only raise a flag: the loop finishes the current step,
  checkpoints, and stops. (The preemption notice of every cluster scheduler is a SIGTERM.)
  Multi-process jobs ask orbax instead, whose preemption sync point makes every process stop
  at the same step."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, ckpts):
    self.ckpts, self.received, self._old = ckpts, None, {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    del frame
    self.received = signum
    logging.warning("received %s: stopping after this step", signal.Signals(signum).name)

  def stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      return self.ckpts.reached_preemption(step)
    return self.received is not None


def epoch_at(schedule: list[dict], step: int) -> tuple[int, int]:
  """(index in `schedule` of the epoch that step `step` + 1 belongs to, batches of it done)."""
  for i, e in enumerate(schedule):
    if step < e["end"]:
      return i, step - (e["end"] - e["steps"])
  return len(schedule), 0


MIDDLE = -1.0  # select_metric of a checkpoint inside an epoch: never selected as the best
CHECKPOINT_SECONDS = 600  # checkpoint_every_steps=0: about this much training between saves


def train_stage(*, stage, model, init_variables, groups, data: StageData, ckpt_dir: str, mesh,
                log_every: int, tb_dir: str | None, checkpoint_every_steps: int = 0
                ) -> tuple[Any, dict]:
  """Trains one planned stage (or skips it when finished): (selected variables, summary).

  All phases run on one optimizer state (and one learning-rate schedule over the whole
  stage), as the authors' successive Keras `fit` calls do. Checkpoints are written at the end
  of every epoch that selection could pick (select="best": the best validation score,
  `stage.select_on`, so far), at the end of the stage, and every `checkpoint_every_steps` steps (0: about every 10
  minutes at the measured speed); a killed run resumes at the step it last saved, inside
  the right epoch of the right phase, bit-identical to a run that was never stopped.
  SIGTERM or SIGINT checkpoints after the current step and raises Interrupted.

  Args:
    stage: a methods.Stage (phases, optimizer, freezing rules, batch sizes, selection,
      seeds, augmentation).
    model: Flax module.
    init_variables: starting {"params", "batch_stats"} (host or device pytrees).
    groups: the model's PARAM_GROUPS (for the freezing rules).
    data: the stage's datasets, one per phase.
    ckpt_dir: this stage's checkpoint directory.
    mesh: device mesh.
    log_every: steps between progress lines.
    tb_dir: TensorBoard directory (None: no events).
    checkpoint_every_steps: steps between checkpoints inside an epoch (0: automatic).
  """
  name = stage.name
  ckpts = checkpoint.StageCheckpoints(ckpt_dir, name)
  try:
    summary = ckpts.summary()
    if summary is not None:
      variables = ckpts.restore_variables(summary["selected_step"])
      logging.info("[%s] finished earlier (selected step %d): skipping", name,
                   summary["selected_step"])
      ckpts.close()
      return variables, summary
    if ckpts.latest_step() is not None:
      ckpts.verify(ckpts.latest_step())
  except checkpoint.CheckpointError as e:
    ckpts.close()
    if e.kind != "missing":
      raise
    # A half-deleted stage is neither finished nor resumable: it starts again.
    logging.warning("%s\n[%s] removing the incomplete stage directory; training it again",
                    e, name)
    if jax.process_index() == 0:
      shutil.rmtree(ckpt_dir)
    sharding.barrier(f"cleanup {name}")
    ckpts = checkpoint.StageCheckpoints(ckpt_dir, name)

  replicated = sharding.replicated(mesh)
  schedule = epoch_schedule([n for _, n in data.phases], [p.epochs for p in stage.phases],
                            stage.batch_size)
  total_steps = schedule[-1]["end"]
  init = jax.device_put(variables_of(init_variables), replicated)
  create_fn, step_fn = _compiled_step(model, stage, total_steps, init, groups, mesh)
  state = create_fn(init)
  state, step = ckpts.restore_or_init(state)
  if step > total_steps:
    raise ValueError(f"[{name}] checkpoint step {step} is past this stage's {total_steps} "
                     f"steps: {ckpt_dir} was written by a different config")
  first, done = epoch_at(schedule, step)
  sums = None
  if step:
    e = schedule[min(first, len(schedule) - 1)]
    logging.info("[%s] resuming from step %d (phase %d of %d, epoch %d of %d, batch %d of %d)",
                 name, step, e["phase"] + 1, len(stage.phases), e["epoch"] + 1,
                 stage.phases[e["phase"]].epochs, done, e["steps"])
    if done:  # the epoch's running sums, saved with the checkpoint inside it
      saved = ckpts.metrics(step)
      sums = {k[len("partial_"):]: jnp.float32(v) for k, v in saved.items()
              if k.startswith("partial_")}

  key = jax.device_put(jax.random.PRNGKey(stage.seed), replicated)
  predict_fn = infer.make_predict_fn(model, mesh)
  writer = _scalar_writer(tb_dir) if tb_dir and jax.process_index() == 0 else None
  start_time, start_step = None, step
  every = checkpoint_every_steps
  phased = len(stage.phases) > 1
  with _StopSignals(ckpts) as signals:
    for index in range(first, len(schedule)):
      e = schedule[index]
      where = (f"phase {e['phase'] + 1}/{len(stage.phases)} " if phased else "") + \
          f"epoch {e['epoch'] + 1}/{stage.phases[e['phase']].epochs}"
      ds, num = data.phases[e["phase"]]
      # The epoch's randomness is keyed by its index in the whole stage (one phase: the epoch).
      batches = _train_batches(ds, num, stage.batch_size, stage.seed, index,
                               tuple(stage.augment), jax.process_index(),
                               jax.process_count(), start=done if index == first else 0)
      if index != first:
        sums = None
      for batch in batches:
        state, metrics = step_fn(state, sharding.to_global(batch, mesh), key)
        sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
        step += 1
        if start_time is None:  # timed from the first step on: compilation excluded
          start_time, start_step = time.time(), step
        elif not every and step - start_step >= 5:
          rate = (step - start_step) / (time.time() - start_time)
          every = max(1, int(CHECKPOINT_SECONDS * rate))
          if jax.process_count() > 1:  # orbax's save is collective: one interval for all
            every = int(multihost_utils.broadcast_one_to_all(np.int32(every)))
          logging.info("[%s] checkpointing every %d steps (about %d s)", name, every,
                       CHECKPOINT_SECONDS)
        if step % log_every == 0:
          loss = float(metrics["loss"])
          _check_finite(name, step, loss, ckpts)
          speed = ""
          if step > start_step:  # (the first timed step has no rate yet)
            rate = (step - start_step) / (time.time() - start_time)
            speed = f" | {rate:.2f} steps/s, ETA {_hms((total_steps - step) / rate)}"
          logging.info("[%s] %s step %d/%d loss %.4f%s", name, where, step, total_steps, loss,
                       speed)
          _write_scalars(writer, step, {"train/loss_step": loss})
        stopping = signals.stop(step)
        if step < e["end"] and (stopping or (every and step % every == 0)):
          _check_finite(name, step, float(sums["loss"]), ckpts)
          ckpts.save(state, step, {"select_metric": MIDDLE,
                                   **{f"partial_{k}": float(v) for k, v in sums.items()}})
          if stopping:
            raise _interrupted(name, step, signals, ckpts)
      epoch_metrics = {f"train_{k}": float(v) / e["steps"] for k, v in sums.items()}
      _check_finite(name, step, epoch_metrics["train_loss"], ckpts)
      if data.val is not None:
        probs, labels, _ = infer.predict(predict_fn, state.variables, data.val, data.num_val,
                                         stage.eval_batch_size, mesh)
        right = probs.argmax(-1) == labels
        epoch_metrics["val_accuracy"] = float(np.mean(right))
        epoch_metrics["val_balanced_accuracy"] = float(np.mean(
            [np.mean(right[labels == k]) for k in np.unique(labels)]))
      epoch_metrics["select_metric"] = (epoch_metrics[stage.select_on] if stage.select == "best"
                                        else float(step))
      # An epoch end is saved when selection could pick it (best so far; ties too, so the
      # choice among them is unchanged), at the stage's end, on a stop signal, and at the
      # interval: resuming from any saved step is bit-identical, so skipping the rest only
      # saves time (a save costs about as much as ten small training steps).
      best = ckpts.best_step()
      if (stage.select == "best" and (best is None or epoch_metrics["select_metric"]
                                      >= ckpts.metrics(best)["select_metric"])
          or step == total_steps or signals.stop(step)
          or every and step - (ckpts.latest_step() or 0) >= every):
        ckpts.save(state, step, epoch_metrics)
      _write_scalars(writer, step, epoch_metrics)
      logging.info("[%s] %s done: %s", name, where,
                   ", ".join(f"{k} {v:.4f}" for k, v in epoch_metrics.items()
                             if k != "select_metric"))
      if signals.stop(step) and step < total_steps:
        raise _interrupted(name, step, signals, ckpts)

  best_step = ckpts.best_step()
  variables = ckpts.best(state).variables
  summary = {"selected_step": int(best_step), "select": stage.select, "total_steps": total_steps,
             "phases": len(stage.phases), "selected_metrics": ckpts.metrics(best_step)}
  ckpts.finish(summary)
  ckpts.close()
  if writer:
    writer.flush()
  return variables, summary


def _interrupted(name: str, step: int, signals, ckpts) -> Interrupted:
  ckpts.close()
  signum = signals.received or signal.SIGTERM
  return Interrupted(f"[{name}] stopped by {signal.Signals(signum).name} after step {step}; "
                     f"checkpoint written to {ckpts.directory}. Run the same command again "
                     "to resume from it.", 128 + int(signum))


_STEPS: dict = {}
# A run's two kinds of stage (a pretraining stage and the folds' stage, which share one), so that
# runs of one config in a process (a notebook's, the tests') trace them once.
_STEPS_KEPT = 2


def _compiled_step(model, stage, total_steps: int, init, groups, mesh):
  """(jitted TrainState.create, jitted train step) of a stage; stages that differ only in data
  and seed (the folds of a run) share them, so they compile once per run, not once per fold.
  A schedule that depends on the stage's length (cosine) is shared only by stages of one
  length."""
  rules = tuple(tuple(r) for r in stage.param_rules)
  schedule_steps = total_steps if stage.optimizer.get("schedule") != "constant" else None
  key = (model, repr(sorted(dict(stage.optimizer).items())), schedule_steps, rules,
         tuple(sorted(groups.items())), mesh, jax.tree.structure(init))
  if key not in _STEPS:
    tx = optim.make(stage.optimizer, total_steps, init["params"], rules, groups)
    stats_rules = optim.param_labels(init["batch_stats"], rules, groups)
    replicated = sharding.replicated(mesh)
    while len(_STEPS) >= _STEPS_KEPT:
      del _STEPS[next(iter(_STEPS))]  # the least recently used
    _STEPS[key] = (jax.jit(lambda v: TrainState.create(v, tx), out_shardings=replicated),
                   jax.jit(make_train_step(model, tx, stats_rules),
                           in_shardings=(replicated, sharding.batch_sharding(mesh), replicated),
                           out_shardings=(replicated, replicated), donate_argnums=0))
  _STEPS[key] = _STEPS.pop(key)  # now the most recently used
  return _STEPS[key]


def _check_finite(name: str, step: int, loss: float, ckpts) -> None:
  if not math.isfinite(loss):
    raise FloatingPointError(
        f"[{name}] training loss is {loss} at step {step}. Nothing was saved after the last "
        f"good checkpoint (step {ckpts.latest_step()}) in {ckpts.directory}. Lower the "
        "learning rate of this stage's optimizer in the config and run again with the same "
        "workdir (and --allow_config_change) to resume from it.")


def _scalar_writer(tb_dir: str):
  """TensorBoard's writer (TensorFlow's), or None where TensorFlow is not installed: the
  metrics are still in every checkpoint's metadata and the logs."""
  try:
    import tensorflow as tf  # (only for TensorBoard events)
  except ImportError:
    logging.warning("TensorFlow is not installed: no TensorBoard events in %s (the metrics "
                    "are in the checkpoints' metadata and the log)", tb_dir)
    return None
  return tf.summary.create_file_writer(tb_dir)


def _write_scalars(writer, step: int, scalars: dict) -> None:
  if writer is None:
    return
  import tensorflow as tf  # (a writer exists only where it imports)
  with writer.as_default(step=step):
    for k, v in scalars.items():
      tf.summary.scalar(k, v)


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
