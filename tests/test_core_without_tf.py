"""The JAX core (models, optim, train, infer, checkpoint, Grad-CAM) imports and runs where
TensorFlow is not installed: accelerator images ship jax, flax, optax and orbax, not TF."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import sys

    # As if TensorFlow and TFDS were not installed: importing them raises ImportError and
    # importlib.util.find_spec says None.
    for name in ("tensorflow", "tensorflow_datasets"):
      sys.modules[name] = None

    import ml_collections
    import numpy as np
    from xrayjax import arrays, checkpoint, infer, methods, models, optim, sharding, train
    from xrayjax.evaluate import gradcam

    rng = np.random.default_rng(0)
    labels = np.arange(48) % 2
    images = np.clip(rng.normal(70 + 110 * labels, 25)[:, None, None, None]
                     + rng.normal(0, 10, (48, 32, 32, 1)), 0, 255).astype(np.uint8)
    data = arrays.ArrayData(images, labels)
    cfg = ml_collections.ConfigDict(dict(width=1 / 16, init_from=None, compute_dtype="float32"))
    model = models.build("vgg16", 2, cfg)
    spec = models.spec("vgg16")
    stage = methods.Stage(
        name="stage", classes=("dark", "bright"), labels=labels,
        phases=[methods.Phase(np.arange(32), 3)],
        optimizer=ml_collections.ConfigDict(dict(name="adam", lr=1e-3, momentum=0.0,
                                                 schedule="cosine")),
        param_rules=((".*", "train"),), batch_size=8, eval_batch_size=8, select="best",
        init_seed=0, seed=0, augment=(), val=np.arange(32, 48))
    mesh = sharding.make_mesh()
    init = train.initial_variables(stage, model, spec, 32, {}, None)
    variables, summary = train.train_stage(
        stage=stage, model=model, init_variables=init, groups=spec.PARAM_GROUPS,
        data=train.StageData(phases=[(data, 32)], val=data, num_val=16),
        ckpt_dir=sys.argv[1], mesh=mesh, log_every=100, tb_dir=sys.argv[1] + "_tb")
    restored, again = infer.restore(sys.argv[1])
    assert again["selected_step"] == summary["selected_step"]
    probs, truth, index = infer.predict(infer.make_predict_fn(model, mesh), restored, data, 48,
                                        8, mesh)
    assert probs.shape == (48, 2) and list(index) == list(range(48))
    np.testing.assert_array_equal(truth, labels)
    out = infer.batched(gradcam.make_fn(model, "features", "gradcam"), restored, data, 48, 8,
                        mesh)
    assert out["cam"].shape == (48, 32, 32) and 0 <= out["cam"].min() <= out["cam"].max() <= 1
    assert sys.modules["tensorflow"] is None and sys.modules["tensorflow_datasets"] is None
    print("OK", summary["selected_step"], float((probs.argmax(1) == labels).mean()))
""")


def test_jax_core_imports_and_runs_without_tensorflow(tmp_path):
  out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "stage")], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "XRAYJAX_NATIVE": "0"})
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith("OK"), out.stdout
  assert "TensorFlow is not installed: no TensorBoard events" in out.stderr


def test_array_data_batches_cover_each_epoch_once_per_process():
  import numpy as np
  from xrayjax import arrays
  data = arrays.ArrayData(np.zeros((10, 4, 4, 1), np.uint8), np.arange(10))
  seen = [b["label"] for p in range(2) for b in data.train_batches(10, 4, 0, 3, (), p, 2)]
  assert sorted(np.concatenate(seen)) == sorted(np.concatenate(  # 2 full batches of 4
      [b["label"] for b in data.train_batches(10, 4, 0, 3)]))
  assert sum(len(s) for s in seen) == 8
  pad = [b for p in range(2) for b in data.eval_batches(10, 4, p, 2)]
  assert sum(int(b["mask"].sum()) for b in pad) == 10 and all(len(b["label"]) == 2 for b in pad)
  import pytest
  with pytest.raises(ValueError, match="does not augment"):
    next(data.train_batches(10, 4, 0, 0, ("flip_lr",)))
