"""Flax models against keras.applications: same outputs from the same (imported) weights.

The parity checks build full-width networks in both frameworks: they are `slow` (CI runs them).
"""

import jax
import numpy as np
import pytest

keras = pytest.importorskip("keras")

import tiny  # noqa: E402
from xrayjax import models, train  # noqa: E402
from xrayjax.models import keras_weights  # noqa: E402

CLASSES = 5
# name -> (Keras constructor, input size, Keras layer of out["features"], file format)
CASES = {
    "vgg16": (lambda **k: keras.applications.VGG16(**k), 32, "block5_conv3", ".keras"),
    "resnet50": (lambda **k: keras.applications.ResNet50(**k), 32, "conv5_block3_out", ".h5"),
    "resnet50v2": (lambda **k: keras.applications.ResNet50V2(**k), 32, "post_relu",
                   ".weights.h5"),
    "xception": (lambda **k: keras.applications.Xception(**k), 71, "block14_sepconv2_act",
                 ".keras"),
}


def _randomise_batch_norms(model, rng):
  """Non-trivial BatchNorm statistics, so that importing them matters."""
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      n = layer.gamma.shape[0]
      layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n), rng.normal(0, 0.1, n),
                         rng.uniform(0.5, 1.5, n)])


def _save(model, path):
  if path.endswith(".weights.h5"):
    model.save_weights(path)
  elif path.endswith(".h5"):
    model.save(path)  # legacy HDF5, as the keras.applications ImageNet files
  else:
    model.save(path)


def _relative_error(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def _apply(model, variables, x):
  return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)


def _flax_outputs(name, path, size, x, **model_kw):
  model = models.build(name, CLASSES, model_kw)
  variables = keras_weights.load(path, tiny.nan_like_init(model, x[:1]), models.spec(name))
  logits, out = _apply(model, variables, x)
  n_vars = sum(v.size for v in jax.tree.leaves(variables))
  return logits, out, n_vars


def _keras_outputs(kmodel, feature_layers, x):
  probe = keras.Model(kmodel.input, [kmodel.output] + [kmodel.get_layer(n).output
                                                      for n in feature_layers])
  return [np.asarray(o) for o in probe(x, training=False)]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_flax_matches_keras_applications(name, tmp_path):
  make, size, feature_layer, fmt = CASES[name]
  kmodel = make(weights=None, input_shape=(size, size, 3), classes=CLASSES,
                classifier_activation=None)
  rng = np.random.default_rng(0)
  _randomise_batch_norms(kmodel, rng)
  path = str(tmp_path / f"{name}{fmt}")
  _save(kmodel, path)
  x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
  k_logits, k_features = _keras_outputs(kmodel, [feature_layer], x)
  logits, out, n_vars = _flax_outputs(name, path, size, x)
  assert n_vars == kmodel.count_params()
  assert out["features"].shape == k_features.shape
  assert _relative_error(out["features"], k_features) < 1e-4
  assert _relative_error(logits, k_logits) < 1e-4


def _keras_concat(size, classes):
  """The authors' network: Xception and ResNet50V2 on one input, concatenated, 1x1 conv
  (1024, no activation), flatten, dropout 0.5, dense (their layers are unnamed)."""
  inp = keras.Input((size, size, 3))
  x1 = keras.applications.Xception(weights=None, include_top=False, input_tensor=inp)
  x2 = keras.applications.ResNet50V2(weights=None, include_top=False, input_tensor=inp)
  x = keras.layers.concatenate([x1.output, x2.output])
  x = keras.layers.Conv2D(1024, (1, 1))(x)
  x = keras.layers.Dropout(0.5)(keras.layers.Flatten()(x))
  return keras.Model(inp, keras.layers.Dense(classes)(x))


@pytest.mark.slow
def test_concat_matches_the_authors_keras_network(tmp_path):
  size = 71
  kmodel = _keras_concat(size, CLASSES)
  rng = np.random.default_rng(1)
  _randomise_batch_norms(kmodel, rng)
  path = str(tmp_path / "concat.keras")
  _save(kmodel, path)
  x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
  conv_name = [l.name for l in kmodel.layers if isinstance(l, keras.layers.Conv2D)][-1]
  k_logits, k_joint, k_x, k_r = _keras_outputs(
      kmodel, [conv_name, "block14_sepconv2_act", "post_relu"], x)
  logits, out, n_vars = _flax_outputs("concat", path, size, x)
  assert n_vars == kmodel.count_params()
  for mine, theirs in ((out["features"], k_joint), (out["xception"], k_x),
                       (out["resnet50v2"], k_r), (logits, k_logits)):
    assert mine.shape == theirs.shape
    assert _relative_error(mine, theirs) < 1e-4


@pytest.mark.slow
def test_concat_branches_from_two_files_head_kept(tmp_path):
  """The ImageNet recipe: each branch from its own no-top file; the new head stays random."""
  size = 71
  rng = np.random.default_rng(2)
  paths = []
  for make, fname in ((keras.applications.Xception, "x_notop.h5"),
                      (keras.applications.ResNet50V2, "r_notop.weights.h5")):
    k = make(weights=None, include_top=False, input_shape=(size, size, 3))
    _randomise_batch_norms(k, rng)
    paths.append(str(tmp_path / fname))
    _save(k, paths[-1])
  model = models.build("concat", 3, {})
  x = rng.normal(size=(1, size, size, 3)).astype(np.float32)
  init = tiny.nan_like_init(model, x)
  loaded = keras_weights.load(",".join(paths), init, models.spec("concat"))
  np.testing.assert_array_equal(loaded["params"]["concat_conv"]["kernel"],
                                init["params"]["concat_conv"]["kernel"])  # kept: still NaN
  for group in ("params", "batch_stats"):  # every branch value came from the two files
    for branch in ("xception", "resnet50v2"):
      assert all(np.isfinite(v).all() for v in jax.tree.leaves(loaded[group][branch]))


@pytest.mark.slow
def test_rgb_weights_into_grey_model_and_new_head(tmp_path):
  """An ImageNet-style file (3 channels, 1000 classes) into a 1-channel 4-class model."""
  kmodel = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=1000,
                                       classifier_activation=None)
  _randomise_batch_norms(kmodel, np.random.default_rng(3))
  path = str(tmp_path / "imagenet_like.h5")
  _save(kmodel, path)
  grey = np.random.default_rng(4).normal(size=(2, 32, 32, 1)).astype(np.float32)
  model = models.build("resnet50", 4, {})
  init = tiny.nan_like_init(model, grey[:1])
  variables = keras_weights.load(path, init, models.spec("resnet50"))
  _, out = _apply(model, variables, grey)
  (k_features,) = _keras_outputs(kmodel, ["conv5_block3_out"], np.repeat(grey, 3, -1))[1:]
  assert _relative_error(out["features"], k_features) < 1e-4
  np.testing.assert_array_equal(variables["params"]["predictions"]["kernel"],
                                init["params"]["predictions"]["kernel"])


def test_config_init_from_loads_the_first_stage(tmp_path):
  from configs import detl
  kmodel = keras.applications.ResNet50V2(weights=None, include_top=False, input_shape=(32, 32, 3))
  path = str(tmp_path / "resnet50v2_notop.weights.h5")
  kmodel.save_weights(path)
  c = detl.get_config("model=resnet50v2")
  c.model.width = 1.0
  c.model.init_from = path
  variables = train.init_variables(models.build("resnet50v2", 4, c.model), 32, 0,
                                        c.model.init_from, models.spec("resnet50v2"))
  np.testing.assert_allclose(variables["params"]["conv5_block3_3_conv"]["kernel"],
                             kmodel.get_layer("conv5_block3_3_conv").get_weights()[0])


def test_import_errors_name_the_layer(tmp_path):
  kmodel = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=4)
  path = str(tmp_path / "r.weights.h5")
  kmodel.save_weights(path)
  x = np.zeros((1, 32, 32, 3), np.float32)
  narrow = models.build("resnet50", 4, {"width": 0.5})
  init = tiny.nan_like_init(narrow, x)
  with pytest.raises(ValueError, match=r"layer conv1_\w+: \w+ expects shape \((.*, )?32,?\), "
                                       r"the Keras file has \((.*, )?64,?\)"):
    keras_weights.load(path, init, models.spec("resnet50"))
  other = models.build("xception", 4, {})
  init = tiny.nan_like_init(other, x)
  with pytest.raises(ValueError, match=r"80 of the model's 81 layers are not in .*r.weights.h5: "
                                       r"block10_sepconv1, .*are they Keras weights of this "
                                       r"model \(xception\)"):
    keras_weights.load(path, init, models.spec("xception"))
  bogus = tmp_path / "bogus.h5"
  bogus.write_text("not hdf5")
  with pytest.raises(ValueError, match="is not an HDF5 Keras weight file"):
    keras_weights.read(str(bogus))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    keras_weights.read(str(tmp_path / "missing.keras"))
