"""Data parallelism: one mesh axis over every device of every process.

The same code runs on one CPU, 8 simulated CPU devices, a GPU box or a TPU pod
slice: parameters are replicated, batches are split along `data`.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(enabled: bool) -> None:
  """Starts jax.distributed on multi-host jobs (cluster env is auto-detected)."""
  if enabled:
    jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d, %d global devices", jax.process_index(),
                 jax.process_count(), jax.device_count())


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D `data` mesh over `devices` (default: every device of every process).

  The axis is Auto: jit propagates shardings from the explicit in/out shardings. (Newer JAX
  defaults `make_mesh` to Explicit axes, under which e.g. Flax dropout's unsharded random
  mask fails to combine with sharded activations.)
  """
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                       devices=devices)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh, what: str) -> None:
  n = mesh.devices.size
  if global_batch % n or global_batch % jax.process_count():
    raise ValueError(f"{what}={global_batch} must be a multiple of the {n} devices "
                     f"(and {jax.process_count()} processes); change it in the config")


def to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """This process's share of a batch -> global arrays sharded over `data`."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
