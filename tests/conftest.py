"""Shared fixtures: tiny configs and a synthetic data set built once per session."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # Keras is the parity reference

import jax
import pytest

from configs import detl

# Tests run tiny models for a few steps: compile time dominates, so skip most of XLA's work.
jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def tiny_config(tfds_dir):
  """The `runlocal` config, reading the session's synthetic data."""
  c = detl.get_config("runlocal")
  c.data.tfds_dir = tfds_dir
  return c
