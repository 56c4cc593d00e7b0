"""Helpers for sweep files: build the list of overrides that `get_sweep()` returns.

A sweep is a list of override dicts, one per trial. Keys are either config fields,
`"config.stage_b.optimizer.lr"` (passed as `--config.stage_b.optimizer.lr=...`), or config
arguments, `"config:init"` (merged into `--config=configs/detl.py:init=...`; `True` / `False`
switch a flag argument such as `runlocal` on / off).

  product(sweep("config:init", ["detl", "scratch"]), sweep("config.seed", [0, 1]))  # 4 trials
  zipit(sweep("config.stage_b.optimizer.lr", [1e-3, 1e-2]),
        sweep("config.stage_b.epochs", [30, 10]))                                   # 2 trials
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable

Sweep = list[dict[str, Any]]


def sweep(key: str, values: Iterable) -> Sweep:
  """One trial per value of `key`."""
  values = list(values)
  if not values:
    raise ValueError(f"sweep({key!r}, ...) has no values")
  return [{key: v} for v in values]


def fixed(key: str, value) -> Sweep:
  """`key` set to `value` in every trial it is combined with."""
  return [{key: value}]


def product(*sweeps: Sweep) -> Sweep:
  """Every combination (the first sweep varies slowest), as nested for-loops."""
  return [_merge(combo) for combo in itertools.product(*sweeps)]


def zipit(*sweeps: Sweep) -> Sweep:
  """Trial i combines the i-th entry of every sweep; the sweeps must have equal lengths."""
  lengths = [len(s) for s in sweeps]
  if len(set(lengths)) > 1:
    raise ValueError(f"zipit needs sweeps of equal length, got lengths {lengths}")
  return [_merge(combo) for combo in zip(*sweeps)]


def _merge(dicts) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for d in dicts:
    for key, value in d.items():
      if key in out and out[key] != value:
        raise ValueError(f"{key!r} is set twice in one trial ({out[key]!r} and {value!r})")
      out[key] = value
  return out
