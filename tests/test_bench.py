"""The benchmark's own figures (in a subprocess: xrayjax.bench defines absl flags that other
command modules, imported by other tests, define too)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = """
import jax, numpy as np
from xrayjax import bench, kernels
runner = bench.JaxRunner("vgg16", np.zeros((2, 32, 32, 3), np.float32), np.zeros(2, np.int32),
                         width=0.125)
kernels._use_native = lambda x, w: False  # XLA's forms: its CPU cost analysis counts them
xla = jax.jit(lambda v, x: runner.model.apply(v, x, train=False)[0]).lower(
    runner.state.variables, runner.batch["image"]).compile().cost_analysis()["flops"]
assert kernels.native()
np.testing.assert_allclose(runner.forward_flops, xla, rtol=0.02)
unnamed = [t for t in kernels._TARGETS if bench._op_kind("custom-call", "", t) == t]
assert not unnamed, f"--profile has no op kind for {unnamed}"
"""


def test_forward_flops_and_profile_kinds_cover_the_native_kernels():
  # XLA's cost analysis counts no FLOPs in an FFI call: the count must still include them;
  # and `bench --profile` names each native kernel's op kind.
  done = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stderr[-2000:]
