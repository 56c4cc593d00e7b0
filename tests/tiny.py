"""Tiny configs for tests of the runner."""

from configs import detl


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
