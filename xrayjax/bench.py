r"""Training and inference throughput of xrayjax models against their Keras twins.

  python -m xrayjax.bench                       # every model, 224 px, batch 16, Nadam
  python -m xrayjax.bench --models=resnet50 --rounds=5 --image_size=128
  python -m xrayjax.bench --gradcam             # Grad-CAM of a batch against a train step
  python -m xrayjax.bench --pipeline            # the input pipeline against the model's step
  python -m xrayjax.bench --memory              # peak memory of training, against Keras
  python -m xrayjax.bench --profile             # where the training step's time goes
  python -m xrayjax.bench --layers              # each conv pass: oneDNN against XLA's form

For each model, one run alternates rounds of xrayjax training steps (the jitted,
donating `train.make_train_step` that experiments use) and Keras training steps
(`train_on_batch` on the keras.applications model, or the concat authors' layer
sequence) with the same architecture, input, batch and optimizer, so both see
the same machine state; each framework runs in a process of its own, as a run would, so
neither sees the other's allocations or threads. It prints the median images/s of each,
training and inference, and their ratios: the geometric mean of the rounds' paired ratios
with a 95% t-interval over the rounds (`paired_ratio`; five rounds give an interval about
half as wide as three), the first-step (compile) time, the model's FLOPs per image
(XLA's cost analysis of the forward pass), the fraction of this machine's float32
matmul peak that xrayjax's training reaches (training taken as 3x the forward
FLOPs; the peak is measured in every round, between the steps, and the highest
reading is used, since one reading alone varies by 2x here). The last lines are a
Markdown table for docs/performance.md; the first say which CPU convolutions ran
(`xrayjax.kernels.status`), and the line before the table whether TensorFlow ran Keras's
ops through oneDNN (`keras_status`: by default only on CPUs with AVX512_VNNI, AVX512_BF16
or AMX; `TF_ENABLE_ONEDNN_OPTS=1` turns them on elsewhere).

`--memory` prints instead the peak resident memory of a process that builds the model
and trains it for two steps, in each framework (each in a fresh subprocess, so neither
sees the other's allocations), and how much of it the model and its steps added to the
process after its imports.

`--pipeline` times the tf.data input pipeline (`pipeline.train_batches` on cached,
resized images, with the configs' augmentation and TensorFlow's threads as runs set
them) against the images/s each model's training step consumes: at demo scale (128 px
synthetic images at 96 px, 1/8 width, batch 32) and at 224 px from decoded 256 px
images (full width, batch 16).

`--partition_memory=1,2,8 --tfds_dir=DIR` measures, for one epoch of a training partition
and one pass over a validation partition (`--val_images`; synthetic films built in DIR at
`--film_size`; `--patients` sets their number), the peak resident memory and the time to the
first batch of each of P processes started at once, with the partitions cached in every
process and streamed (`pipeline.Stream`: each process decodes its share; `--partition_modes`).

`--profile` traces `--steps` training steps of each model with `jax.profiler` and sums the
time of XLA's ops per kind (convolutions, the native kernels, BatchNorm, pooling, layout
copies, the optimizer) and per pass: forward, backward (the transposed jvp) or update. Each op
of the compiled step is named in the trace; its kind and pass come from the JAX source it was
lowered from (`op_name` in the compiled HLO; a fusion counts under the op at its root, so a
ReLU fused into BatchNorm's normalisation counts as BatchNorm). The two threads' op times are
summed, so the seconds are CPU seconds, not wall time.

Keras runs on TensorFlow with its defaults (`jit_compile="auto"`); it is the
reference only here and in the parity tests, never a dependency of training.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from scipy import stats  # noqa: E402

from xrayjax import hostmem, infer, kernels, models, train  # noqa: E402

BENCH_MODELS = ("vgg16", "resnet50", "resnet50v2", "xception", "concat")
FLAGS = flags.DEFINE_list("models", list(BENCH_MODELS), f"models to measure, of {BENCH_MODELS}")
IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "input size (square)")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "images per training step")
ROUNDS = flags.DEFINE_integer("rounds", 3, "alternating rounds per model")
STEPS = flags.DEFINE_integer("steps", 3, "timed training steps per round and framework")
GRADCAM = flags.DEFINE_bool("gradcam", False,
                            "measure Grad-CAM of a batch (one jitted call per method: "
                            "gradcam, gradcam++, hirescam) against one training step "
                            "instead of Keras")
LAYERS = flags.DEFINE_bool("layers", False, "time each pass of the models' convolution layers, "
                           "oneDNN (xrayjax.kernels.conv) against XLA's form, at --batch_size")
PIPELINE = flags.DEFINE_bool("pipeline", False,
                              "time the input pipeline against each model's training step")
PROFILE = flags.DEFINE_bool("profile", False, "where a training step's time goes: XLA's ops "
                            "traced with jax.profiler, summed per kind of op, forward and backward")
MEMORY = flags.DEFINE_bool("memory", False, "measure each framework's peak memory per model "
                           "(two fresh subprocesses per model) instead of the throughput")
_PROBE = flags.DEFINE_string("probe_memory", None, "internal: FRAMEWORK:MODEL, print the peak "
                             "memory of two training steps as JSON")
PARTITION = flags.DEFINE_list(
    "partition_memory", [], "process counts, e.g. 1,2,8: peak memory and time to the first "
    "batch of one epoch of a training partition (and a pass over a validation partition of "
    "--val_images), cached and streamed, in that many processes at once (synthetic films "
    "built in --tfds_dir at --film_size, trained at --image_size)")
PARTITION_MODES = flags.DEFINE_list("partition_modes", ["cached", "streamed"],
                                    "--partition_memory: which ways to hold the partitions")
TFDS_DIR = flags.DEFINE_string("tfds_dir", None, "--partition_memory: where the films are built")
PATIENTS = flags.DEFINE_list("patients", ["2500", "60", "2500", "60"],
                             "--partition_memory: synthetic patients per class")
FILM_SIZE = flags.DEFINE_integer("film_size", 256, "--partition_memory: the films' stored size")
VAL_IMAGES = flags.DEFINE_integer("val_images", 0, "--partition_memory: the cohort's last rows "
                                  "that form the validation partition (the rest train)")
_PROBE_PARTITION = flags.DEFINE_string("probe_partition", None,
                                       "internal: MODE:P:COUNT, one process's epoch as JSON")
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


def keras_status() -> str:
  """Whether TensorFlow runs Keras's ops through oneDNN in this process. TensorFlow turns
  them on by default only on CPUs with AVX512_VNNI, AVX512_BF16 or AMX (older ones, AVX2's
  included, run Eigen's kernels); TF_ENABLE_ONEDNN_OPTS=1 or 0 decides otherwise."""
  import tensorflow as tf
  from tensorflow.python.util import _pywrap_util_port  # the switch TensorFlow itself reads
  switch = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
  why = f"TF_ENABLE_ONEDNN_OPTS={switch}" if switch is not None else "its default on this CPU"
  on = "on" if _pywrap_util_port.IsMklEnabled() else "off"
  return f"TensorFlow {tf.__version__}, oneDNN ops {on} ({why})"


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
  def __init__(self, name, x, y, width: float = 1.0):
    self.model = models.build(name, CLASSES, {"width": width})
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
    # Counted on the program lowered for a GPU, whose convolutions are XLA's: XLA's cost
    # analysis counts no FLOPs in the CPU's oneDNN calls.
    lowered = jax.jit(lambda v, x: self.model.apply(v, x, train=False)[0]).trace(
        self.state.variables, self.batch["image"]).lower(lowering_platforms=("cuda",))
    self.forward_flops = float(lowered.cost_analysis().get("flops", float("nan")))

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


def matmul_peak(n: int = 2048, repeats: int = 3) -> float:
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


def _max_rss_mb() -> float:
  """This process's peak resident memory. Linux's VmHWM starts afresh at exec; ru_maxrss
  would carry the high-water mark of the (large) benchmark process that forked it."""
  try:
    for line in open("/proc/self/status"):
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024  # kB
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def probe_memory(framework: str, name: str, size: int, batch: int) -> dict:
  """Peak resident memory (MB) of this process: after importing and making the batch, and
  after building `name` and two training steps in `framework` (run in a fresh process)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  y = rng.integers(0, CLASSES, batch).astype(np.int32)
  if framework == "keras":
    import keras  # noqa: F401  (its import is part of the baseline)
  before = _max_rss_mb()
  runner = (KerasRunner if framework == "keras" else JaxRunner)(name, x, y)
  runner.train_step()
  runner.train_step()
  return {"baseline_mb": before, "peak_mb": _max_rss_mb()}


def peak_memory(framework: str, name: str, size: int, batch: int) -> dict:
  cmd = [sys.executable, "-m", "xrayjax.bench", f"--probe_memory={framework}:{name}",
         f"--image_size={size}", f"--batch_size={batch}"]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def _serve(conn, framework: str, name: str, size: int, batch: int) -> None:
  """One framework's runner, in a process of its own: sends its first-step time and FLOPs,
  then answers each request (kind, steps) of `measure` until it gets None."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  y = rng.integers(0, CLASSES, batch).astype(np.int32)
  if framework == "keras":
    t = time.perf_counter()
    runner = KerasRunner(name, x, y)
    runner.train_step()
    conn.send({"compile": time.perf_counter() - t, "status": keras_status()})
  else:
    runner = JaxRunner(name, x, y)
    conn.send({"compile": runner.compile_seconds, "forward_flops": runner.forward_flops})
  while (request := conn.recv()) is not None:
    kind, steps = request
    conn.send(matmul_peak() if kind == "peak" else _rate(getattr(runner, kind), steps, batch))


class _Worker:
  """A `_serve` process (spawned: a fresh interpreter, not a fork of this one), ended when
  its `with` block ends."""

  def __init__(self, framework: str, name: str, size: int, batch: int):
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    self.framework = framework
    self.conn, child = ctx.Pipe()
    self.process = ctx.Process(target=_serve, args=(child, framework, name, size, batch),
                               daemon=True)
    self.process.start()
    child.close()
    self.info = self._recv()

  def _recv(self):
    try:
      return self.conn.recv()
    except EOFError:
      self.process.join()
      raise RuntimeError(f"the {self.framework} benchmark process ended (exit code "
                         f"{self.process.exitcode}); its error is above") from None

  def __call__(self, kind: str, steps: int = 0):
    self.conn.send((kind, steps))
    return self._recv()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self.process.is_alive():
      self.conn.send(None)
    self.process.join()


def measure(name: str, size: int, batch: int, rounds: int, steps: int, peaks: list) -> dict:
  """`peaks` gets a matmul peak reading per round (between the steps of the two frameworks).
  Each framework runs in a process of its own, as a run would, and the rounds alternate
  between them. In one shared process, Keras's allocations made the block cache (hostmem)
  map xrayjax's blocks afresh every round, which a run never pays (docs/performance.md)."""
  train_j, train_k, infer_j, infer_k = [], [], [], []
  with _Worker("jax", name, size, batch) as mine, _Worker("keras", name, size, batch) as theirs:
    for r in range(rounds):
      train_j.append(mine("train_step", steps))
      peaks.append(mine("peak"))
      train_k.append(theirs("train_step", steps))
      infer_j.append(mine("infer", steps))
      infer_k.append(theirs("infer", steps))
      print(f"  {name} round {r + 1}/{rounds}: train xrayjax {train_j[-1]:.2f} img/s, "
            f"keras {train_k[-1]:.2f} img/s; infer xrayjax {infer_j[-1]:.2f}, keras "
            f"{infer_k[-1]:.2f}", flush=True)
  med = statistics.median
  return {"model": name, "train_jax": med(train_j), "train_keras": med(train_k),
          "infer_jax": med(infer_j), "infer_keras": med(infer_k),
          "train_ratio": paired_ratio(train_j, train_k),
          "infer_ratio": paired_ratio(infer_j, infer_k),
          "compile_jax": mine.info["compile"], "compile_keras": theirs.info["compile"],
          "gflops_per_image": mine.info["forward_flops"] / batch / 1e9,
          "keras": theirs.info["status"]}


def paired_ratio(ours, theirs, level: float = 0.95) -> tuple[float, float, float]:
  """(ratio, low, high): the geometric mean of the rounds' ratios ours[r] / theirs[r] (each
  round times both frameworks back to back, so a round's machine state cancels in its ratio)
  and its `level` t-interval over the rounds on the log scale; (ratio, nan, nan) from one
  round. A target such as 1.1x is met where the interval's low end is above it."""
  logs = np.log(np.asarray(ours, float) / np.asarray(theirs, float))
  mean = float(np.mean(logs))
  if len(logs) < 2:
    return float(np.exp(mean)), float("nan"), float("nan")
  half = stats.t.ppf(0.5 + level / 2, len(logs) - 1) * np.std(logs, ddof=1) / np.sqrt(len(logs))
  return float(np.exp(mean)), float(np.exp(mean - half)), float(np.exp(mean + half))


def _ratio(r: tuple[float, float, float]) -> str:
  return f"{r[0]:.2f}x" + ("" if np.isnan(r[1]) else f" [{r[1]:.2f}, {r[2]:.2f}]")


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
    jax.block_until_ready(fn(mine.state.variables, {"image": images, "class": classes}))
    out[f"compile_{m}"] = time.perf_counter() - t
  times = {"train": [], **{m: [] for m in fns}}
  for r in range(rounds):
    times["train"].append(batch / _rate(mine.train_step, steps, batch))
    for m, fn in fns.items():
      times[m].append(batch / _rate(lambda: jax.block_until_ready(
          fn(mine.state.variables, {"image": images, "class": classes})), steps, batch))
    print(f"  {name} round {r + 1}/{rounds}: train step {times['train'][-1]:.3f} s, "
          + ", ".join(f"{m} {times[m][-1]:.3f} s" for m in fns), flush=True)
  out.update({k: statistics.median(v) for k, v in times.items()})
  return out


def gradcam_table(rows: list[dict], size: int, batch: int) -> str:
  from xrayjax.evaluate import gradcam
  lines = [f"Grad-CAM of a batch in one jitted call against one training step, {size} px, "
           f"batch {batch}, float32, target `features`; {jax.device_count()} CPU device(s), "
           f"{os.cpu_count()} cores.", "",
           "| model | train step s | " + " | ".join(f"{m} s | ratio" for m in gradcam.METHODS)
           + " |", "|---|---|" + "---|---|" * len(gradcam.METHODS)]
  for r in rows:
    lines.append(f"| {r['model']} | {r['train']:.3f} | " + " | ".join(
        f"{r[m]:.3f} | {r[m] / r['train']:.2f}x" for m in gradcam.METHODS) + " |")
  return "\n".join(lines)


# Convolution layers of the models at 224 px: (input h = w, Ci, Co, kernel, stride, padding,
# groups). Depthwise convs have groups = Ci = Co.
CONV_LAYERS = {
    "vgg16 conv1_2": (224, 64, 64, 3, 1, 1, 1),
    "vgg16 conv3_2": (56, 256, 256, 3, 1, 1, 1),
    "vgg16 conv5_2": (14, 512, 512, 3, 1, 1, 1),
    "resnet50 stem 7x7/2": (224, 3, 64, 7, 2, 3, 1),
    "resnet50 3x3 @28": (28, 128, 128, 3, 1, 1, 1),
    "resnet50v2 3x3/2 @56": (56, 64, 64, 3, 2, 1, 1),
    "xception depthwise 256 @55": (55, 256, 256, 3, 1, 1, 256),
    "xception depthwise 728 @14": (14, 728, 728, 3, 1, 1, 728),
}


def measure_layers(batch: int, rounds: int) -> str:
  """Median ms of each pass of each layer, oneDNN against XLA's form, alternated per round."""
  lines = [f"Each pass of the models' convolutions, batch {batch}, median of {rounds} rounds "
           f"(oneDNN and XLA alternated), {os.cpu_count()} cores; XLA's form is what runs "
           "without oneDNN (a depthwise conv: fused shifted sums).", "",
           "| layer | GFLOP | forward ms oneDNN / XLA | ratio | input gradient ms | ratio "
           "| weight gradient ms | ratio |", "|---|---|---|---|---|---|---|---|"]
  rng = np.random.default_rng(0)
  for name, (h, ci, co, k, s, p, groups) in CONV_LAYERS.items():
    x = jnp.asarray(rng.standard_normal((batch, h, h, ci), np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, ci // groups, co), np.float32) * 0.05)
    pad = ((p, p), (p, p))
    forms = {"oneDNN": lambda x, w: kernels.conv(x, w, s, pad, groups),
             "XLA": lambda x, w: kernels._conv_xla(x, w, s, pad, groups)}  # pylint: disable=protected-access
    g = jnp.ones(jax.eval_shape(forms["XLA"], x, w).shape, jnp.float32)
    passes = {}
    for form, f in forms.items():
      passes[form] = [
          jax.jit(f),
          jax.jit(lambda x, w, f=f: jax.vjp(lambda x: f(x, w), x)[1](g)[0]),
          jax.jit(lambda x, w, f=f: jax.vjp(lambda w: f(x, w), w)[1](g)[0])]
    times = {(form, i): [] for form in forms for i in range(3)}
    for fn in (fn for fs in passes.values() for fn in fs):
      fn(x, w).block_until_ready()  # compile, create the primitives
    for r in range(rounds):
      for form in (forms if r % 2 == 0 else reversed(forms)):
        for i, fn in enumerate(passes[form]):
          t = time.perf_counter()
          fn(x, w).block_until_ready()
          times[form, i].append(time.perf_counter() - t)
    med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
    ho = (h + 2 * p - k) // s + 1
    gflop = 2 * batch * ho * ho * co * k * k * (ci // groups) / 1e9
    lines.append(f"| {name} | {gflop:.2f} | " + " | ".join(
        f"{med['oneDNN', i]:.1f} / {med['XLA', i]:.1f} | {med['oneDNN', i] / med['XLA', i]:.2f}"
        for i in range(3)) + " |")
    print(lines[-1], flush=True)
  return "\n".join(lines)


# The kind of an op of the compiled step, from its JAX primitive and the modules it came from.
def _op_kind(opcode: str, op_name: str, target: str) -> str:
  if target:
    return {"xrayjax_pointwise_weight_grad": "1x1 conv weight gradient (native)",
            "xrayjax_dnnl_conv_fwd": "conv forward (oneDNN)",
            "xrayjax_dnnl_conv_bias_relu_fwd": "conv forward (oneDNN)",  # + bias and ReLU
            "xrayjax_dnnl_conv_bwd_data": "conv input gradient (oneDNN)",
            "xrayjax_dnnl_conv_bwd_weights": "conv weight gradient (oneDNN)",
            "xrayjax_dnnl_max_pool_fwd": "max pooling (oneDNN)",
            "xrayjax_dnnl_max_pool_bwd": "max pooling (oneDNN)",
            "xrayjax_threefry2x32": "random bits (native Threefry)"}.get(target, target)
  parts = op_name.split("/")
  prim, modules = parts[-1], parts[:-1]
  if opcode in ("copy", "transpose") or prim in ("transpose", "copy"):
    return "layout copies"
  if "jvp(" not in op_name:
    return "optimizer update and loss"
  if prim in ("conv_general_dilated", "dot_general"):
    return "conv and matmul (XLA)"
  if prim.startswith(("reduce_window", "select_and_scatter")) or any("pool" in m for m in modules):
    return "max pooling (XLA)"
  if any(m.endswith("bn") or "batch_norm" in m or "relu" in m for m in modules):
    return "BatchNorm and ReLU"
  return "other elementwise"


def _hlo_ops(hlo: str) -> dict[str, tuple[str, str, str]]:
  """Instruction name -> (opcode, op_name, custom-call target) for the entry computation; an
  instruction without op_name (XLA's wrapped fusions) takes the first one its body names."""
  first_name = {}
  for comp in re.finditer(r"^%?([\w.-]+) [^\n]*\{\n(.*?)^\}", hlo, re.M | re.S):
    found = re.search(r'op_name="([^"]*)"', comp.group(2))
    if found:
      first_name[comp.group(1)] = found.group(1)
  entry = hlo[hlo.index("\nENTRY"):]
  ops = {}
  for line in entry.splitlines():
    m = re.match(r"\s*(?:ROOT )?%([\w.-]+) = .*?\s([a-z-]+)\(", line)
    if not m:
      continue
    name = re.search(r'op_name="([^"]*)"', line)
    calls = re.search(r"calls=%([\w.-]+)", line)
    op_name = name.group(1) if name else first_name.get(calls.group(1), "") if calls else ""
    target = re.search(r'custom_call_target="([^"]*)"', line)
    ops[m.group(1)] = (m.group(2), op_name, target.group(1) if target else "")
  return ops


def profile(name: str, size: int, batch: int, steps: int) -> dict:
  """CPU seconds per training step of each (kind, pass), from a jax.profiler trace."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  y = rng.integers(0, CLASSES, batch).astype(np.int32)
  mine = JaxRunner(name, x, y)
  ops = _hlo_ops(mine.step_fn.lower(mine.state, mine.batch, mine.key).compile().as_text())
  mine.train_step()
  with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    with jax.profiler.trace(tmp):
      for _ in range(steps):
        mine.train_step()
    wall = (time.perf_counter() - t) / steps
    trace = jax.profiler.ProfileData.from_file(
        glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0])
  seconds = collections.Counter()
  for plane in trace.planes:
    for line in plane.lines if plane.name == "/host:CPU" else ():
      for event in line.events:
        if event.name in ops:
          opcode, op_name, target = ops[event.name]
          stage = ("backward" if "transpose(" in op_name else
                   "forward" if "jvp(" in op_name or target else "update")
          seconds[_op_kind(opcode, op_name, target), stage] += event.duration_ns / 1e9 / steps
  return {"model": name, "wall": wall, "seconds": seconds}


def profile_table(result: dict) -> str:
  seconds, total = result["seconds"], sum(result["seconds"].values())
  kinds = sorted({k for k, _ in seconds}, key=lambda k: -sum(
      v for (kind, _), v in seconds.items() if kind == k))
  lines = [f"{result['model']}: training step {result['wall']:.2f} s wall, {total:.2f} s of "
           "XLA ops (CPU seconds, both threads)", "",
           "| op kind | forward s | backward s | update s | share |", "|---|---|---|---|---|"]
  for kind in kinds:
    row = [seconds.get((kind, stage), 0.0) for stage in ("forward", "backward", "update")]
    lines.append(f"| {kind} | " + " | ".join(f"{v:.2f}" if v else "" for v in row)
                 + f" | {100 * sum(row) / total:.0f}% |")
  return "\n".join(lines)


def table(rows: list[dict], peak: float, size: int, batch: int) -> str:
  lines = [f"Training and inference throughput, {size} px, batch {batch}, Nadam, float32; "
           f"{jax.device_count()} CPU device(s), {os.cpu_count()} cores, matmul peak "
           f"{peak / 1e9:.1f} GFLOP/s (highest reading).", "",
           "| model | train img/s xrayjax | train img/s Keras | train ratio [95% CI] | "
           "infer img/s xrayjax | infer img/s Keras | infer ratio [95% CI] | "
           "first step s xrayjax / Keras | GFLOPs/img (fwd) | % of matmul peak (train) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    achieved = 3 * r["gflops_per_image"] * 1e9 * r["train_jax"] / peak
    lines.append(
        f"| {r['model']} | {r['train_jax']:.2f} | {r['train_keras']:.2f} | "
        f"{_ratio(r['train_ratio'])} | {r['infer_jax']:.2f} | {r['infer_keras']:.2f} | "
        f"{_ratio(r['infer_ratio'])} | {r['compile_jax']:.1f} / {r['compile_keras']:.1f} | "
        f"{r['gflops_per_image']:.2f} | {100 * achieved:.0f}% |")
  return "\n".join(lines)


def memory_table(names, size: int, batch: int) -> str:
  lines = [f"Peak resident memory of a process that trains for two steps, {size} px, batch "
           f"{batch}, Nadam, float32 (GB; in brackets: added after the imports).", "",
           "| model | xrayjax | Keras | xrayjax / Keras |", "|---|---|---|---|"]
  for name in names:
    m = {f: peak_memory(f, name, size, batch) for f in ("jax", "keras")}
    print(f"  {name}: {m}", flush=True)
    gb = lambda r: f"{r['peak_mb'] / 1024:.2f} ({(r['peak_mb'] - r['baseline_mb']) / 1024:.2f})"
    lines.append(f"| {name} | {gb(m['jax'])} | {gb(m['keras'])} | "
                 f"{m['jax']['peak_mb'] / m['keras']['peak_mb']:.2f}x |")
  return "\n".join(lines)


# (label, stored size, model input, width, batch, augmentation, streamed): the demo's and
# paper scale's; streamed: every epoch decodes the stored PNGs again (pipeline.Stream, a
# partition above config.cache_budget_mb), else the decoded images are cached.
PAPER_AUGMENT = ("flip_lr", "flip_ud", "rotate(360)", "zoom_xy(0.05)", "shift(0.05)",
                 "shear(0.05)")
PIPELINE_SCALES = (
    ("demo: 128 px synthetic at 96 px, DETL augmentation", 128, 96, 0.125, 32,
     ("rotate(10)", "zoom(0.1)", "flip_lr"), False),
    ("224 px from decoded 256 px, paper 2's augmentation", 256, 224, 1.0, 16, PAPER_AUGMENT,
     False),
    ("paper size, streamed: 256 px PNGs decoded every epoch to 224 px, paper 2's augmentation",
     256, 224, 1.0, 16, PAPER_AUGMENT, True),
)


def pipeline_rate(stored: int, size: int, batch: int, ops, streamed: bool,
                  images: int = 512) -> float:
  """Images/s of one epoch of training batches. Cached: `pipeline.train_batches` once the
  resized images are cached (as in runs: `pipeline.select` resizes before its cache; the first
  epoch fills it). Streamed: as `pipeline.Stream` spends an epoch, decoding the stored PNGs
  (synthetic films, `phantom.render`, as a build stores them) and resizing them as the
  batches need them."""
  import tensorflow as tf

  from xrayjax.data import pipeline
  from xrayjax.data.sources import phantom
  rng = np.random.default_rng(0)
  if not streamed:
    ds = pipeline.from_arrays(rng.integers(0, 256, (images, stored, stored, 1), np.uint8))
    ds = ds.map(pipeline.graph_fn(lambda ex: {**ex, "image": pipeline.to_model_size(
        ex["image"], size)})).cache()
    for _ in pipeline.train_batches(ds, images, batch, seed=0, epoch=0, augment_ops=ops):
      pass
    t = time.perf_counter()
    n = sum(len(b["label"]) for b in pipeline.train_batches(ds, images, batch, seed=0,
                                                            epoch=1, augment_ops=ops))
    return n / (time.perf_counter() - t)
  films = [phantom.render(rng, size=stored, label="pneumonia",
                          anatomy=phantom.sample_anatomy(rng), site=phantom.SITES[0], view="PA",
                          severity=0.8, finding=None)["image"] for _ in range(64)]
  pngs = [tf.io.encode_png(f[..., None]).numpy() for f in films]

  def epoch(e):  # as Stream.train_batches, its records read (0.1-0.2 ms each) left out
    ds = tf.data.Dataset.from_generator(
        lambda: ({"png": pngs[k % len(pngs)], "label": 0, "index": k} for k in range(images)),
        output_signature={"png": tf.TensorSpec((), tf.string),
                          "label": tf.TensorSpec((), tf.int32),
                          "index": tf.TensorSpec((), tf.int32)})
    return sum(len(b["label"]) for b in pipeline._augmented_batches(  # pylint: disable=protected-access
        pipeline.decode_pngs(ds, size), batch, images // batch, e, ops))

  epoch(0)  # tracing, as the cached path's first epoch
  t = time.perf_counter()
  return epoch(1) / (time.perf_counter() - t)


def measure_pipeline(names, rounds: int, steps: int) -> str:
  lines = ["| scale | pipeline img/s | model | model consumes img/s | pipeline / model |",
           "|---|---|---|---|---|"]
  for label, stored, size, width, batch, ops, streamed in PIPELINE_SCALES:
    supply = statistics.median(pipeline_rate(stored, size, batch, ops, streamed)
                               for _ in range(rounds))
    print(f"  {label}: pipeline {supply:.0f} img/s", flush=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, size, size, 1)).astype(np.float32)
    y = rng.integers(0, CLASSES, batch).astype(np.int32)
    for name in names:
      runner = JaxRunner(name, x, y, width)
      demand = statistics.median(_rate(runner.train_step, steps, batch) for _ in range(rounds))
      print(f"  {label}: {name} trains at {demand:.1f} img/s", flush=True)
      lines.append(f"| {label} | {supply:.0f} | {name} | {demand:.1f} | {supply / demand:.1f}x |")
  return "\n".join(lines)


def _partition_config():
  from configs import detl
  c = detl.get_config("")
  c.data.tfds_dir = TFDS_DIR.value
  c.data.synthetic.update(image_size=FILM_SIZE.value,
                          patients=tuple(int(p) for p in PATIENTS.value))
  return c


def probe_partition(mode: str, index: int, count: int, size: int, batch: int,
                    val_images: int) -> dict:
  """Process `index` of `count`: one epoch of a training partition and one pass over a
  validation partition (the cohort's last `val_images` rows; the rest train), cached or
  streamed (Cohort.partition_data), with DETL's augmentation: stage A's pipeline."""
  from xrayjax.data.cohort import Cohort
  cohort = Cohort.load(_partition_config().data)
  loaded = _max_rss_mb()
  rows = np.arange(len(cohort.meta["image_id"]))
  rows, val = rows[:len(rows) - val_images], rows[len(rows) - val_images:]
  labels = np.zeros(len(cohort.meta["image_id"]), np.int32)
  budget = 0 if mode == "streamed" else float("inf")
  start = time.perf_counter()
  data, _ = cohort.partition_data(rows, labels, size, budget)
  batches = train._train_batches(data, len(rows), batch, 0, 0, ("rotate(10)", "zoom(0.1)",
                                 "flip_lr"), index, count)
  first = None
  for _ in batches:
    first = first or time.perf_counter() - start
  epoch = time.perf_counter() - start
  if len(val):
    val_data, _ = cohort.partition_data(val, labels, size, budget)
    for _ in infer.eval_batches(val_data, len(val), batch, index, count):
      pass
  return {"images": len(rows), "val_images": len(val), "loaded_mb": loaded,
          "peak_mb": _max_rss_mb(), "first_batch_s": first, "epoch_s": epoch,
          "val_s": time.perf_counter() - start - epoch}


def partition_table(counts, modes, size: int, batch: int, val_images: int) -> str:
  from xrayjax.data import sources
  sources.load(_partition_config().data)  # build once, before the processes start
  lines = [f"One epoch of a training partition and one pass over a validation partition of "
           f"{val_images} images (synthetic films at {FILM_SIZE.value} px, trained at {size} "
           f"px, batch {batch}); median over the processes:", "",
           "| partition | processes | rss after load (MB) | peak rss (MB) | added (MB) | "
           "first batch (s) | epoch (s) | validation (s) |", "|---|---|---|---|---|---|---|---|"]
  for mode in modes:
    for count in counts:
      procs = [subprocess.Popen(
          [sys.executable, "-m", "xrayjax.bench", f"--probe_partition={mode}:{i}:{count}",
           f"--tfds_dir={TFDS_DIR.value}", f"--patients={','.join(PATIENTS.value)}",
           f"--film_size={FILM_SIZE.value}", f"--val_images={val_images}",
           f"--image_size={size}", f"--batch_size={batch}"],
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(count)]
      out = []
      for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode:
          raise RuntimeError(f"--probe_partition={mode} failed:\n{stderr[-2000:]}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
      med = {k: statistics.median(o[k] for o in out) for k in out[0]}
      print(f"  {mode} x {count}: {med}", flush=True)
      lines.append(f"| {mode} ({med['images']:.0f} + {med['val_images']:.0f} images) | {count} | "
                   f"{med['loaded_mb']:.0f} | {med['peak_mb']:.0f} | "
                   f"{med['peak_mb'] - med['loaded_mb']:.0f} | {med['first_batch_s']:.1f} | "
                   f"{med['epoch_s']:.0f} | {med['val_s']:.0f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  unknown = set(FLAGS.value) - set(BENCH_MODELS)
  if unknown:
    raise app.UsageError(f"unknown models {sorted(unknown)}; choose from {BENCH_MODELS}")
  if _PROBE.value:
    framework, name = _PROBE.value.split(":")
    print(json.dumps(probe_memory(framework, name, IMAGE_SIZE.value, BATCH_SIZE.value)))
    return
  if _PROBE_PARTITION.value or PARTITION.value:
    from xrayjax.data import pipeline
    pipeline.configure_tensorflow(jax.default_backend())  # TF's threads as in runs
    if not TFDS_DIR.value:
      raise app.UsageError("--partition_memory needs --tfds_dir (where the films are built)")
    if _PROBE_PARTITION.value:
      mode, index, count = _PROBE_PARTITION.value.split(":")
      print(json.dumps(probe_partition(mode, int(index), int(count), IMAGE_SIZE.value,
                                       BATCH_SIZE.value, VAL_IMAGES.value)))
    else:
      print(partition_table([int(c) for c in PARTITION.value], PARTITION_MODES.value,
                            IMAGE_SIZE.value, BATCH_SIZE.value, VAL_IMAGES.value))
    return
  print(f"jax {jax.__version__} on {jax.devices()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        flush=True)
  print(f"CPU convolutions: {kernels.status()}", flush=True)
  print(f"memory: {hostmem.status()}", flush=True)
  if MEMORY.value:
    print(memory_table(FLAGS.value, IMAGE_SIZE.value, BATCH_SIZE.value))
    return
  if PIPELINE.value:
    from xrayjax.data import pipeline
    pipeline.configure_tensorflow(jax.default_backend())  # TF's threads as in runs
    print(measure_pipeline(FLAGS.value, ROUNDS.value, STEPS.value))
    return
  if LAYERS.value:
    print(measure_layers(BATCH_SIZE.value, ROUNDS.value))
    return
  if PROFILE.value:
    for name in FLAGS.value:
      print(profile_table(profile(name, IMAGE_SIZE.value, BATCH_SIZE.value, STEPS.value)) + "\n",
            flush=True)
    return
  if GRADCAM.value:
    rows = [measure_gradcam(n, IMAGE_SIZE.value, BATCH_SIZE.value, ROUNDS.value, STEPS.value)
            for n in FLAGS.value]
    print(gradcam_table(rows, IMAGE_SIZE.value, BATCH_SIZE.value))
    return
  peaks = [matmul_peak()]
  rows = []
  for name in FLAGS.value:
    rows.append(measure(name, IMAGE_SIZE.value, BATCH_SIZE.value, ROUNDS.value, STEPS.value,
                        peaks))
  print(f"matmul peak readings (GFLOP/s): {', '.join(f'{p / 1e9:.0f}' for p in peaks)}")
  print(f"Keras: {rows[0]['keras']}")
  print(table(rows, max(peaks), IMAGE_SIZE.value, BATCH_SIZE.value))


if __name__ == "__main__":
  hostmem.reexec()  # the command runs again with huge pages and the block cache (once)
  app.run(main)
