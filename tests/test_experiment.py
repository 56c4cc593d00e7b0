"""End to end on tiny synthetic data: stage A, stage B per fold, eval, resume, bad input."""

import csv
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from xrayjax import checkpoint, experiment, files, rundir
from xrayjax.evaluate import score
from xrayjax.data import tasks as tasks_lib


def _predictions(workdir, name="results"):
  with open(os.path.join(workdir, f"{name}_predictions.csv")) as f:
    return list(csv.DictReader(f))


def test_tiny_run_trains_evaluates_and_reports(tiny_config, tiny_run, tiny_run_copy):
  workdir, results = tiny_run
  assert results["protocol"] == "corrected" and len(results["fold_metrics"]) == 2
  for name in ("config.json", "splits.json", "results.json", "results_folds.csv",
               "results_predictions.csv", "results_summary.txt"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, "tensorboard", "stage_a"))
  preds = _predictions(workdir)
  assert len(preds) == results["num_images"]  # every Data-B image evaluated exactly once
  assert len({p["image_id"] for p in preds}) == len(preds)
  cm = np.array(results["across_folds"]["confusion_summed"])
  assert cm.sum() == results["num_images"]
  assert results["data_summary"]["test_patients_seen_in_training"] == 0
  assert os.path.exists(os.path.join(workdir, "plan.json"))
  # Paper 2's tables are paper 2's (methods.tables): a DETL run has none.
  assert results["tables"] == [] and not os.path.exists(os.path.join(workdir,
                                                                     "results_table3.csv"))
  # Eval mode restores the best checkpoints and recomputes the same metrics.
  again = experiment.run(tiny_config, tiny_run_copy, mode="eval")
  np.testing.assert_equal(again["fold_metrics"], results["fold_metrics"])  # NaN == NaN here
  # A second train run skips every finished stage and changes nothing.
  third = experiment.run(tiny_config, tiny_run_copy)
  np.testing.assert_equal(third["fold_metrics"], results["fold_metrics"])


def test_eval_measures_the_maps_against_each_fold_models_normal_training_films(
    tiny_config, tiny_run, tmp_path):
  """eval.gradcam.reference=normal: each fold's maps against the mean map of the normal
  images its model trained on (not its test images), counted in the results."""
  c = tiny_config.copy_and_resolve_references()
  c.eval.gradcam.update(enabled=True, reference="normal", per_class=0, misclassified=False,
                        sanity_folds=0)
  results = experiment.run(c, tiny_run[0], mode="eval", eval_dir=str(tmp_path / "eval"))
  _, plan = experiment.prepare(c)
  for fold, e in zip(results["gradcam_folds"], plan.evaluations):
    stage = plan.stage(e.stage)
    trained = np.unique(np.concatenate([p.train for p in stage.phases]))
    normal = trained[stage.labels[trained] == stage.classes.index("normal")]
    assert fold["reference_images"] == len(normal) > 0
    assert not set(normal) & set(e.test)
  lungs = results["gradcam"]["energy_in_lungs"]  # every test image mapped (or all zero)
  assert lungs["images"] > 0 and lungs["images"] + lungs["undefined"] == results["num_images"]


def test_a_run_that_streams_per_process_trains_exactly_as_the_cached_run(tiny_config, tiny_run,
                                                                        tmp_path):
  """cache_budget_mb=0 streams every training partition (each process decodes its share of
  every epoch): the same batches, so the same predictions as the session's cached run."""
  tiny_config.cache_budget_mb = 0
  results = experiment.run(tiny_config, str(tmp_path / "run"))
  np.testing.assert_equal(results["fold_metrics"], tiny_run[1]["fold_metrics"])
  assert _predictions(str(tmp_path / "run")) == _predictions(tiny_run[0])


def test_eval_takes_other_eval_settings_and_refuses_any_other_change(tiny_config, tiny_run):
  """--mode=eval with --config: the run's config with the given eval.* fields (another
  Grad-CAM target); a change anywhere else is another run and is refused, naming it."""
  workdir, _ = tiny_run
  c = tiny_config.copy_and_resolve_references()
  c.eval.gradcam.target, c.eval.bootstrap = "block2", 7
  config = rundir.eval_config(workdir, c)
  assert config.eval.gradcam.target == "block2" and config.eval.bootstrap == 7
  assert config.to_dict() == {**files.read_json(os.path.join(workdir, "config.json")),
                              "eval": rundir.plain(c.eval.to_dict())}
  c.newer_field = 3  # a field the run's code did not have: not a change; code reading it finds it
  assert rundir.eval_config(workdir, c).to_dict() == {**config.to_dict(), "newer_field": 3}
  c.stage_b.optimizer.lr = 0.5
  with pytest.raises(ValueError, match=r"only eval\.\* fields.*\n  stage_b\.optimizer\.lr: "):
    rundir.eval_config(workdir, c)


def _latest_state(stage_dir):
  """The raw saved state of a stage's latest checkpoint (numpy leaves)."""
  import orbax.checkpoint as ocp  # tests may look inside checkpoints; the library uses checkpoint.py
  step = max(int(d) for d in os.listdir(stage_dir) if d.isdigit())
  return ocp.StandardCheckpointer().restore(os.path.join(stage_dir, str(step), "default"))


class _Killed(Exception):
  pass


def test_workdir_with_other_config_is_refused(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  files.write_json(os.path.join(workdir, "config.json"), {**tiny_config.to_dict(), "seed": 7})
  with pytest.raises(ValueError, match=r"seed: 7 -> 0"):
    experiment.run(tiny_config, workdir)
  assert files.read_json(os.path.join(workdir, "config.json"))["seed"] == 7  # untouched
  # The explicit flag accepts the change and keeps the old config beside the new one.
  rundir.write_config(workdir, tiny_config, allow_change=True)
  assert files.read_json(os.path.join(workdir, "config.json"))["seed"] == 0
  kept = [f for f in os.listdir(workdir) if f.startswith("config.") and f != "config.json"]
  assert len(kept) == 1 and files.read_json(os.path.join(workdir, kept[0]))["seed"] == 7


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path,
                                                            monkeypatch):
  from xrayjax import train
  tiny_config.stage_a.epochs = 2
  real = train.make_train_step

  def poisoned(*args):  # the loss turns NaN from step 8 on (epoch 2 here)
    step = real(*args)

    def wrapped(state, batch, key):
      new, metrics = step(state, batch, key)
      bad = state.step >= 8
      return new, {**metrics, "loss": jnp.where(bad, jnp.nan, metrics["loss"])}
    return wrapped

  monkeypatch.setattr(train, "make_train_step", poisoned)
  monkeypatch.setattr(train, "_STEPS", {})  # no step compiled by an earlier test
  workdir = str(tmp_path / "run")
  with pytest.raises(FloatingPointError, match=r"last good checkpoint \(step 7\)"):
    experiment.run(tiny_config, workdir)
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "stage_a")) if d.isdigit())
  assert saved == [7]  # epoch 1 (7 steps) is kept; nothing from the NaN epoch was written


def test_paper_protocol_runs_image_level_with_alexnet(tiny_config, tmp_path):
  tiny_config.protocol = "paper"
  tiny_config.model_name = "alexnet"  # with dropout, on the data-parallel mesh
  results = experiment.run(tiny_config, str(tmp_path / "run"))
  assert results["protocol"] == "paper" and results["model"] == "alexnet"
  assert [s["select"] for s in results["stages"]] == ["best", "last", "last"]


@pytest.mark.slow  # a whole run of ResNet50: three stages compiled
def test_resnet50_run_restores_batch_norm_statistics(tfds_dir, tmp_path):
  c = tiny.detl_config(tfds_dir, "model=resnet50,runlocal")
  workdir = str(tmp_path / "run")
  results = experiment.run(c, workdir)
  state = _latest_state(os.path.join(workdir, "fold0", "stage_b"))
  assert not np.allclose(state["batch_stats"]["conv5_block3_3_bn"]["var"], 1.0)  # updated
  # Stage B froze conv1..conv5_block2, and with them their running statistics.
  a = _latest_state(os.path.join(workdir, "stage_a"))
  np.testing.assert_array_equal(state["batch_stats"]["conv1_bn"]["mean"],
                                a["batch_stats"]["conv1_bn"]["mean"])
  again = experiment.run(c, workdir, mode="eval")  # needs the saved statistics to agree
  np.testing.assert_equal(again["fold_metrics"], results["fold_metrics"])


def test_scratch_run_and_bad_scratch_config(tfds_dir, tmp_path):
  c = tiny.detl_config(tfds_dir, "runlocal,init=scratch")
  results = experiment.run(c, str(tmp_path / "scratch"))
  assert [s["name"] for s in results["stages"]] == ["fold0/stage_b", "fold1/stage_b"]
  c = tiny.detl_config(tfds_dir)
  c.stage_a.enabled = False
  with pytest.raises(ValueError, match="init=scratch"):
    experiment.run(c, str(tmp_path / "bad"))


def test_reports_warn_about_confounding_and_leakage(tiny_config):
  mixed = {"a": {"normal": 10, "covid": 9}, "b": {"normal": 8, "covid": 11}}
  summary = {"test_patients_seen_in_training": 0, "evaluated_label_by_site": mixed}
  assert score.warnings(tiny_config, summary) == []
  tiny_config.data.synthetic.site_confounding = 0.8
  summary["test_patients_seen_in_training"] = 3
  summary["evaluated_label_by_site"] = {"a": {"normal": 10, "covid": 1},
                                        "b": {"normal": 2, "covid": 30}}
  found = score.warnings(tiny_config, summary)
  assert len(found) == 4 and "site-confounded" in found[0] and found[3].startswith("3 (fold, ")
  assert "covid images come from sources where covid makes up" in found[1]
  assert "normal images come from" in found[2]
  # normal: 10 of 12 images come from site a, where normal is 10/11 -> flagged too at 0.8.
  assert score.source_confounded(summary["evaluated_label_by_site"]) == {
      "normal": pytest.approx(10 / 12), "covid": pytest.approx(30 / 31)}


def test_paper_protocol_plan_draws_cohorts_independently(tfds_dir):
  from configs import detl
  c = detl.get_config("runlocal,protocol=paper")
  c.data.tfds_dir = tfds_dir
  cohort, paper = experiment.prepare(c)
  c.protocol = "corrected"
  cohort_c, corrected = experiment.prepare(c)
  assert score.describe(cohort_c, corrected)["test_patients_seen_in_training"] == 0
  # Paper: Data-A may contain Data-B patients; folds are image-level, no stage-B validation.
  assert all(len(s.val) == 0 for s in paper.stages if s.name != "stage_a")
  assert all(len(s.val) > 0 for s in corrected.stages)
  assert [s.init_from for s in paper.stages] == [None, "stage_a", "stage_a"]


def _tiny_concat(tfds_dir, arg="runlocal,init=random"):
  """Paper 2's method at runlocal scale on the fastest network (the runner is under test
  here; tests/test_models.py covers the concatenated network itself)."""
  from configs import concat
  c = concat.get_config(arg)
  c.data.tfds_dir = tfds_dir
  c.model_name = "alexnet"
  c.model = {"width": 1 / 16, "dropout": 0.0, "init_from": None}
  c.phases.epochs = 2
  return tiny.lean(c)


def test_pretrain_stage_trains_once_and_starts_every_fold(tfds_dir, tmp_path):
  c = _tiny_concat(tfds_dir, "runlocal,init=pretrain")
  results = experiment.run(c, str(tmp_path))
  assert [s["name"] for s in results["stages"]] == ["pretrain", "fold0/alexnet", "fold1/alexnet"]
  assert results["initialisation"] == ("pretrain: random; fold0/alexnet .. fold1/alexnet: "
                                       "pretrain's weights, head swapped")
  plan = files.read_json(os.path.join(str(tmp_path), "plan.json"))
  assert [(s["init"], s["init_from"]) for s in plan["stages"]] == [
      ("random", None), ("stage", "pretrain"), ("stage", "pretrain")]
  assert set(plan["stages"][0]["phases"][0]) == {"epochs", *tasks_lib.OTHER_FINDINGS}
  summary = open(os.path.join(str(tmp_path), "results_summary.txt")).read()
  assert "pretrain's weights, head swapped" in summary
  # The method's own tables (paper 2's Tables 3 and 4), in the results, files and summary.
  assert [t["name"] for t in results["tables"]] == ["table4", "table3"]
  for name in ("results_table3.csv", "results_table4.csv"):
    assert os.path.exists(os.path.join(str(tmp_path), name)), name
  assert "paper 2's Table 3 (summed over folds)" in summary
  assert "Paper 2&#x27;s Table 4" in open(os.path.join(str(tmp_path), "report.html")).read()


def test_phased_run_killed_inside_phase_two_resumes_to_the_same_result(tfds_dir, tmp_path,
                                                                       monkeypatch):
  c = _tiny_concat(tfds_dir)
  straight = str(tmp_path / "straight")
  results = experiment.run(c, straight)
  assert [s["phases"] for s in results["stages"]] == [2, 2]
  assert "sampler phased" in " ".join(results["notes"])
  plan = files.read_json(os.path.join(straight, "plan.json"))
  assert [len(s["phases"]) for s in plan["stages"]] == [2, 2]

  resumed = str(tmp_path / "resumed")
  real_save, saves = checkpoint.StageCheckpoints.save, []

  def save_then_die(self, state, step, metrics):
    real_save(self, state, step, metrics)
    saves.append(step)
    if len(saves) == 3:  # fold 0: phase 1 (2 epochs), then phase 2's first epoch
      raise _Killed()

  monkeypatch.setattr(checkpoint.StageCheckpoints, "save", save_then_die)
  with pytest.raises(_Killed):
    experiment.run(c, resumed)
  monkeypatch.setattr(checkpoint.StageCheckpoints, "save", real_save)
  # The optimizer state is carried across phases: its step count runs on from phase 1.
  killed = _latest_state(os.path.join(resumed, "fold0", "alexnet"))
  counts = [int(v) for p, v in jax.tree_util.tree_flatten_with_path(killed["opt_state"])[0]
            if "count" in jax.tree_util.keystr(p)]
  assert counts and all(n == int(killed["step"]) == saves[-1] for n in counts)
  again = experiment.run(c, resumed)
  for stage in ("fold0/alexnet", "fold1/alexnet"):
    x, y = _latest_state(os.path.join(straight, stage)), _latest_state(os.path.join(resumed, stage))
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
      np.testing.assert_array_equal(u, v)
  np.testing.assert_equal(again["fold_metrics"], results["fold_metrics"])


def test_both_protocols_side_by_side_in_one_command(tfds_dir, tmp_path):
  c = _tiny_concat(tfds_dir, "runlocal,protocol=both")
  c.phases.epochs = 1
  workdir = str(tmp_path / "both")
  out = experiment.run(c, workdir)
  paper, corrected = out["protocols"]["paper"], out["protocols"]["corrected"]
  assert (paper["protocol"], corrected["protocol"]) == ("paper", "corrected")
  # The published scheme tests every image no phase used, so far more than the held-out fold.
  assert all(p["num_images"] > c["num_images"]
             for p, c in zip(paper["fold_metrics"], corrected["fold_metrics"]))
  assert paper["data_summary"]["test_patients_seen_in_training"] > 0
  # Its test sets overlap; pooled metrics count every image once (probabilities averaged).
  assert sum(m["num_images"] for m in paper["fold_metrics"]) > paper["num_images"]
  assert paper["pooled"]["num_images"] == paper["num_images"]
  assert any("test sets overlap" in n for n in paper["notes"])
  assert corrected["data_summary"]["test_patients_seen_in_training"] == 0
  from xrayjax.evaluate import report
  assert "kept as the paper protocol does" in report.summary_text(paper)
  assert "images dropped" in report.summary_text(corrected)
  rows = {r["metric"]: r for r in out["compare"]}
  assert rows["accuracy"]["inflation"] == pytest.approx(
      rows["accuracy"]["paper_mean"] - rows["accuracy"]["corrected_mean"])
  assert {"covid/ppv", "macro_auroc"} <= set(rows)
  # ... and, paired on the images both protocols tested, the compare module's difference.
  paired = out["paired"]
  shared = set.intersection(*[
      {r["image_id"] for r in csv.DictReader(open(os.path.join(workdir, p,
                                                                "results_predictions.csv")))}
      for p in ("paper", "corrected")])
  assert 0 < paired["images"] == len(shared) <= min(paper["num_images"], corrected["num_images"])
  acc = {r["metric"]: r for r in paired["rows"]}["accuracy"]
  assert acc["difference"] == pytest.approx(acc["other"] - acc["reference"])
  assert (acc["ci_low"] <= acc["difference"] <= acc["ci_high"] if c.eval.bootstrap else
          np.isnan(acc["ci_low"]))
  assert files.read_json(os.path.join(workdir, "compare.json"))["paired"]["images"] == len(shared)
  assert "both protocols scored, paired" in open(os.path.join(workdir,
                                                              "compare_summary.txt")).read()
  for name in ("compare.json", "compare.csv", "compare_summary.txt", "paper/report.html",
               "corrected/report.html"):
    assert os.path.exists(os.path.join(workdir, name)), name
  # A split-determining change is refused before the run directory is touched, even with
  # --allow_config_change (which would otherwise rewrite the top-level config.json).
  before = {n: os.stat(os.path.join(workdir, n)).st_mtime_ns for n in os.listdir(workdir)}
  c.seed = 1
  with pytest.raises(rundir.ChangedError, match="seed: 0 -> 1"):
    experiment.run(c, workdir, allow_config_change=True)
  assert {n: os.stat(os.path.join(workdir, n)).st_mtime_ns for n in os.listdir(workdir)} == before



def test_best_checkpoint_is_the_epoch_of_highest_validation_accuracy(tmp_path):
  """What select="best" keeps: the checkpoint whose select_metric (train.py sets it to the
  epoch's validation accuracy, and to train.MIDDLE inside an epoch) is highest, beside the
  latest; select="last" (select_metric = step) keeps the latest."""
  from xrayjax import train
  ckpts = checkpoint.StageCheckpoints(str(tmp_path / "best"), "fold0/stage_b")
  for step, acc in ((1, 0.3), (2, 0.7), (3, train.MIDDLE), (4, 0.5), (5, train.MIDDLE)):
    ckpts.save({"params": {"w": jnp.full(2, float(step))}, "batch_stats": {"m": jnp.ones(2)}},
               step, {"select_metric": acc, "val_accuracy": acc})
  assert ckpts.best_step() == 2 and ckpts.latest_step() == 5
  np.testing.assert_array_equal(ckpts.restore_variables(2)["params"]["w"], 2.0)
  assert ckpts.metrics(2)["val_accuracy"] == 0.7
  ckpts.close()
  last = checkpoint.StageCheckpoints(str(tmp_path / "last"), "fold0/stage_b")
  for step in (2, 4, 6):
    last.save({"params": {"w": jnp.zeros(2)}}, step, {"select_metric": float(step)})
  assert last.best_step() == last.latest_step() == 6
  last.close()


def test_checkpoints_written_from_device_or_host_arrays_restore_alike(tmp_path):
  """checkpoint.py saves host copies; a run directory written before that holds orbax's
  jax.Array checkpoints, which must restore the same, onto the devices of `like`."""
  import orbax.checkpoint as ocp
  state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)},
           "batch_stats": {"m": jnp.full(3, 0.5)}, "step": jnp.asarray(7, jnp.int32)}
  new = checkpoint.StageCheckpoints(str(tmp_path / "new"))
  new.save(state, 1, {"select_metric": 1.0})
  new.close()
  with ocp.CheckpointManager(str(tmp_path / "old")) as old:  # as checkpoint.py wrote them
    old.save(1, args=ocp.args.StandardSave(state), metrics={"select_metric": 1.0})
  like = jax.tree.map(jnp.zeros_like, state)
  for name in ("new", "old"):
    ckpts = checkpoint.StageCheckpoints(str(tmp_path / name))
    restored = ckpts.restore(1, like)
    for got, want, x in zip(jax.tree.leaves(restored), jax.tree.leaves(state),
                            jax.tree.leaves(like)):
      assert isinstance(got, jax.Array) and got.sharding == x.sharding and got.dtype == x.dtype
      np.testing.assert_array_equal(got, want, err_msg=name)
    variables = ckpts.restore_variables(1)
    np.testing.assert_array_equal(variables["params"]["w"], state["params"]["w"])
    assert isinstance(variables["batch_stats"]["m"], jax.Array)
    ckpts.close()


class _MeanIntensity(nn.Module):
  """A two-class model of the image's mean intensity: trains in a few SGD steps."""

  @nn.compact
  def __call__(self, images, *, train: bool):
    del train
    return nn.Dense(2, name="head")(images.mean(axis=(1, 2))), {}


@pytest.mark.parametrize("select", ["best", "last"])
def test_a_stage_keeps_the_epoch_of_highest_validation_accuracy(select, tmp_path, monkeypatch):
  """train.train_stage with scripted validation accuracies 0.5, 0.75, 0.25, 0.5 at the ends
  of its 4 epochs: select="best" returns and records the weights of epoch 2, though the
  training loss is lower later and the last epoch is 4; select="last" keeps epoch 4."""
  import ml_collections
  from xrayjax import infer, methods, sharding, train
  from xrayjax.data import pipeline
  rng = np.random.default_rng(0)
  labels = np.arange(16) % 2
  images = np.clip(rng.normal(60 + 130 * labels, 20)[:, None, None, None]
                   + rng.normal(0, 10, (16, 8, 8, 1)), 0, 255).astype(np.uint8)
  ds = pipeline.from_arrays(images, label=labels)
  val = pipeline.from_arrays(images[:4], label=labels[:4])
  scripted = iter([0.5, 0.75, 0.25, 0.5])

  def predict(predict_fn, variables, ds, num_examples, batch_size, mesh):
    right = round(next(scripted) * num_examples)  # the first `right` predictions are right
    truth = labels[:num_examples]
    predicted = np.where(np.arange(num_examples) < right, truth, 1 - truth)
    return np.eye(2)[predicted], truth, np.arange(num_examples)

  monkeypatch.setattr(infer, "predict", predict)
  real_save, saved = checkpoint.StageCheckpoints.save, {}

  def save(self, state, step, metrics):  # every epoch's metrics and weights, as saved
    saved[step] = (dict(metrics), jax.device_get(state.variables))
    real_save(self, state, step, metrics)

  monkeypatch.setattr(checkpoint.StageCheckpoints, "save", save)
  stage = methods.Stage(
      name="stage", classes=("dark", "bright"), labels=labels,
      phases=[methods.Phase(np.arange(16), 4)],
      optimizer=ml_collections.ConfigDict(dict(name="sgd", lr=0.5, momentum=0.0,
                                               schedule="constant")),
      param_rules=((".*", "train"),), batch_size=4, eval_batch_size=4, select=select,
      init_seed=0, seed=0, augment=(), val=np.arange(4))
  model = _MeanIntensity()
  init = train.variables_of(model.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1)),
                                       train=False))
  ckpt_dir = str(tmp_path / "stage")
  variables, summary = train.train_stage(
      stage=stage, model=model, init_variables=init, groups={},
      data=train.StageData(phases=[(ds, 16)], val=val, num_val=4), ckpt_dir=ckpt_dir,
      mesh=sharding.make_mesh(), log_every=100, tb_dir=None)
  # 4 steps per epoch; saved: the epochs selection could pick (the best so far) and the
  # last (the stage keeps only the latest and the best on disk).
  ends = [4, 8, 16] if select == "best" else [16]
  assert sorted(saved) == ends
  assert [saved[s][0]["val_accuracy"] for s in ends] == ([0.5, 0.75, 0.5] if select == "best"
                                                         else [0.5])
  if select == "best":  # the premise: training went on lowering the loss after epoch 2
    assert saved[16][0]["train_loss"] < saved[8][0]["train_loss"]
  chosen = 8 if select == "best" else 16
  assert summary["selected_step"] == chosen
  assert summary["selected_metrics"]["val_accuracy"] == saved[chosen][0]["val_accuracy"]
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(saved[chosen][1])):
    np.testing.assert_array_equal(np.asarray(a), b)
  if select == "best":  # ... not the weights the stage ended with
    assert not np.array_equal(np.asarray(variables["params"]["head"]["kernel"]),
                              saved[16][1]["params"]["head"]["kernel"])
  # A run directory read later (eval, predict) gets the same choice.
  restored, restored_summary = infer.restore(ckpt_dir)
  assert restored_summary["selected_step"] == chosen
  np.testing.assert_array_equal(restored["params"]["head"]["kernel"],
                                saved[chosen][1]["params"]["head"]["kernel"])


@pytest.mark.parametrize("select_on", ["val_accuracy", "val_balanced_accuracy"])
def test_a_stage_can_select_on_validation_balanced_accuracy(select_on, tmp_path, monkeypatch):
  """Validation labels 0, 0, 0, 1 and scripted predictions per epoch: all 0 (accuracy 0.75,
  balanced 0.5), then 0, 0, 1, 1 (accuracy 0.75, balanced 0.83), then all 0 again. Selecting
  on balanced accuracy keeps epoch 2; on accuracy the three tie and the last one is kept."""
  import ml_collections
  from xrayjax import infer, methods, sharding, train
  from xrayjax.data import pipeline
  rng = np.random.default_rng(0)
  labels = np.arange(16) % 2
  images = np.clip(rng.normal(60 + 130 * labels, 20)[:, None, None, None]
                   + rng.normal(0, 10, (16, 8, 8, 1)), 0, 255).astype(np.uint8)
  val_labels = np.array([0, 0, 0, 1])
  scripted = iter([[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]])

  def predict(predict_fn, variables, ds, num_examples, batch_size, mesh):
    return np.eye(2)[next(scripted)], val_labels, np.arange(4)

  monkeypatch.setattr(infer, "predict", predict)
  with pytest.raises(ValueError, match="select_on 'val_auroc' is not one of"):
    methods.Stage(name="s", classes=("a", "b"), labels=labels,
                  phases=[methods.Phase(np.arange(16), 3)], optimizer={}, param_rules=(),
                  batch_size=4, eval_batch_size=4, select="best", init_seed=0, seed=0,
                  augment=(), val=np.arange(4), select_on="val_auroc")
  stage = methods.Stage(
      name="stage", classes=("dark", "bright"), labels=labels,
      phases=[methods.Phase(np.arange(16), 3)],
      optimizer=ml_collections.ConfigDict(dict(name="sgd", lr=0.5, momentum=0.0,
                                               schedule="constant")),
      param_rules=((".*", "train"),), batch_size=4, eval_batch_size=4, select="best",
      init_seed=0, seed=0, augment=(), val=np.arange(4), select_on=select_on)
  model = _MeanIntensity()
  init = train.variables_of(model.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1)),
                                       train=False))
  _, summary = train.train_stage(
      stage=stage, model=model, init_variables=init, groups={},
      data=train.StageData(phases=[(pipeline.from_arrays(images, label=labels), 16)],
                           val=pipeline.from_arrays(images[:4], label=val_labels), num_val=4),
      ckpt_dir=str(tmp_path / "stage"), mesh=sharding.make_mesh(), log_every=100, tb_dir=None)
  m = summary["selected_metrics"]
  if select_on == "val_balanced_accuracy":
    assert summary["selected_step"] == 8
    assert (m["val_accuracy"], m["val_balanced_accuracy"]) == (0.75, pytest.approx(5 / 6))
  else:
    assert summary["selected_step"] == 12
    assert (m["val_accuracy"], m["val_balanced_accuracy"]) == (0.75, 0.5)
