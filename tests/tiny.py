"""Tiny configs for tests of the runner, and NaN variables for tests that import weights."""

import jax
import numpy as np

from configs import detl
from xrayjax import train


def lean(config):
  """`config` without the evaluation extras a test of the runner does not look at: Grad-CAM,
  the bootstrap, and the shortcut audit's perturbed images and pixel probes (each costs more
  than the tiny training; test_report.py and test_shortcuts.py test them)."""
  config.eval.gradcam.enabled = False
  config.eval.bootstrap = 0
  config.audit.update(perturb=False, probes=False)
  return config


def detl_config(tfds_dir, arg="runlocal"):
  """DETL's config for `arg` (runlocal by default), lean, reading the data in `tfds_dir`."""
  c = detl.get_config(arg)
  c.data.tfds_dir = tfds_dir
  return lean(c)


def nan_like_init(model, x):
  """NaNs shaped like `model`'s variables ({"params", "batch_stats"}), in place of a random
  initialisation for tests that import every weight from a Keras file: a value the file did
  not replace reaches the outputs as NaN. (A full-width network's initialisation, op by op,
  takes longer than the comparison.)"""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  return jax.tree.map(lambda s: np.full(s.shape, np.nan, s.dtype), train.variables_of(shapes))
