"""The benchmark's own figures (in a subprocess: xrayjax.bench defines absl flags that other
command modules, imported by other tests, define too)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA's cost analysis counts no FLOPs in an FFI call: the count must still include them;
# `bench --profile` names each native kernel's op kind; the table's ratios and intervals.
CHECK = """
import jax, numpy as np
from xrayjax import bench, kernels
runner = bench.JaxRunner("vgg16", np.zeros((2, 32, 32, 3), np.float32), np.zeros(2, np.int32),
                         width=0.125)
# XLA's forms for the reference count (its cost analysis counts their FLOPs), then ours again.
use_native, kernels._use_native = kernels._use_native, lambda x, w: False
xla = jax.jit(lambda v, x: runner.model.apply(v, x, train=False)[0]).lower(
    runner.state.variables, runner.batch["image"]).compile().cost_analysis()["flops"]
kernels._use_native = use_native
assert kernels.native()
np.testing.assert_allclose(runner.forward_flops, xla, rtol=0.02)
unnamed = [t for t in kernels._TARGETS if bench._op_kind("custom-call", "", t) == t]
assert not unnamed, f"--profile has no op kind for {unnamed}"
# Paired ratios: the geometric mean of the rounds' ratios, a t-interval on the log scale.
np.testing.assert_allclose(bench.paired_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]), (2, 2, 2))
half = 12.706205 * np.std([0.1, 0.3], ddof=1) / np.sqrt(2)  # t(0.975, 1 df)
np.testing.assert_allclose(bench.paired_ratio(np.exp([0.1, 0.3]) * 5, [5.0, 5.0]),
                           np.exp([0.2, 0.2 - half, 0.2 + half]), rtol=1e-6)
assert np.isnan(bench.paired_ratio([3.0], [2.0])[1])
assert bench._ratio((1.5, np.nan, np.nan)) == "1.50x"
assert bench._ratio((1.04, 0.97, 1.115)) == "1.04x [0.97, 1.11]"
"""


MEASURE = """
import sys
import numpy as np
from xrayjax import bench
peaks = []
row = bench.measure("vgg16", 32, 2, rounds=2, steps=1, peaks=peaks)
for key in ("train_jax", "train_keras", "infer_jax", "infer_keras", "compile_jax",
            "compile_keras", "gflops_per_image"):
  assert row[key] > 0, (key, row)
assert all(np.isfinite(row["train_ratio"])) and len(peaks) == 2 and min(peaks) > 0, (row, peaks)
assert row["keras"].startswith("TensorFlow 2.") and "oneDNN ops o" in row["keras"], row
# Each framework ran in a process of its own: this one never loaded TensorFlow.
assert "tensorflow" not in sys.modules and "keras" not in sys.modules
try:
  bench.measure("no_such_model", 32, 2, rounds=1, steps=1, peaks=[])
except RuntimeError as e:
  assert "the jax benchmark process ended (exit code 1)" in str(e), e
else:
  raise AssertionError("a failed worker went unnoticed")
"""


def test_flops_profile_kinds_ratios_and_each_framework_in_its_own_process():
  # One process for both scripts: each Python process starts by importing JAX for seconds.
  done = subprocess.run([sys.executable, "-c", CHECK + MEASURE], cwd=ROOT, capture_output=True,
                        text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stderr[-3000:]
  assert "no_such_model" in done.stderr  # the worker's own error, printed by its process
