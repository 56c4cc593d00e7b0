import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xrayjax import models, optim, train


DETL_RULES = (("{before_last_conv_block}", "freeze"), ("{last_conv_block}|{head}", "train"))


def _setup(model_name="vgg16", rules=DETL_RULES):
  model = models.get(model_name)(num_classes=4, width=1 / 16)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 1)), jnp.float32)
  variables = jax.jit(lambda k: train.variables_of(model.init(k, x, train=False)))(
      jax.random.PRNGKey(0))  # jitted: half the time of op-by-op initialisation
  cfg = type("Cfg", (), dict(name="sgd", lr=0.1, momentum=0.9, schedule="constant"))
  tx = optim.make(cfg, 10, variables["params"], rules, models.spec(model_name).PARAM_GROUPS)
  return model, variables, tx, {"image": x, "label": jnp.array([0, 1, 2, 3])}


def _variable_shapes(model_name):
  """The model's {"params", "batch_stats"} as shapes (the names are what is under test)."""
  model = models.get(model_name)(num_classes=4, width=1 / 16)
  return jax.eval_shape(lambda: train.variables_of(
      model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)), train=False)))


@pytest.mark.parametrize("model_name", models.names())
def test_param_groups_partition_every_variable(model_name):
  """before_last_conv_block, last_conv_block and head: each variable in exactly one."""
  variables = _variable_shapes(model_name)
  groups = models.spec(model_name).PARAM_GROUPS
  rules = (("{before_last_conv_block}", "freeze"), ("{last_conv_block}", "train"),
           ("{head}", "train"))
  for collection in variables.values():
    optim.param_labels(collection, rules, groups)  # raises unless exactly one rule matches
  labels = jax.tree.leaves(optim.param_labels(variables["params"], rules[:2], {
      **groups, "last_conv_block": f"{groups['last_conv_block']}|{groups['head']}"}))
  assert labels.count("freeze") and labels.count("train")


@pytest.mark.parametrize("model_name", ["vgg16", "alexnet", "resnet50"])
def test_frozen_params_stay_bit_identical_and_trainable_ones_move(model_name):
  model, variables, tx, batch = _setup(model_name)
  groups = models.spec(model_name).PARAM_GROUPS
  labels = {k: optim.param_labels(v, DETL_RULES, groups) for k, v in variables.items()}
  state = train.TrainState.create(variables, tx)
  step = jax.jit(train.make_train_step(model, tx, labels["batch_stats"]))
  for _ in range(3):
    state, _ = step(state, batch, jax.random.PRNGKey(1))
  flat_labels = dict(jax.tree_util.tree_leaves_with_path(labels))
  after = dict(jax.tree_util.tree_leaves_with_path(state.variables))
  n_frozen = n_train = 0
  for path, before in jax.tree_util.tree_leaves_with_path(variables):
    if flat_labels[path] == "freeze":  # weights and BatchNorm running statistics alike
      n_frozen += 1
      np.testing.assert_array_equal(np.asarray(before), np.asarray(after[path]))
    else:
      n_train += 1
      assert not np.array_equal(np.asarray(before), np.asarray(after[path])), \
          optim.path_str(path)
  assert n_frozen and n_train


def test_frozen_leaves_carry_no_optimizer_state():
  _, variables, tx, _ = _setup()
  params = variables["params"]
  opt_state = tx.init(params)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  n_trainable = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(params)
                    if not optim.path_str(p).startswith(("block1", "block2", "block3", "block4")))
  n_state = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim)  # momentum buffers
  assert n_state == n_trainable < n_params


def test_every_param_must_match_exactly_one_rule():
  params = _setup()[1]["params"]
  groups = models.spec("vgg16").PARAM_GROUPS
  with pytest.raises(ValueError, match="matches 2 freezing rules"):
    optim.param_labels(params, ((".*", "train"), ("{head}", "freeze")), groups)
  with pytest.raises(ValueError, match="matches 0 freezing rules"):
    optim.param_labels(params, (("{head}", "train"),), groups)
  with pytest.raises(ValueError, match="unknown group"):
    optim.param_labels(params, (("{bogus}", "train"),), groups)
  with pytest.raises(ValueError, match="not one of"):
    optim.param_labels(params, ((".*", "thaw"),), groups)


def test_groups_cover_every_parameter_once():
  for name in models.names():
    params = _variable_shapes(name)["params"]
    rules = tuple((f"{{{g}}}", "train") for g in models.spec(name).PARAM_GROUPS)
    optim.param_labels(params, rules, models.spec(name).PARAM_GROUPS)  # raises if not


def test_unknown_optimizer_and_schedule():
  cfg = type("Cfg", (), dict(name="lion", lr=0.1, momentum=0.0, schedule="constant"))
  with pytest.raises(ValueError, match="valid optimizers"):
    optim.optimizer(cfg, 10)
  cfg.name, cfg.schedule = "adam", "linear"
  with pytest.raises(ValueError, match="valid schedules"):
    optim.optimizer(cfg, 10)


def test_cosine_schedule_decays_to_zero():
  cfg = type("Cfg", (), dict(name="adam", lr=1e-3, momentum=0.0, schedule="cosine"))
  lr = optim.learning_rate(cfg, 100)
  assert lr(0) == pytest.approx(1e-3) and lr(100) == pytest.approx(0.0, abs=1e-12)


def test_nadam_is_keras_nadam_step_for_step():
  """Paper 2 trained with keras.optimizers.Nadam; `nadam` follows it (momentum schedule,
  epsilon), where optax.nadam does not."""
  import keras
  import optax
  import tensorflow as tf
  from ml_collections import ConfigDict
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(60, 5)).astype(np.float32)
  var = tf.Variable(np.ones(5, np.float32))
  reference = keras.optimizers.Nadam(learning_rate=1e-2)
  tx = optim.optimizer(ConfigDict(dict(name="nadam", lr=1e-2, schedule="constant",
                                       momentum=0.0)), 60)
  params = jnp.ones(5)
  state = tx.init(params)
  plain = optax.nadam(1e-2)
  plain_params, plain_state = jnp.ones(5), plain.init(jnp.ones(5))
  for g in grads:
    reference.apply_gradients([(tf.constant(g), var)])
    updates, state = tx.update(jnp.asarray(g), state, params)
    params = optax.apply_updates(params, updates)
    u, plain_state = plain.update(jnp.asarray(g), plain_state, plain_params)
    plain_params = optax.apply_updates(plain_params, u)
  np.testing.assert_allclose(params, var.numpy(), rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(plain_params) - var.numpy()).max() > 1e-3  # optax's Nadam differs


def test_a_process_keeps_its_two_latest_train_steps(monkeypatch):
  """A run's two kinds of stage keep their jitted steps, so the next run of its config traces
  neither again; a third kind evicts the least recently used."""
  import ml_collections
  from xrayjax import sharding
  monkeypatch.setattr(train, "_STEPS", {})
  model, init = models.get("vgg16")(num_classes=4, width=1 / 16), _variable_shapes("vgg16")
  groups, mesh = models.spec("vgg16").PARAM_GROUPS, sharding.make_mesh()

  def step(lr, rules=DETL_RULES):
    stage = type("Stage", (), dict(param_rules=rules, optimizer=ml_collections.ConfigDict(
        dict(name="sgd", lr=lr, momentum=0.9, schedule="constant"))))
    return train._compiled_step(model, stage, 10, init, groups, mesh)

  a, b = step(0.1), step(0.01, ((".*", "train"),))
  assert step(0.1) is a and step(0.01, ((".*", "train"),)) is b  # the next run's stages
  c = step(0.5)  # a third kind: b was used last, so a goes
  assert step(0.01, ((".*", "train"),)) is b and c is not a and step(0.1) is not a
