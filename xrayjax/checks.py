"""Config and plan checks: every error that can be found before a run writes or trains,
named with the config field and what is valid."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from xrayjax import methods, models, sharding
from xrayjax.data import regions
from xrayjax.evaluate import score, shortcuts


def config_fields(config) -> None:
  """Config values no plan can repair: named with the field and what is valid."""
  for field in ("log_every", "folds"):
    if int(config.get(field, 1)) < 1:
      raise ValueError(f"config.{field}={config[field]} must be >= 1")
  if int(config.get("checkpoint_every_steps", 0)) < 0:
    raise ValueError(f"config.checkpoint_every_steps={config.checkpoint_every_steps} must be "
                     ">= 0 (0: about every 10 minutes)")
  if float(config.cache_budget_mb) < 0:
    raise ValueError(f"config.cache_budget_mb={config.cache_budget_mb} must be >= 0 (0: stream "
                     "every partition)")
  models.spec(config.model_name)  # an unknown model is named with the valid ones
  a = config.audit
  if a.input not in regions.INPUTS:
    raise ValueError(f"config.audit.input={a.input!r}; valid: {list(regions.INPUTS)}")
  field, _, value = a.leave_out.partition(":")
  if a.leave_out and (field not in ("source", "site") or not value):
    raise ValueError(f"config.audit.leave_out={a.leave_out!r}: expected FIELD:VALUE with FIELD "
                     "source or site, e.g. source:ieee8023")
  unknown = [n for n in shortcuts.retrain_names(config) if n not in shortcuts.RETRAIN]
  if unknown:
    raise ValueError(f"config.audit.retrain: unknown {unknown}; valid: {list(shortcuts.RETRAIN)} "
                     "(comma separated)")
  for key in ("centre", "corner", "top_crop"):
    if not 0 < a[key] < 1:
      raise ValueError(f"config.audit.{key}={a[key]} must be a fraction of the image side, "
                       "between 0 and 1")
  for path in str(config.model.get(models.INIT_FROM) or "").split(","):
    if path.strip() and not os.path.exists(os.path.expanduser(path.strip())):
      raise FileNotFoundError(f"config.model.{models.INIT_FROM}: {path.strip()} does not exist "
                              "(Keras weight files, comma separated; see docs/models.md)")


def plan_sizes(config, plan: methods.Plan, mesh) -> None:
  """What only the plan knows: classes, batch sizes against the devices and the images,
  and the input size against the model."""
  if not plan.classes:
    raise ValueError(f"the plan of {config.method} has no classes; check the task")
  for s in plan.stages:
    if not s.classes:
      raise ValueError(f"stage {s.name} has no classes; check the task")
    sharding.check_batch_size(s.batch_size, mesh, f"[{s.name}] batch_size")
    sharding.check_batch_size(s.eval_batch_size, mesh, f"[{s.name}] eval_batch_size")
    for j, p in enumerate(s.phases):
      if len(p.train) < s.batch_size:
        which = f" of phase {j + 1}" if len(s.phases) > 1 else ""
        raise ValueError(f"[{s.name}] training set{which} has {len(p.train)} images, fewer "
                         f"than one batch of {s.batch_size}; lower the stage's batch_size in "
                         "the config or add data")
  image_size(config.model_name, config.model, config.data.image_size)
  reference = config.eval.gradcam.get("reference", "")
  if config.eval.gradcam.enabled and reference:
    for name in dict.fromkeys(e.stage for e in plan.evaluations):
      score.reference_rows(plan.stage(name), reference)


def image_size(model_name: str, model_config, size: int) -> None:
  """Raises unless `model_name` keeps a feature map of at least 1x1 at `size`."""
  def fits(size):
    model = models.build(model_name, 2, model_config)
    try:
      shapes = jax.eval_shape(lambda: model.init_with_output(
          {"params": jax.random.PRNGKey(0)}, jnp.zeros((1, size, size, 1)), train=False)[0])
    except (ValueError, TypeError, ZeroDivisionError):
      return False
    return all(d >= 1 for leaf in jax.tree.leaves(shapes) for d in leaf.shape)

  if fits(size):
    return
  low, high = size, 1024
  if not fits(high):
    raise ValueError(f"model {model_name} does not run at data.image_size={size}")
  while high - low > 1:
    mid = (low + high) // 2
    low, high = (low, mid) if fits(mid) else (mid, high)
  raise ValueError(f"data.image_size={size} is below the minimum input of model "
                   f"{model_name} ({high} px): its feature maps would be empty. Set "
                   f"--config.data.image_size to at least {high}")
