import itertools

import pytest

from configs import detl
from xrayjax import models, optim


@pytest.mark.parametrize("model,protocol,init,scale,runlocal", list(itertools.product(
    detl.MODELS, ("corrected", "paper"), ("detl", "scratch"), ("demo", "paper"),
    (False, True))))
def test_every_variant_builds(model, protocol, init, scale, runlocal):
  arg = f"model={model},protocol={protocol},init={init},scale={scale}" + (
      ",runlocal" if runlocal else "")
  c = detl.get_config(arg)
  assert c.model_name == model and c.protocol == protocol
  assert c.stage_a.enabled == (init == "detl")
  if scale == "paper" and not runlocal:
    assert c.data.image_size == 224 and c.stage_a.epochs == 100 and c.model.width == 1.0
    assert c.stage_a.optimizer.lr == 1e-3
    if init == "detl":
      assert (c.stage_b.optimizer.name, c.stage_b.optimizer.lr) == ("sgd", 1e-4)
  if model == "alexnet":  # dropout off only for the narrow demo network
    assert c.model.dropout == (0.5 if scale == "paper" else 0.0)
  # The stage-B freezing rules resolve against the model's parameter groups.
  for regex, rule in c.stage_b.param_rules:
    regex.format(**models.spec(model).PARAM_GROUPS)
    assert rule in optim.RULES


def test_default_is_demo_vgg16_corrected():
  c = detl.get_config()
  assert (c.model_name, c.protocol, c.folds) == ("vgg16", "corrected", 5)
  assert c.stage_b.optimizer.name == "sgd" and c.stage_b.optimizer.lr == 3e-3
  assert c.stage_b.optimizer.momentum == 0.9


@pytest.mark.parametrize("arg,message", [
    ("model=resnet9", "choose one of"),
    ("protocol=loose", "choose one of"),
    ("data=imagenet", "choose one of"),
    ("bogus=1", "unknown config arg"),
])
def test_bad_args_list_valid_choices(arg, message):
  with pytest.raises(ValueError, match=message):
    detl.get_config(arg)


def test_unknown_model_lists_registry():
  with pytest.raises(ValueError, match=r"valid models: \['alexnet', 'concat', 'resnet50', "
                                       r"'resnet50v2', 'vgg16', 'xception'\]"):
    models.get("resnet9")


def test_config_args_cover_the_model_registry():
  assert sorted(detl.MODELS) == models.names()


@pytest.mark.parametrize("data,classes", list(itertools.product(
    ("synthetic", "manifest", "nih"), ("4", "3"))))
def test_data_and_class_variants_compose(data, classes):
  from xrayjax.data import sources, tasks
  c = detl.get_config(f"data={data},classes={classes},scale=paper")
  task = tasks.get(c.data_b.task)
  assert len(task.classes) == int(classes)
  assert set(c.data_b.images_per_class) == set(task.classes)  # a size for every class
  assert sources.names(c.data) == {"synthetic": ["synthetic"], "manifest": ["manifest"],
                                   "nih": ["nih_cxr14", "ieee8023_covid"]}[data]
  if data == "nih":
    assert c.data_a.sources == "nih_cxr14" and c.data_b.images_per_class.to_dict() == (
        detl.PAPER_DATA_B if classes == "4" else {"normal": 0, "pneumonia": 0, "covid": 0})
  if data == "manifest" and classes == "3":  # Data-A from the 4-class 64 px benchmark
    assert c.data_a.data.manifest.label_column == "label4"
    assert c.data_a.data.manifest.path_env == "XRAYJAX_DATA_A_MANIFEST"
    assert c.data.manifest.label_column == "label3" and c.data.manifest.image_size == 256
