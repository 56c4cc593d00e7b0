"""Every registered model: output contract, DETL-style training steps at runlocal scale."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import detl
from xrayjax import models, optim, train


@pytest.mark.parametrize("name", models.names())
def test_runlocal_training_steps(name):
  c = detl.get_config(f"model={name},runlocal")
  model = models.build(name, 4, c.model)
  spec = models.spec(name)
  variables = train.init_variables(model, c.data.image_size, 0)
  # A stage B draws its new head alone: the whole initialisation's values, bit for bit.
  head = train.fresh_layers(model, c.data.image_size, 0, f"^{spec.HEAD_LAYER}/")
  assert jax.tree.structure(head["params"]) == jax.tree.structure(
      {spec.HEAD_LAYER: variables["params"][spec.HEAD_LAYER]})
  for a, b in zip(jax.tree.leaves(head["params"]),
                  jax.tree.leaves(variables["params"][spec.HEAD_LAYER])):
    np.testing.assert_array_equal(a, b)
  rules = tuple(c.stage_b.param_rules)
  tx = optim.make(c.stage_b.optimizer, 10, variables["params"], rules, spec.PARAM_GROUPS)
  step = jax.jit(train.make_train_step(
      model, tx, optim.param_labels(variables["batch_stats"], rules, spec.PARAM_GROUPS)))
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(8, c.data.image_size, c.data.image_size, 1)).astype(
      np.float32), "label": rng.integers(0, 4, 8).astype(np.int32)}
  state = train.TrainState.create(variables, tx)
  for _ in range(2):
    state, metrics = step(state, batch, jax.random.PRNGKey(0))
    assert np.isfinite(float(metrics["loss"]))
  logits, out = jax.jit(functools.partial(model.apply, train=False))(state.variables,
                                                                     batch["image"])
  assert logits.shape == (8, 4)
  assert out["features"].ndim == 4 and out["features"].shape[0] == 8
  if name == "concat":  # each branch's map and the joint map, for Grad-CAM
    assert {"xception", "resnet50v2", "concat", "features"} <= set(out)


def _shapes(model, size=64):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, size, size, 1)),
                                          train=False))["params"]


def test_resnet50_detl_variant_has_a_3x3_stem():
  c = detl.get_config("model=resnet50")
  assert _shapes(models.build("resnet50", 4, c.model))["conv1_conv"]["kernel"].shape[:2] == (3, 3)
  standard = _shapes(models.build("resnet50", 4, {}))
  assert standard["conv1_conv"]["kernel"].shape[:2] == (7, 7)


def test_concat_heads():
  for head, n in (("flatten", 2 * 2 * 1024 * 3), ("gap", 1024 * 3)):
    assert _shapes(models.build("concat", 3, {"head": head}))["predictions"]["kernel"].size == n
  with pytest.raises(ValueError, match="unknown concat head 'max'"):
    _shapes(models.build("concat", 3, {"head": "max"}))


def test_unknown_model_field_is_named():
  with pytest.raises(ValueError, match="config.model for 'vgg16' has an unknown field"):
    models.build("vgg16", 4, {"stem_kernel": 3})


@pytest.mark.parametrize("kernel,groups,strides,padding", [
    (1, 1, 1, "SAME"), (1, 1, 2, "SAME"), (1, 1, 2, "VALID"),  # 1x1: a matrix product
    (3, 6, 1, "SAME"), (3, 6, 1, "VALID"), (3, 6, 1, ((2, 0), (1, 1))),  # depthwise
    (3, 1, 2, "SAME"), (3, 3, 1, "SAME")])  # the rest: oneDNN (xrayjax.kernels.conv)
def test_conv_rewrites_match_lax_values_and_gradients(kernel, groups, strides, padding):
  from jax import lax
  from xrayjax.models.common import conv_general_dilated
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 9, 9, 6)).astype(np.float32)
  w = rng.normal(size=(kernel, kernel, 6 // groups, 6)).astype(np.float32)
  dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

  def f(conv):
    return lambda x, w: conv(x, w, (strides, strides), padding, dimension_numbers=dn,
                             feature_group_count=groups)

  mine, ref = f(conv_general_dilated), f(lax.conv_general_dilated)
  np.testing.assert_allclose(mine(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
  loss = lambda conv: jax.grad(lambda x, w: (conv(x, w) ** 2).sum(), argnums=(0, 1))(x, w)
  for a, b in zip(loss(mine), loss(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,kernel,strides,padding", [
    ((2, 57, 57, 3), 7, 2, ((3, 3), (3, 3))),  # the ResNets' stem
    ((2, 60, 60, 3), 3, 2, "VALID"),  # Xception's stem
    ((2, 59, 62, 1), 3, 2, "SAME"),  # odd rows, uneven SAME padding, one channel
    ((1, 88, 88, 1), 5, 3, ((1, 0), (0, 2)))])  # stride 3, rows the conv never reaches
def test_strided_stems_run_through_onednn(shape, kernel, strides, padding):
  from jax import lax
  from xrayjax import kernels
  from xrayjax.models.common import conv_general_dilated
  rng = np.random.default_rng(1)
  x = rng.normal(size=shape).astype(np.float32)
  w = rng.normal(size=(kernel, kernel, shape[-1], 8)).astype(np.float32)
  dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  f = lambda conv: lambda x, w: conv(x, w, (strides, strides), padding, dimension_numbers=dn)
  mine, ref = f(conv_general_dilated), f(lax.conv_general_dilated)
  np.testing.assert_allclose(mine(x, w), ref(x, w), rtol=1e-5, atol=1e-4)
  loss = lambda conv: jax.grad(lambda x, w: (conv(x, w) ** 2).sum(), argnums=(0, 1))(x, w)
  for a, b in zip(loss(mine), loss(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
  if kernels.native():
    hlo = jax.jit(jax.grad(lambda w: mine(x, w).sum())).lower(w).as_text()
    assert "xrayjax_dnnl_conv_bwd_weights" in hlo


# --- bfloat16 compute ---------------------------------------------------------------------------


def _bf16_pair(name):
  c = detl.get_config(f"model={name},runlocal")
  with c.unlocked():
    c.model.compute_dtype = "bfloat16"
  bf16 = models.build(name, 4, c.model)
  with c.unlocked():
    c.model.compute_dtype = "float32"
  return bf16, models.build(name, 4, c.model), c.data.image_size


@pytest.mark.parametrize("name", models.names())
def test_bfloat16_compute_keeps_float32_parameters_and_statistics(name):
  model, _, size = _bf16_pair(name)
  images = jax.ShapeDtypeStruct((2, size, size, 1), np.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
  (logits, out), updated = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)},
                               mutable=["batch_stats"]),
      {k: variables[k] for k in ("params", "batch_stats") if k in variables}, images)
  batch_norm = name in ("resnet50", "resnet50v2", "xception", "concat")
  for collection, present in (("params", True), ("batch_stats", batch_norm)):
    dtypes = {x.dtype for x in jax.tree.leaves(variables.get(collection, {}))}
    assert dtypes == ({np.dtype(np.float32)} if present else set()), (collection, dtypes)
  assert {x.dtype for x in jax.tree.leaves(updated)} == (
      {np.dtype(np.float32)} if batch_norm else set())  # updated statistics in float32
  assert logits.dtype == jnp.bfloat16
  assert {k: v.dtype for k, v in out.items()} == {k: jnp.bfloat16 for k in out}


def test_unknown_compute_dtype_is_named():
  with pytest.raises(ValueError, match="compute_dtype='float16'; valid values"):
    models.build("vgg16", 4, {"compute_dtype": "float16"})


@pytest.mark.parametrize("name", ["vgg16", "resnet50v2"])
def test_bfloat16_model_is_close_to_float32(name):
  bf16, f32, size = _bf16_pair(name)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, size=(4, size, size, 1)).astype(np.float32)
  variables = train.init_variables(f32, size, 0)
  # Jitted, as training and evaluation run them (op by op, ResNet50V2 took several times longer).
  infer = lambda m: jax.jit(functools.partial(m.apply, train=False))  # noqa: E731
  fit = lambda m: jax.jit(functools.partial(m.apply, train=True,  # noqa: E731
                                            mutable=["batch_stats"]))
  a, _ = infer(f32)(variables, images)
  b, _ = infer(bf16)(variables, images)
  assert a.dtype == jnp.float32 and b.dtype == jnp.bfloat16
  # bfloat16 keeps 8 significant bits (0.4%); through the network, 1-2% here.
  np.testing.assert_allclose(b.astype(jnp.float32), a, atol=0.05 * float(np.abs(a).max()))
  (_, _), stats = fit(bf16)(variables, images)
  assert all(x.dtype == jnp.float32 and np.isfinite(x).all()
             for x in jax.tree.leaves(stats["batch_stats"] if stats else {}))
  if name == "vgg16":  # no BatchNorm: training mode is as close
    (a, _), _ = fit(f32)(variables, images)
    (b, _), _ = fit(bf16)(variables, images)
    np.testing.assert_allclose(b.astype(jnp.float32), a, atol=0.05 * float(np.abs(a).max()))
  # (Not compared in training mode with BatchNorm: a freshly initialised ResNet normalising
  # over 4 images of 1x1 maps is chaotic; a 0.4% change of the float32 input alone moves its
  # logits by ~20%.)
