"""Data parallelism: one mesh axis over every device of every process.

The same code runs on one CPU, 8 simulated CPU devices, a GPU box or a TPU pod
slice: parameters are replicated, batches are split along `data`.
"""

from __future__ import annotations

import itertools
import os

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


# Process count and index of a job started by hand (JAX 0.10 reads only the coordinator's
# address, JAX_COORDINATOR_ADDRESS, from the environment; it detects all three on SLURM, Open
# MPI, Kubernetes and Cloud TPU).
NUM_PROCESSES_ENV = "XRAYJAX_NUM_PROCESSES"
PROCESS_ID_ENV = "XRAYJAX_PROCESS_ID"


def initialize_distributed(enabled: bool) -> None:
  """Starts jax.distributed when `enabled` (main.py's --distributed).

  On a cluster JAX finds the coordinator, the process count and this process's index itself.
  Elsewhere (several processes on one machine, hosts started by hand) give them in the
  environment of every process: JAX_COORDINATOR_ADDRESS=host:port (process 0's host),
  XRAYJAX_NUM_PROCESSES=n and XRAYJAX_PROCESS_ID=0..n-1. CPU processes exchange data through
  gloo, JAX's default CPU collectives.
  """
  if not enabled:
    return
  kwargs = {}
  for env, arg in ((NUM_PROCESSES_ENV, "num_processes"), (PROCESS_ID_ENV, "process_id")):
    value = os.environ.get(env)
    if value is not None:
      try:
        kwargs[arg] = int(value)
      except ValueError:
        raise ValueError(f"${env}={value!r} is not an integer") from None
  if len(kwargs) == 1:
    raise ValueError(f"set both ${NUM_PROCESSES_ENV} and ${PROCESS_ID_ENV} (or neither, on a "
                     "cluster JAX detects)")
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d global devices (%d local)",
               jax.process_index(), jax.process_count(), jax.device_count(),
               jax.local_device_count())


def barrier(name: str, timeout_seconds: float = 24 * 3600) -> None:
  """Waits until every process has reached the barrier `name` (a no-op in one process).

  For waits of unknown length, e.g. process 0 building a data set while the others wait.
  It goes through jax.distributed's coordination service (as orbax's barriers do; JAX has
  no public API for it): a device collective such as multihost_utils.sync_global_devices
  is, on CPU, a gloo collective, and gloo gives up after 30 s when it is the first one.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed
  distributed.global_state.client.wait_at_barrier(f"xrayjax:{name}",
                                                  int(timeout_seconds * 1000))


_SHARED = itertools.count()


def from_process_0(name: str, compute):
  """`compute()` run by process 0 alone, its value (picklable) handed to every process through
  jax.distributed's key-value store (one process: just `compute()`): for answers that are the
  same everywhere (the duplicate search over every image's hash, the run directory's lock).
  `compute` returns its errors as values: the others wait for its key."""
  if jax.process_count() == 1:
    return compute()
  import pickle
  from jax._src import distributed
  # (a key is set once: every process counts its calls, which all make in the same order)
  client, key = distributed.global_state.client, f"xrayjax:{name}:{next(_SHARED)}"
  if jax.process_index() == 0:
    value = compute()
    client.key_value_set_bytes(key, pickle.dumps(value))
    return value
  return pickle.loads(client.blocking_key_value_get_bytes(key, 3600 * 1000))


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D `data` mesh over `devices` (default: every device of every process).

  The axis is Auto: jit propagates shardings from the explicit in/out shardings. (Newer JAX
  defaults `make_mesh` to Explicit axes, under which e.g. Flax dropout's unsharded random
  mask fails to combine with sharded activations.)
  """
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                       devices=devices)


def is_local(mesh) -> bool:
  """Whether every device of `mesh` belongs to this process (always, in one process)."""
  return all(d.process_index == jax.process_index() for d in mesh.devices.flat)


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
