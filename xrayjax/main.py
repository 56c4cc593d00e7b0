"""Entry point: `python -m xrayjax.main --config=configs/<method>.py[:args] [--workdir=DIR]
[--mode=eval [--eval_dir=DIR] [--eval_data=SOURCE:PATH]] [--retrain=STAGE,...]`
(configs/detl.py, configs/concat.py). `--print_config` prints the resolved config (args,
scale and every --config.x=y override applied) and exits.

Exit status: 0 done; 2 refused or stopped cleanly (the run directory's data or splits
changed, another job holds it, a damaged checkpoint, a full disk); 128 + signal number when SIGTERM / SIGINT stopped training
after a checkpoint (the same command resumes).
"""

from __future__ import annotations

import datetime
import logging as pylogging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported

from absl import app, flags, logging
from ml_collections import config_dict, config_flags

from xrayjax import hostmem

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (and args).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (default: checkpoints/<config>-<time>; eval needs it).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train (resumes a killed run) or eval (recompute metrics from the "
                          "best checkpoints of --workdir, no training; with --config, the "
                          "run's config args and other eval.* settings).")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir even though its saved config differs.")
_EVAL_DIR = flags.DEFINE_string(
    "eval_dir", None, "--mode=eval: where results go (default: --workdir, or a temporary "
    "directory when --workdir is read-only).")
_EVAL_DATA = flags.DEFINE_string(
    "eval_data", None, "--mode=eval: score the run's trained models on other data, as an "
    "external test set: SOURCE:PATH (manifest:/data/new.csv, nih_cxr14:/data/nih, ...).")
_RETRAIN = flags.DEFINE_list(
    "retrain", [], "Stages to train again (named as in plan.json, e.g. fold3/<stage>), with "
    "the stages started from them; their old directories are kept as <stage>.replaced-<time>.")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the resolved config (after args and overrides), one "
    "dotted field per line, and exit.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (multi-host jobs).")


_CHATTY = ("/orbax/", "/tensorflow_datasets/")


def _quiet_library_info(record) -> bool:
  # Orbax and TFDS log every checkpoint and dataset operation at INFO; keep their warnings.
  return record.levelno >= pylogging.WARNING or not any(c in record.pathname for c in _CHATTY)


def _flat(d: dict, prefix: str = ""):
  """(dotted.path, value) of every leaf of a nested dict, in order: the names
  --config.<path>=<value> overrides use."""
  for k, v in sorted(d.items()):
    if isinstance(v, dict) and v:
      yield from _flat(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def main(argv):
  del argv
  if _PRINT_CONFIG.value:
    if _CONFIG.value is None:
      raise app.UsageError("--print_config needs --config, e.g. --config=configs/detl.py")
    print("\n".join(f"{k} = {v!r}" for k, v in _flat(_CONFIG.value.to_dict())))
    return
  # The command line's own mistakes fail before the libraries load (seconds of imports).
  if _MODE.value == "train" and (_EVAL_DIR.value or _EVAL_DATA.value):
    raise app.UsageError("--eval_dir and --eval_data go with --mode=eval")
  if _MODE.value == "eval" and _RETRAIN.value:
    raise app.UsageError("--retrain goes with --mode=train")
  if _MODE.value == "eval" and not _WORKDIR.value:
    raise app.UsageError("--mode=eval needs --workdir of a trained run")
  if _MODE.value == "eval" and not os.path.isdir(_WORKDIR.value):
    raise app.UsageError(f"{_WORKDIR.value}: not a directory, so not an xrayjax run directory "
                         "(--mode=eval needs --workdir of a trained run)")
  if _MODE.value == "train" and _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/detl.py or "
                         "--config=configs/concat.py")
  logging.get_absl_handler().addFilter(_quiet_library_info)
  import jax

  from xrayjax import checkpoint, experiment, external, files, kernels, rundir, sharding, train
  from xrayjax.data import pipeline, tasks
  from xrayjax.data.sources import native

  sharding.initialize_distributed(_DISTRIBUTED.value)
  pipeline.configure_tensorflow(jax.default_backend())
  workdir = _WORKDIR.value
  if _MODE.value == "eval":
    path = os.path.join(workdir, rundir.CONFIG)
    if not os.path.exists(path):
      raise app.UsageError(f"{path} not found: --workdir is not an xrayjax run directory")
    if _CONFIG.value is None:
      config = config_dict.ConfigDict(files.read_json(path))
    else:  # the run's config with other eval.* settings (Grad-CAM target, method, ...)
      try:
        config = rundir.eval_config(workdir, _CONFIG.value)
      except ValueError as e:
        raise app.UsageError(str(e)) from None
  else:
    config = _CONFIG.value
    if not workdir:
      stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
      workdir = os.path.join("checkpoints", f"{config.method}-{config.model_name}-{stamp}")
  logging.info("workdir: %s", workdir)
  if jax.default_backend() == "cpu":
    logging.info("CPU convolutions: %s", kernels.status())
    logging.info("memory: %s", hostmem.status())
  try:
    if _EVAL_DATA.value:
      external.evaluate(config, workdir, _EVAL_DATA.value, _EVAL_DIR.value)
    else:
      experiment.run(config, workdir, _MODE.value, _ALLOW_CONFIG_CHANGE.value,
                     tuple(_RETRAIN.value), _EVAL_DIR.value)
  except train.Interrupted as e:
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(e.code)
  except (rundir.ChangedError, rundir.LockedError, checkpoint.CheckpointError,
          files.DiskFullError, tasks.EmptyClassError, native.LayoutError) as e:
    # refused or stopped cleanly: the message says what, where and what to do
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  hostmem.reexec()  # the command runs again with huge pages and the block cache (once)
  app.run(main)
