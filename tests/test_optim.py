import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xrayjax import models, optim, train


def _setup(model_name="vgg16", rules=(("{before_last_conv_block}", "freeze"),
                                      ("{last_conv_block}|{head}", "train"))):
  model = models.get(model_name)(num_classes=4, width=1 / 16)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 1)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x, train=False)["params"]
  cfg = type("Cfg", (), dict(name="sgd", lr=0.1, momentum=0.9, schedule="constant"))
  tx = optim.make(cfg, 10, params, rules, models.spec(model_name).PARAM_GROUPS)
  return model, params, tx, {"image": x, "label": jnp.array([0, 1, 2, 3])}


@pytest.mark.parametrize("model_name", ["vgg16", "alexnet"])
def test_frozen_params_stay_bit_identical_and_trainable_ones_move(model_name):
  model, params, tx, batch = _setup(model_name)
  labels = optim.param_labels(params, (("{before_last_conv_block}", "freeze"),
                                       ("{last_conv_block}|{head}", "train")),
                              models.spec(model_name).PARAM_GROUPS)
  state = train.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  step = jax.jit(train.make_train_step(model, tx, jax.random.PRNGKey(1)))
  for _ in range(3):
    state, _ = step(state, batch)
  flat_labels = dict(jax.tree_util.tree_leaves_with_path(labels))
  n_frozen = n_train = 0
  for path, before in jax.tree_util.tree_leaves_with_path(params):
    after = dict(jax.tree_util.tree_leaves_with_path(state.params))[path]
    if flat_labels[path] == "freeze":
      n_frozen += 1
      np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
    else:
      n_train += 1
      assert not np.array_equal(np.asarray(before), np.asarray(after)), optim.path_str(path)
  assert n_frozen and n_train


def test_frozen_leaves_carry_no_optimizer_state():
  _, params, tx, _ = _setup()
  opt_state = tx.init(params)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  n_trainable = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(params)
                    if not optim.path_str(p).startswith(("block1", "block2", "block3", "block4")))
  n_state = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim)  # momentum buffers
  assert n_state == n_trainable < n_params


def test_every_param_must_match_exactly_one_rule():
  _, params, _, _ = _setup()
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
    model = models.get(name)(num_classes=3, width=1 / 16)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)), train=False)["params"]
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
