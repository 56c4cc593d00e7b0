"""Optimizers by name, learning-rate schedules, and freezing by regex.

Freezing is data: the config lists `(regex, rule)` pairs over '/'-joined
parameter paths, rule in {"train", "freeze"}; `{group}` in a regex expands to
the model's named parameter group (e.g. `{last_conv_block}`). Every parameter
must match exactly one pair. Frozen leaves get `optax.set_to_zero()` through
`optax.partition`, so they carry no optimizer state; their updates do not depend
on their gradients, so XLA removes those gradient computations from the step.
"""

from __future__ import annotations

import re

import jax
import optax

OPTIMIZERS = ("adam", "sgd", "nadam")
SCHEDULES = ("constant", "cosine")
RULES = ("train", "freeze")


def learning_rate(cfg, total_steps: int):
  if cfg.schedule == "constant":
    return cfg.lr
  if cfg.schedule == "cosine":  # the DETL paper's "cosine annealing", to 0 at the end
    return optax.cosine_decay_schedule(cfg.lr, max(total_steps, 1))
  raise ValueError(f"unknown schedule {cfg.schedule!r}; valid schedules: {SCHEDULES}")


def optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
  lr = learning_rate(cfg, total_steps)
  if cfg.name == "adam":
    return optax.adam(lr)
  if cfg.name == "nadam":
    return optax.nadam(lr)
  if cfg.name == "sgd":
    return optax.sgd(lr, momentum=cfg.momentum or None)
  raise ValueError(f"unknown optimizer {cfg.name!r}; valid optimizers: {OPTIMIZERS}")


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_labels(params, rules, groups: dict[str, str]):
  """The rule ("train" or "freeze") of every parameter; exactly one must match.

  Args:
    params: parameter pytree.
    rules: sequence of (regex, rule); regexes may use `{group}` placeholders.
    groups: the model's PARAM_GROUPS.

  Returns:
    A pytree like `params` of rule strings.
  """
  compiled = []
  for regex, rule in rules:
    if rule not in RULES:
      raise ValueError(f"freezing rule {rule!r} for {regex!r} is not one of {RULES}")
    try:
      expanded = regex.format(**{k: f"(?:{v})" for k, v in groups.items()})
    except KeyError as e:
      raise ValueError(f"freezing regex {regex!r} names unknown group {e}; this model's groups: "
                       f"{sorted(groups)}") from None
    compiled.append((re.compile(expanded), rule, regex))

  def label(path, _):
    name = path_str(path)
    hits = [(regex, rule) for r, rule, regex in compiled if r.search(name)]
    if len(hits) != 1:
      raise ValueError(f"parameter {name!r} matches {len(hits)} freezing rules "
                       f"{[h[0] for h in hits]}; every parameter must match exactly one")
    return hits[0][1]

  return jax.tree_util.tree_map_with_path(label, params)


def make(cfg, total_steps: int, params, rules, groups) -> optax.GradientTransformation:
  """The stage's optimizer with frozen parameters partitioned out."""
  return optax.partition({"train": optimizer(cfg, total_steps), "freeze": optax.set_to_zero()},
                         param_labels(params, rules, groups))
