"""A sweep's trials: the sweep file read into `Trial`s (overrides, names, the xrayjax.main
arguments), and what a trial directory says about it (finished, exit notes)."""

from __future__ import annotations

import datetime
import hashlib
import importlib.util
import os
import re
import signal
from dataclasses import dataclass, field


from xrayjax import files  # neither imports JAX nor TensorFlow

RESULTS, COMPARE = "results.json", "compare.json"  # what a finished run (protocol=both) wrote


PROTOCOLS = ("corrected", "paper")  # the sub-directories of a protocol=both run


LOG, TRIAL = "trial.log", "trial.json"


NAME_MAX = 120


@dataclass(frozen=True)
class Trial:
  """One point of a sweep: its overrides and the xrayjax.main arguments that run it."""
  index: int
  name: str
  overrides: dict
  config: str  # configs/<method>.py[:args], the sweep's config with this trial's args merged
  args: tuple[str, ...] = field(default=())  # --config.<field>=value ..., then the extra args

  def command(self, trial_dir: str) -> list[str]:
    """The arguments after `python`."""
    return ["-m", "xrayjax.main", f"--config={self.config}", f"--workdir={trial_dir}",
            *self.args]


def load_sweep(path: str) -> list[dict]:
  """Calls `get_sweep()` of the sweep file at `path`; checks it returns override dicts."""
  if not os.path.isfile(path):
    raise ValueError(f"sweep file {path} not found (sweep files live in configs/sweeps/)")
  spec = importlib.util.spec_from_file_location(
      "sweep_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{path} defines no get_sweep() (it returns a list of override dicts)")
  overrides = module.get_sweep()
  if not isinstance(overrides, (list, tuple)) or not overrides or not all(
      isinstance(o, dict) for o in overrides):
    raise ValueError(f"{path}: get_sweep() must return a non-empty list of dicts, got "
                     f"{type(overrides).__name__} {str(overrides)[:200]}")
  return list(overrides)


def make_trials(config: str, overrides: list[dict], extra_args=()) -> list[Trial]:
  """The trials of `overrides` on `config` (configs/x.py[:args]); names are unique."""
  keys: list[str] = []
  for o in overrides:
    for key in o:
      if not (key.startswith("config.") or key.startswith("config:")) or len(key) < 8:
        raise ValueError(f"override key {key!r} must be 'config.<field>' (a config field, as "
                         "--config.<field>=value) or 'config:<arg>' (a config argument, as "
                         "configs/detl.py:<arg>=value)")
      if key not in keys:
        keys.append(key)
  labels = short_labels(keys)
  path, base_args = _split_config(config)
  trials, seen = [], {}
  for index, o in enumerate(overrides):
    name = _trial_name([(labels[k], v) for k, v in o.items()]) or "default"
    if name in seen:
      raise ValueError(f"trials {seen[name]} and {index} have the same name {name!r} "
                       f"(overrides {overrides[seen[name]]} and {o}); every trial needs its own")
    seen[name] = index
    args = dict(base_args)
    for key, value in o.items():
      if key.startswith("config:"):
        args[key[7:]] = value
    fields = tuple(f"--{k}={_flag_value(v)}" for k, v in o.items() if k.startswith("config."))
    trials.append(Trial(index, name, dict(o), _join_config(path, args),
                        fields + tuple(extra_args)))
  return trials


def check_fields(trials: list[Trial]) -> None:
  """Builds each trial's config (cheap: no JAX) and checks that every overridden field
  exists, so a typo stops the sweep before any trial runs. Values are checked by the run."""
  configs = {}
  for t in trials:
    if t.config not in configs:
      path, args = _split_config(t.config)
      spec = importlib.util.spec_from_file_location("sweep_config", path)
      if spec is None or not os.path.isfile(path):
        raise ValueError(f"config file {path} not found")
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      arg = t.config.partition(":")[2]
      try:
        configs[t.config] = module.get_config(arg or None)
      except ValueError as e:
        raise ValueError(f"trial {t.name}: {e}") from None
    for key in t.overrides:
      if key.startswith("config."):
        node = configs[t.config]
        for part in key[7:].split("."):
          if not hasattr(node, "keys") or part not in node.keys():
            there = sorted(node.keys()) if hasattr(node, "keys") else f"the value {node!r}"
            raise ValueError(f"trial {t.name}: {key!r} is not a field of {t.config} "
                             f"(no {part!r} among {there})")
          node = node[part]


def _split_config(config: str) -> tuple[str, dict]:
  path, _, arg = config.partition(":")
  args = {}
  for item in filter(None, arg.split(",")):
    key, eq, value = item.partition("=")
    args[key] = value if eq else True
  return path, args


def _join_config(path: str, args: dict) -> str:
  items = [k if v is True else f"{k}={v}" for k, v in args.items() if v is not False]
  return f"{path}:{','.join(items)}" if items else path


def _flag_value(value) -> str:
  return repr(value) if isinstance(value, float) else str(value)


def short_labels(keys: list[str]) -> dict[str, str]:
  """The shortest dotted suffix of each key that no other key shares:
  config.stage_b.optimizer.lr -> lr, or stage_b.optimizer.lr beside stage_a.optimizer.lr."""
  parts = {k: k[7:].split(".") if k.startswith("config.") else [k[7:]] for k in keys}
  depth = {k: 1 for k in keys}
  while True:
    labels = {k: ".".join(parts[k][-depth[k]:]) for k in keys}
    clashing = [k for k in keys if list(labels.values()).count(labels[k]) > 1]
    if not clashing:
      return labels
    grown = [k for k in clashing if depth[k] < len(parts[k])]
    if not grown:
      return {k: k for k in keys}  # e.g. config:seed beside config.seed: use the full keys
    for k in grown:
      depth[k] += 1


def _trial_name(items: list[tuple[str, object]]) -> str:
  def value(v):
    text = f"{v:g}" if isinstance(v, float) else str(v)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)
  name = ",".join(f"{label}={value(v)}" for label, v in items)
  if len(name) > NAME_MAX:  # file systems limit a name to 255 bytes
    name = name[:NAME_MAX - 9] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
  return name


def finished(trial_dir: str) -> bool:
  """Whether the run in `trial_dir` wrote its results (the last thing a run writes)."""
  return any(os.path.exists(os.path.join(trial_dir, f)) for f in (RESULTS, COMPARE))


def exit_note(code: int | None) -> str:
  """"exit code 1"; "exit code 143: SIGTERM" (xrayjax.main checkpointed: the same command
  resumes); "killed by SIGKILL" (a negative code: the process got the signal)."""
  if code is None:
    return "no exit code"
  if code == 0:
    return f"exit code 0 but no {RESULTS}"
  if code < 0:
    return f"killed by {signal.Signals(-code).name}"
  if code > 128 and code - 128 in signal.Signals.__members__.values():
    return f"exit code {code}: {signal.Signals(code - 128).name}"
  return f"exit code {code}"


def read_if_present(path: str):
  return files.read_json(path) if os.path.exists(path) else None


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return (f"{seconds // 3600} h {seconds % 3600 // 60} min" if seconds >= 3600 else
          f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s")
