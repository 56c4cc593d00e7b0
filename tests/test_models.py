"""Every registered model: output contract, DETL-style training steps at runlocal scale."""

import jax
import numpy as np
import pytest

from configs import detl
from xrayjax import experiment, models, optim, train


@pytest.mark.parametrize("name", models.names())
def test_runlocal_training_steps(name):
  c = detl.get_config(f"model={name},runlocal")
  model = models.build(name, 4, c.model)
  spec = models.spec(name)
  variables = experiment.init_variables(model, c.data.image_size, 0)
  rules = tuple(c.stage_b.param_rules)
  tx = optim.make(c.stage_b.optimizer, 10, variables["params"], rules, spec.PARAM_GROUPS)
  step = jax.jit(train.make_train_step(
      model, tx, jax.random.PRNGKey(0), optim.param_labels(variables["batch_stats"], rules,
                                                            spec.PARAM_GROUPS)))
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(8, c.data.image_size, c.data.image_size, 1)).astype(
      np.float32), "label": rng.integers(0, 4, 8).astype(np.int32)}
  state = train.TrainState.create(variables, tx)
  for _ in range(2):
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
  logits, out = model.apply(state.variables, batch["image"], train=False)
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
