"""The benchmark's own figures."""

import jax
import numpy as np

from xrayjax import bench, kernels


def test_forward_flops_count_the_convolutions_that_run_through_onednn(monkeypatch):
  # XLA's cost analysis counts no FLOPs in an FFI call: the count must still include them.
  x = np.zeros((2, 32, 32, 3), np.float32)
  y = np.zeros(2, np.int32)
  runner = bench.JaxRunner("vgg16", x, y, width=0.125)
  monkeypatch.setattr(kernels, "_use_native", lambda x, w: False)
  xla = jax.jit(lambda v, x: runner.model.apply(v, x, train=False)[0]).lower(
      runner.state.variables, runner.batch["image"]).compile().cost_analysis()["flops"]
  assert kernels.native()
  np.testing.assert_allclose(runner.forward_flops, xla, rtol=0.02)
