"""Entry point: `python -m xrayjax.main --config=configs/<method>.py[:args] [--workdir=DIR]
[--mode=eval]` (configs/detl.py, configs/concat.py)."""

from __future__ import annotations

import datetime
import logging as pylogging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported

from absl import app, flags, logging
from ml_collections import config_dict, config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (and args).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (default: checkpoints/<config>-<time>; eval needs it).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train (resumes a killed run) or eval (recompute metrics from the "
                          "best checkpoints of --workdir, no training).")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir even though its saved config differs.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (multi-host jobs).")


_CHATTY = ("/orbax/", "/tensorflow_datasets/")


def _quiet_library_info(record) -> bool:
  # Orbax and TFDS log every checkpoint and dataset operation at INFO; keep their warnings.
  return record.levelno >= pylogging.WARNING or not any(c in record.pathname for c in _CHATTY)


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_quiet_library_info)
  # tf.data must not take the accelerator from JAX.
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  from xrayjax import experiment, files, sharding

  sharding.initialize_distributed(_DISTRIBUTED.value)
  workdir = _WORKDIR.value
  if _MODE.value == "eval":
    if not workdir:
      raise app.UsageError("--mode=eval needs --workdir of a trained run")
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
      raise app.UsageError(f"{path} not found: --workdir is not an xrayjax run directory")
    config = config_dict.ConfigDict(files.read_json(path))
  else:
    if _CONFIG.value is None:
      raise app.UsageError("--config is required, e.g. --config=configs/detl.py or "
                           "--config=configs/concat.py")
    config = _CONFIG.value
    if not workdir:
      stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
      workdir = os.path.join("checkpoints", f"{config.method}-{config.model_name}-{stamp}")
  logging.info("workdir: %s", workdir)
  experiment.run(config, workdir, _MODE.value, _ALLOW_CONFIG_CHANGE.value)


if __name__ == "__main__":
  app.run(main)
