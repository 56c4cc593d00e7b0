r"""Training and inference throughput of xrayjax models against their Keras twins.

  python -m xrayjax.bench                       # every model, 224 px, batch 16, Nadam
  python -m xrayjax.bench --models=resnet50 --rounds=5 --image_size=128
  python -m xrayjax.bench --gradcam             # Grad-CAM of a batch against a train step

For each model, one run alternates rounds of xrayjax training steps (the jitted,
donating `train.make_train_step` that experiments use) and Keras training steps
(`train_on_batch` on the keras.applications model, or the concat authors' layer
sequence) with the same architecture, input, batch and optimizer, so both see
the same machine state. It prints the median images/s of each and their ratio,
inference images/s, the first-step (compile) time, the model's FLOPs per image
(XLA's cost analysis of the forward pass) and the fraction of this machine's
measured float32 matmul peak that xrayjax's training reaches (training taken as
3x the forward FLOPs). The last lines are a Markdown table for the README.

Keras runs on TensorFlow with its defaults (`jit_compile="auto"`); it is the
reference only here and in the parity tests, never a dependency of training.
"""

from __future__ import annotations

import os
import statistics
import time

from absl import app, flags

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from xrayjax import models, train  # noqa: E402

BENCH_MODELS = ("vgg16", "resnet50", "resnet50v2", "xception", "concat")
FLAGS = flags.DEFINE_list("models", list(BENCH_MODELS), f"models to measure, of {BENCH_MODELS}")
IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "input size (square)")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "images per training step")
ROUNDS = flags.DEFINE_integer("rounds", 3, "alternating rounds per model")
STEPS = flags.DEFINE_integer("steps", 3, "timed training steps per round and framework")
GRADCAM = flags.DEFINE_bool("gradcam", False,
                            "measure Grad-CAM of a batch (one jitted call, gradcam and "
                            "gradcam++) against one training step instead of Keras")
CLASSES = 3
LR = 1e-4  # paper 2's Nadam


def keras_model(name: str, size: int):
  import keras
  shape = (size, size, 3)
  if name == "concat":
    inp = keras.Input(shape)
    x1 = keras.applications.Xception(weights=None, include_top=False, input_tensor=inp)
    x2 = keras.applications.ResNet50V2(weights=None, include_top=False, input_tensor=inp)
    x = keras.layers.Conv2D(1024, (1, 1))(keras.layers.concatenate([x1.output, x2.output]))
    x = keras.layers.Dropout(0.5)(keras.layers.Flatten()(x))
    return keras.Model(inp, keras.layers.Dense(CLASSES)(x))
  make = {"vgg16": keras.applications.VGG16, "resnet50": keras.applications.ResNet50,
          "resnet50v2": keras.applications.ResNet50V2, "xception": keras.applications.Xception}
  return make[name](weights=None, input_shape=shape, classes=CLASSES, classifier_activation=None)


class KerasRunner:
  def __init__(self, name, x, y):
    import keras
    self.model = keras_model(name, x.shape[1])
    self.model.compile(optimizer=keras.optimizers.Nadam(LR),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    self.x, self.y = x, y

  def train_step(self):
    self.model.train_on_batch(self.x, self.y)

  def infer(self):
    self.model.predict_on_batch(self.x)


class JaxRunner:
  def __init__(self, name, x, y):
    self.model = models.build(name, CLASSES, {"width": 1.0})
    variables = self.model.init(jax.random.PRNGKey(0), x[:1], train=False)
    tx = optax.nadam(LR)
    self.state = jax.jit(lambda v: train.TrainState.create(v, tx))(variables)
    self.step_fn = jax.jit(train.make_train_step(self.model, tx), donate_argnums=0)
    self.key = jax.random.PRNGKey(1)
    self.predict_fn = jax.jit(lambda v, x: self.model.apply(v, x, train=False)[0])
    self.batch = {"image": jnp.asarray(x), "label": jnp.asarray(y)}
    t = time.perf_counter()
    self.train_step()
    self.compile_seconds = time.perf_counter() - t
    lowered = jax.jit(lambda v, x: self.model.apply(v, x, train=False)[0]).lower(
        self.state.variables, self.batch["image"])
    self.forward_flops = float(lowered.compile().cost_analysis().get("flops", float("nan")))

  def train_step(self):
    self.state, metrics = self.step_fn(self.state, self.batch, self.key)
    jax.block_until_ready(metrics)

  def infer(self):
    jax.block_until_ready(self.predict_fn(self.state.variables, self.batch["image"]))


def _rate(fn, steps: int, batch: int) -> float:
  """Images/s over `steps` calls, after one untimed call: the first step after the other
  framework ran is 10-25% slower for either (measured; shared caches and threads)."""
  fn()
  t = time.perf_counter()
  for _ in range(steps):
    fn()
  return steps * batch / (time.perf_counter() - t)


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
  """Best measured float32 FLOP/s of an n x n matmul on this machine's JAX CPU backend."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(a))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(a))
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def measure(name: str, size: int, batch: int, rounds: int, steps: int) -> dict:
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  y = rng.integers(0, CLASSES, batch).astype(np.int32)
  mine = JaxRunner(name, x, y)
  t = time.perf_counter()
  theirs = KerasRunner(name, x, y)
  theirs.train_step()
  keras_compile = time.perf_counter() - t
  train_j, train_k, infer_j, infer_k = [], [], [], []
  for r in range(rounds):
    train_j.append(_rate(mine.train_step, steps, batch))
    train_k.append(_rate(theirs.train_step, steps, batch))
    infer_j.append(_rate(mine.infer, steps, batch))
    infer_k.append(_rate(theirs.infer, steps, batch))
    print(f"  {name} round {r + 1}/{rounds}: train xrayjax {train_j[-1]:.2f} img/s, "
          f"keras {train_k[-1]:.2f} img/s", flush=True)
  med = statistics.median
  return {"model": name, "train_jax": med(train_j), "train_keras": med(train_k),
          "infer_jax": med(infer_j), "infer_keras": med(infer_k),
          "compile_jax": mine.compile_seconds, "compile_keras": keras_compile,
          "gflops_per_image": mine.forward_flops / batch / 1e9}


def measure_gradcam(name: str, size: int, batch: int, rounds: int, steps: int) -> dict:
  """Seconds per batch of a training step and of Grad-CAM / Grad-CAM++ (medians)."""
  from xrayjax.evaluate import gradcam
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, size, size, 1)).astype(np.float32)
  y = rng.integers(0, CLASSES, batch).astype(np.int32)
  mine = JaxRunner(name, x, y)  # its train step donates the state: read variables afresh
  images, classes = jnp.asarray(x), jnp.full((batch,), -1, jnp.int32)
  out = {"model": name}
  fns = {m: gradcam.make_fn(mine.model, "features", m) for m in gradcam.METHODS}
  for m, fn in fns.items():
    t = time.perf_counter()
    jax.block_until_ready(fn(mine.state.variables, images, classes))
    out[f"compile_{m}"] = time.perf_counter() - t
  times = {"train": [], **{m: [] for m in fns}}
  for r in range(rounds):
    times["train"].append(batch / _rate(mine.train_step, steps, batch))
    for m, fn in fns.items():
      times[m].append(batch / _rate(lambda: jax.block_until_ready(
          fn(mine.state.variables, images, classes)), steps, batch))
    print(f"  {name} round {r + 1}/{rounds}: train step {times['train'][-1]:.3f} s, "
          + ", ".join(f"{m} {times[m][-1]:.3f} s" for m in fns), flush=True)
  out.update({k: statistics.median(v) for k, v in times.items()})
  return out


def gradcam_table(rows: list[dict], size: int, batch: int) -> str:
  lines = [f"Grad-CAM of a batch in one jitted call against one training step, {size} px, "
           f"batch {batch}, float32, target `features`; {jax.device_count()} CPU device(s), "
           f"{os.cpu_count()} cores.", "",
           "| model | train step s | Grad-CAM s | ratio | Grad-CAM++ s | ratio |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['train']:.3f} | {r['gradcam']:.3f} | "
                 f"{r['gradcam'] / r['train']:.2f}x | {r['gradcam++']:.3f} | "
                 f"{r['gradcam++'] / r['train']:.2f}x |")
  return "\n".join(lines)


def table(rows: list[dict], peak: float, size: int, batch: int) -> str:
  lines = [f"Training and inference throughput, {size} px, batch {batch}, Nadam, float32; "
           f"{jax.device_count()} CPU device(s), {os.cpu_count()} cores, measured matmul peak "
           f"{peak / 1e9:.1f} GFLOP/s.", "",
           "| model | train img/s xrayjax | train img/s Keras | ratio | infer img/s xrayjax | "
           "infer img/s Keras | first step s xrayjax / Keras | GFLOPs/img (fwd) | "
           "% of matmul peak (train) |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    achieved = 3 * r["gflops_per_image"] * 1e9 * r["train_jax"] / peak
    lines.append(
        f"| {r['model']} | {r['train_jax']:.2f} | {r['train_keras']:.2f} | "
        f"{r['train_jax'] / r['train_keras']:.2f}x | {r['infer_jax']:.2f} | "
        f"{r['infer_keras']:.2f} | {r['compile_jax']:.1f} / {r['compile_keras']:.1f} | "
        f"{r['gflops_per_image']:.2f} | {100 * achieved:.0f}% |")
  return "\n".join(lines)


def main(argv):
  del argv
  unknown = set(FLAGS.value) - set(BENCH_MODELS)
  if unknown:
    raise app.UsageError(f"unknown models {sorted(unknown)}; choose from {BENCH_MODELS}")
  print(f"jax {jax.__version__} on {jax.devices()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        flush=True)
  if GRADCAM.value:
    rows = [measure_gradcam(n, IMAGE_SIZE.value, BATCH_SIZE.value, ROUNDS.value, STEPS.value)
            for n in FLAGS.value]
    print(gradcam_table(rows, IMAGE_SIZE.value, BATCH_SIZE.value))
    return
  peak = matmul_peak()
  rows = []
  for name in FLAGS.value:
    rows.append(measure(name, IMAGE_SIZE.value, BATCH_SIZE.value, ROUNDS.value, STEPS.value))
  print(table(rows, peak, IMAGE_SIZE.value, BATCH_SIZE.value))


if __name__ == "__main__":
  app.run(main)
