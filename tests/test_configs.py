import itertools
import os

import pytest

from configs import concat, detl
from xrayjax import models, optim
from xrayjax.data import pipeline


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
    assert c.model.dropout == (0.5 if scale == "paper" and not runlocal else 0.0)
  # The stage-B freezing rules resolve against the model's parameter groups.
  for regex, rule in c.stage_b.param_rules:
    regex.format(**models.spec(model).PARAM_GROUPS)
    assert rule in optim.RULES


def test_default_is_demo_vgg16_corrected():
  c = detl.get_config()
  assert (c.model_name, c.protocol, c.folds) == ("vgg16", "corrected", 5)
  # The demo's VGG16 recipe: stage B fine-tunes every layer with stage A's optimizer, so
  # init=scratch differs from it only in where the weights start.
  assert c.stage_b.optimizer.to_dict() == c.stage_a.optimizer.to_dict() == dict(
      name="adam", lr=3e-4, schedule="cosine", momentum=0.0)
  assert c.stage_b.param_rules == ((".*", "train"),)
  scratch = detl.get_config("init=scratch")
  assert scratch.stage_b.to_dict() == c.stage_b.to_dict() and not scratch.stage_a.enabled
  # Paper 2's networks keep the paper's rule (last conv block and head, SGD momentum 0.9).
  a = detl.get_config("model=xception")
  assert (a.stage_b.optimizer.name, a.stage_b.optimizer.lr, a.stage_b.optimizer.momentum) == (
      "sgd", 3e-3, 0.9)
  assert a.stage_b.param_rules[0] == ("{before_last_conv_block}", "freeze")


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


@pytest.mark.parametrize("model,data,protocol,sampler,scale,runlocal", list(itertools.product(
    concat.MODELS, tuple(concat.DATA), ("corrected", "paper", "both"), ("phased", "all"),
    ("demo", "paper"), (False, True))))
def test_every_concat_variant_builds(model, data, protocol, sampler, scale, runlocal):
  from xrayjax import methods
  from xrayjax.data import sources, tasks
  c = concat.get_config(f"model={model},data={data},protocol={protocol},sampler={sampler},"
                        f"scale={scale}" + (",runlocal" if runlocal else ""))
  assert (c.method, c.model_name, c.protocol) == ("concat", model, protocol)
  assert tasks.get(c.task).classes == ("normal", "pneumonia", "covid")
  sources.names(c.data)
  pipeline.parse_ops(c.augment)
  assert c.init == ("keras" if scale == "paper" and not runlocal else "pretrain")
  if protocol != "both":
    if c.init == "keras":  # ImageNet from files: refused without them, named
      with pytest.raises(ValueError, match="init=keras needs the ImageNet Keras files"):
        methods.get(c.method).check(c)
      c.model.init_from = "xception_notop.h5,resnet50v2_notop.h5"
    methods.get(c.method).check(c)
  if scale == "paper" and not runlocal:  # the published recipe (Table 2 of the paper)
    assert c.data.image_size == 300 and c.model.width == 1.0
    assert (c.phases.count, c.phases.epochs) == (8, 100)
    assert c.phases.fresh.to_dict() == {"normal": 250, "pneumonia": 200}
    assert c.phases.shared.to_dict() == {"covid": -1, "pneumonia": 34}
    assert c.train.batch_size == (20 if model == "concat" else 30)
    assert (c.train.optimizer.name, c.train.optimizer.lr) == ("nadam", 1e-4)


def test_detl_presets_are_rows_of_one_table():
  demo, paper, tiny = (detl.get_config(a) for a in ("", "scale=paper", "runlocal"))
  assert (demo.data.image_size, paper.data.image_size, tiny.data.image_size) == (128, 224, 32)
  # A demo recipe is a row of DEMO_RECIPES over the demo's row: VGG16 at 128 px, the rest 96.
  assert detl.get_config("model=alexnet").data.image_size == 96
  assert (demo.eval.gradcam.method, demo.eval.gradcam.target, demo.eval.gradcam.reference) == (
      "hirescam", "block4", "normal")
  assert (paper.eval.gradcam.method, paper.eval.gradcam.target, paper.eval.gradcam.reference) == (
      "gradcam", "features", "")
  assert detl.get_config("runlocal,scale=paper").data.image_size == 32  # runlocal wins
  assert detl.get_config("data=manifest").data.image_size == 64
  assert detl.get_config("data=manifest,classes=3").data.image_size == 128
  assert detl.get_config("data=manifest,scale=paper").data_b.images_per_class.to_dict() == \
      detl.PAPER_DATA_B
  assert demo.augment == ("rotate(10)", "zoom(0.1)", "flip_lr")


def test_print_config_shows_every_resolved_field_and_exits():
  """--print_config: args and --config.x=y overrides applied, one dotted field per line (the
  names overrides take), nothing trained or written."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
      [sys.executable, "-m", "xrayjax.main", "--config=configs/detl.py:model=alexnet",
       "--config.stage_b.epochs=7", "--print_config", "--workdir=/nonexistent/never"],
      cwd=root, capture_output=True, text=True, check=True).stdout
  lines = dict(line.split(" = ", 1) for line in out.splitlines())
  assert lines["model_name"] == "'alexnet'" and lines["stage_b.epochs"] == "7"
  assert lines["data.image_size"] == str(detl.get_config("model=alexnet").data.image_size)
  assert len(lines) == len(out.splitlines()) > 50
  assert not os.path.exists("/nonexistent/never")


@pytest.mark.parametrize("args, message", [
    (["--mode=eval"], "--mode=eval needs --workdir of a trained run"),
    (["--mode=eval", "--workdir=/nonexistent/run"],
     "/nonexistent/run: not a directory, so not an xrayjax run directory (--mode=eval needs "
     "--workdir of a trained run)"),
    (["--mode=eval", "--workdir=/", "--retrain=stage_a"], "--retrain goes with --mode=train"),
    ([], "--config is required, e.g. --config=configs/detl.py or --config=configs/concat.py"),
    (["--config=configs/detl.py", "--eval_dir=/tmp"],
     "--eval_dir and --eval_data go with --mode=eval")])
def test_command_line_mistakes_fail_before_the_libraries_load(args, message):
  """The command's own argument errors end it at once, before jax and TensorFlow load."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = ("import sys\nfrom absl import app\nfrom xrayjax import main\n"
            "try:\n  app.run(main.main)\nfinally:\n"
            "  print(sorted({'jax', 'tensorflow'} & set(sys.modules)))")
  proc = subprocess.run([sys.executable, "-c", script, *args], cwd=root, capture_output=True,
                        text=True)
  assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == message
  assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_recipes_name_real_config_paths():
  """A recipe's keys are config paths (one name per value); a path the config lacks fails."""
  from configs import common
  for model, recipe in detl.DEMO_RECIPES.items():
    c = detl.get_config(f"model={model}")
    for path, value in recipe.items():
      node = c
      for name in path.split("."):
        node = node[name]
      assert (node.to_dict() if hasattr(node, "to_dict") else node) == value, (model, path)
  with pytest.raises(KeyError, match="stage_b.optimizer.lr_b"):
    common.override(detl.get_config(), {"stage_b.optimizer.lr_b": 1.0})
