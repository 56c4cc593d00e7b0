"""Shared fixtures: tiny configs, a synthetic data set and a tiny run built once per session."""

import os
import shutil
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # Keras is the parity reference
# One BLAS thread per test process (read when numpy loads; subprocesses inherit it): xdist
# runs a process per core, and OpenBLAS threads spinning on a busy core made the pixel
# probes (sklearn's logistic regression) 20 times slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Tests run tiny models for a few steps: compile time dominates, so skip most of XLA's work, in
# this process and in the commands tests start (they inherit the environment).
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
# XLA's older per-op emitters compile the tests' CPU programs faster than its fusion emitters, to
# the same results (docs/performance.md, "The test suite"); tests that set a device count append.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_cpu_use_fusion_emitters=false"]).strip()
# Nor do tiny models gain from the commands' huge pages and block cache (xrayjax/hostmem), which
# cost them kernel time and a second start: tests/test_hostmem.py turns them on where it tests them.
os.environ.setdefault("XRAYJAX_HOSTMEM", "0")
if "numpy" in sys.modules:  # loaded before this file (by a plugin): limit it now
  import threadpoolctl
  threadpoolctl.threadpool_limits(int(os.environ["OPENBLAS_NUM_THREADS"]), user_api="blas")

import jax
import pytest

import tiny

jax.config.update("jax_disable_most_optimizations", True)  # in case jax was imported already


def pytest_configure(config):
  """Every run builds its jitted functions anew, so runs of one config compile the same
  programs again: a persistent compilation cache, fresh each session and one per xdist
  worker, compiles each of them once. The worker's commands (`python -m xrayjax.main` and
  others, run one after another or killed and resumed) read and fill it too, through the
  environment they inherit (two at once may write one entry: JAX recompiles an entry it
  cannot read). Set before anything compiles: JAX decides at its first compilation whether
  the cache is used."""
  config.xrayjax_jax_cache = tempfile.mkdtemp(prefix="xrayjax-test-jax-cache-")
  for name, value in (("jax_compilation_cache_dir", config.xrayjax_jax_cache),
                      ("jax_persistent_cache_min_compile_time_secs", 0),
                      ("jax_persistent_cache_min_entry_size_bytes", 0)):
    jax.config.update(name, value)
    os.environ[name.upper()] = str(value)


def pytest_collection_modifyitems(items):
  """The slow checks first: xdist hands the first tests out one per worker in turn, so they run
  side by side from the start instead of ending the session alone on one worker."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_unconfigure(config):
  shutil.rmtree(getattr(config, "xrayjax_jax_cache", ""), ignore_errors=True)


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def tiny_config(tfds_dir):
  """The `runlocal` config, lean (tiny.lean), reading the session's synthetic data."""
  return tiny.detl_config(tfds_dir)


@pytest.fixture(scope="session")
def tiny_run(tfds_dir, tmp_path_factory):
  """(workdir, results) of one `tiny_config` run, made once per session for the tests that
  only read it; a test that writes to a run directory takes `tiny_run_copy`."""
  from xrayjax import experiment
  workdir = str(tmp_path_factory.mktemp("tiny_run") / "run")
  return workdir, experiment.run(tiny.detl_config(tfds_dir), workdir)


@pytest.fixture
def tiny_run_copy(tiny_run, tmp_path):
  """A copy of the session's tiny run directory (files, checkpoints, mtimes) to write to."""
  workdir = str(tmp_path / "run")
  shutil.copytree(tiny_run[0], workdir)
  return workdir
