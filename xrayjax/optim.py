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
from typing import NamedTuple

import jax
import jax.numpy as jnp
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
    return optax.chain(scale_by_keras_nadam(), optax.scale_by_learning_rate(lr))
  if cfg.name == "sgd":
    return optax.sgd(lr, momentum=cfg.momentum or None)
  raise ValueError(f"unknown optimizer {cfg.name!r}; valid optimizers: {OPTIMIZERS}")


class KerasNadamState(NamedTuple):
  count: jax.Array
  u_product: jax.Array  # prod_{i <= t} u_i, Keras's `_u_product`
  mu: optax.Updates
  nu: optax.Updates


def scale_by_keras_nadam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7
                         ) -> optax.GradientTransformation:
  """Nadam as Keras defines it (keras.optimizers.Nadam, the optimizer paper 2 trained with).

  Keras follows Dozat's schedule: momentum u_t = b1 (1 - 0.5 * 0.96^t), its running product
  in the bias correction, and epsilon 1e-7 added outside the square root. optax.nadam
  uses a constant b1, the plain Adam bias correction and eps 1e-8, so its steps differ
  (most in the first few hundred steps); tests/test_optim.py checks this one against Keras.
  """

  def init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return KerasNadamState(jnp.zeros((), jnp.int32), jnp.ones((), jnp.float32), zeros,
                           jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    del params
    t = (state.count + 1).astype(jnp.float32)
    u_t = b1 * (1.0 - 0.5 * jnp.power(0.96, t))
    u_next = b1 * (1.0 - 0.5 * jnp.power(0.96, t + 1))
    u_product = state.u_product * u_t
    u_product_next = u_product * u_next
    mu = jax.tree.map(lambda m, g: m + (g - m) * (1 - b1), state.mu, updates)
    nu = jax.tree.map(lambda v, g: v + (g * g - v) * (1 - b2), state.nu, updates)
    b2_power = jnp.power(b2, t)

    def step(m, v, g):
      m_hat = u_next * m / (1 - u_product_next) + (1 - u_t) * g / (1 - u_product)
      return m_hat / (jnp.sqrt(v / (1 - b2_power)) + eps)

    out = jax.tree.map(step, mu, nu, updates)
    return out, KerasNadamState(state.count + 1, u_product, mu, nu)

  return optax.GradientTransformation(init, update)


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
