r"""DETL (Basu, Mitra & Saha 2020): train on Data-A from scratch, fine-tune on Data-B.

Commands (from the project root):

  # Demo scale (default): synthetic 128 px data resized to 96 px, a 1/8-width VGG16;
  # about 9 minutes on a 2-core CPU, data generation and evaluation (report.html) included.
  python -m xrayjax.main --config=configs/detl.py

  # AlexNet, the paper's protocol, or training from scratch on Data-B (no stage A):
  python -m xrayjax.main --config=configs/detl.py:model=alexnet
  python -m xrayjax.main --config=configs/detl.py:protocol=paper
  python -m xrayjax.main --config=configs/detl.py:init=scratch

  # Real images listed in a manifest CSV (path, label4, patient_id, source), e.g. the
  # shared 4-class benchmark at 64 px (the path may also come from $XRAYJAX_MANIFEST):
  python -m xrayjax.main --config=configs/detl.py:data=manifest \
      --config.data.manifest.path=../shared/data/cxr_bench_64/manifest.csv

  # The 3-class 256 px benchmark (normal, pneumonia, covid; column label3). It has no
  # other_disease images, so Data-A (normal vs other disease) comes from the 4-class 64 px
  # benchmark; its Data-B patients and duplicates are kept out of Data-A:
  python -m xrayjax.main --config=configs/detl.py:data=manifest,classes=3 \
      --config.data.manifest.path=../shared/data/cxr_bench_256/manifest.csv \
      --config.data_a.data.manifest.path=../shared/data/cxr_bench_64/manifest.csv

  # The paper's data: NIH ChestX-ray14 (Data-A; Data-B's normal, pneumonia and
  # other_disease) and ieee8023 (Data-B's covid), read from their native directories
  # (or $XRAYJAX_NIH_CXR14 / $XRAYJAX_IEEE8023_COVID), at the paper's scale:
  python -m xrayjax.main --config=configs/detl.py:data=nih,scale=paper \
      --config.data.nih_cxr14.root=/data/ChestX-ray14 \
      --config.data.ieee8023_covid.root=/data/covid-chestxray-dataset

  # Paper 2's networks (Keras layouts), optionally from Keras/ImageNet weight files on disk:
  python -m xrayjax.main --config=configs/detl.py:model=xception,init=scratch \
      --config.model.width=1 --config.model.init_from=PATH/xception_..._notop.h5

  # Tiny (for tests and smoke runs, seconds):
  python -m xrayjax.main --config=configs/detl.py:runlocal --workdir=/tmp/detl_tiny

  # The published recipe: 224 px, full-width networks, the paper's data sizes and
  # 100 epochs (an accelerator job; synthetic data at 256 px takes ~1 h to build):
  python -m xrayjax.main --config=configs/detl.py:scale=paper

  # Any field can be overridden: --config.stage_b.epochs=30 --config.model.width=0.25

Config args (comma separated): model=vgg16|alexnet|resnet50|resnet50v2|xception|concat
(resnet50 is the paper's 3x3-stem variant; the last three are paper 2's networks),
data=synthetic|manifest|nih, classes=4|3 (Data-B's task: the paper's four classes or paper
2's three), protocol=corrected|paper, init=detl|scratch, scale=demo|paper, runlocal.
Other native sources (rsna_pneumonia, covidx) are chosen with --config.data.source, several
at once comma separated, each with its --config.data.<source>.root.

What to expect at demo scale (README, "Results"): 5-fold accuracy 58.3% ± 1.5
(chance 25%), macro AUROC 0.85; model=alexnet 55.4% ± 11.2, AUROC 0.81;
init=scratch 52.7% ± 10.6, AUROC 0.77. model=resnet50 stays at chance with this
recipe (24.4% ± 3.0, AUROC 0.51): the demo settings were tuned for VGG16.

Where the paper is silent we chose, and say so here:
  - input size: 224 (paper scale); batch size 32 (stage A) and 16 (stage B);
    stage-B epochs: the stage-A count (paper scale);
  - stage B keeps the best-validation weights (corrected) or the last (paper);
  - init=scratch trains every layer of the same network on Data-B with the
    stage-A recipe (Adam, cosine), since SGD 1e-4 from random weights barely moves.
Where the demo departs from the paper (scale=paper does not): learning rates
(Adam 3e-4, SGD 3e-3) and AlexNet without dropout; the comments below say why.
"""

from __future__ import annotations

import ml_collections

from configs import common

MODELS = ("vgg16", "alexnet", "resnet50", "resnet50v2", "xception", "concat")
PAPER_DATA_A = {"normal": 57_560, "disease": 50_819}  # train 47,560/40,819 + val 10,000/10,000
PAPER_DATA_B = {"normal": 350, "pneumonia": 322, "other_disease": 300, "covid": 305}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(
      arg,
      defaults={"model": "vgg16", "data": "synthetic", "classes": "4", "protocol": "corrected",
                "init": "detl", "scale": "demo"},
      choices={"model": MODELS, "data": ("synthetic", "manifest", "nih"), "classes": ("4", "3"),
               "protocol": ("corrected", "paper"), "init": ("detl", "scratch"),
               "scale": ("demo", "paper")},
      flags=("runlocal",))
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.protocol = args["protocol"]
  c.folds = 5
  c.log_every = 20

  # --- data ---
  # source: one or several (comma separated) of synthetic, manifest, nih_cxr14,
  # rsna_pneumonia, ieee8023_covid, covidx; each has its options below. Native sources are
  # built once into tfds_dir (None: $TFDS_DATA_DIR or ~/tensorflow_datasets) at their
  # image_size; data.image_size is the model's input (images are resized).
  c.data = data_config(args["data"])
  # Duplicates (exact file copies, and 256-bit pHashes at most max_distance bits apart) are
  # found across all sources before splitting; the corrected protocol drops copies and keeps
  # patients joined by a duplicate in one partition (duplicates.json in the run directory).
  # 24 of 256 bits: on the shared benchmark the pictures ieee8023 holds under two patient
  # ids are 0-22 bits apart (re-cropped, re-windowed copies) and different patients' images
  # more than 48. The synthetic phantoms share one anatomy template and are closer (different
  # patients from 13 bits), so synthetic data uses 12 (it holds no copies).
  c.dedup = dict(max_distance=12 if args["data"] == "synthetic" else 24)
  # Images per class (whole patients are drawn; 0 = every available image).
  # data_a.sources: only these sources (comma separated values of the `source` field) feed
  # Data-A ("" = all); data_a.data: a data config of its own for Data-A (None = data; its
  # image_size is unused, both stages take data.image_size).
  c.data_a = dict(images_per_class={"normal": 0, "disease": 0}, val_fraction=0.2,
                  sources="", data=None)
  # task: data_b (normal, pneumonia, other_disease, covid) or three_class (paper 2's classes).
  c.data_b = dict(task="data_b", images_per_class={"normal": 120, "pneumonia": 0,
                                                   "other_disease": 120, "covid": 0},
                  val_fraction=0.2)
  c.augment = dict(enabled=True, rotation_deg=10.0, scale=0.1, mirror=True)

  # --- evaluation ---
  # prevalences: PPV and NPV are also reported as they would be at these prevalences.
  # bootstrap: patient-clustered resamples for the 95% intervals (0: none).
  # gradcam: maps of `target` (any entry of the model's `out`; concat also has xception,
  # resnet50v2, concat) by `method` (gradcam | gradcam++): overlays of per_class images per
  # class and of every misclassified one; localisation scores; the model-randomisation
  # check on the first sanity_folds folds.
  c.eval = dict(prevalences=(0.01, 0.05, 0.2), bootstrap=1000,
                gradcam=dict(enabled=True, target="features", method="gradcam", per_class=3,
                             misclassified=True, sanity_folds=1, batch_size=16))

  # --- model ---
  c.model_name = args["model"]
  # init_from: Keras weight file(s) (.keras, .weights.h5, .h5; comma separated) loaded over the
  # random initialisation of the first stage that trains (models/keras_weights.py).
  c.model = dict(width=0.125, init_from=ml_collections.config_dict.placeholder(str))
  if args["model"] == "resnet50":
    c.model.stem_kernel = 3  # the DETL variant: 3x3 kernels in place of ResNet50's 7x7 stem
  if args["model"] == "alexnet":
    # AlexNet's dropout 0.5 on 1/8-width (512-unit) FC layers: stage-B SGD drove 99.9% of
    # conv5 units dead and the demo stayed at chance (measured); full width keeps 0.5.
    c.model.dropout = 0.0

  # --- stage A: from scratch on Data-A (paper: Adam 1e-3, cosine decay, best val accuracy) ---
  c.stage_a = dict(enabled=args["init"] == "detl", epochs=10, batch_size=32, eval_batch_size=64)
  # The paper: Adam 1e-3. At demo scale (a 1/8-width net, 8 epochs) 3e-4 learns faster.
  c.stage_a.optimizer = dict(name="adam", lr=3e-4, schedule="cosine", momentum=0.0)

  # --- stage B: new 4-way head, layers before the last conv block frozen, SGD 1e-4 m 0.9 ---
  c.stage_b = dict(epochs=30, batch_size=16, eval_batch_size=64)
  # The paper: SGD 1e-4, momentum 0.9. At demo scale (a few hundred steps) 1e-4 barely moves
  # the new head (val accuracy 0.36 after 10 epochs, measured), so the demo uses 3e-3.
  c.stage_b.optimizer = dict(name="sgd", lr=3e-3, schedule="constant", momentum=0.9)
  c.stage_b.param_rules = (("{before_last_conv_block}", "freeze"),
                           ("{last_conv_block}|{head}", "train"))

  if args["data"] == "manifest":  # sized for the 64 px benchmark (about 400 images per class)
    c.data.image_size = 64
    c.data_b.images_per_class = {"normal": 120, "pneumonia": 120, "other_disease": 120,
                                 "covid": 120}
  if args["data"] == "nih":  # the paper's sources: Data-A from NIH alone
    c.data_a.sources = "nih_cxr14"
  if args["classes"] == "3":
    c.data_b.task = "three_class"
    c.data_b.images_per_class = {"normal": 0, "pneumonia": 0, "covid": 0}
    if args["data"] == "manifest":  # the 3-class 256 px benchmark; Data-A from the 64 px one
      # Half the normals: the other half (the same patients at 64 px) are Data-A's normals.
      c.data_b.images_per_class.normal = 200
      c.data.manifest.update(label_column="label3", image_size=256)
      c.data.image_size = 128
      c.data_a.data = data_config("manifest")
      c.data_a.data.manifest.update(path_env="XRAYJAX_DATA_A_MANIFEST", label_column="label4",
                                    image_size=64)

  if args["scale"] == "paper":
    c.data.image_size = 224
    c.data.synthetic.image_size = 256
    c.data.synthetic.patients = (30_000, 330, 27_000, 320)
    c.data_a.images_per_class = PAPER_DATA_A
    c.data_a.val_fraction = 20_000 / sum(PAPER_DATA_A.values())
    if args["classes"] == "4":
      c.data_b.images_per_class = PAPER_DATA_B
    c.model.width = 1.0
    if args["model"] == "alexnet":
      c.model.dropout = 0.5
    c.stage_a.optimizer.lr = 1e-3
    c.stage_b.optimizer.lr = 1e-4
    c.stage_a.epochs = c.stage_b.epochs = 100
    c.log_every = 100

  if args["runlocal"]:
    c.data.image_size = 32
    c.data.synthetic.image_size = 64
    c.data.synthetic.patients = (24, 8, 24, 8)
    c.data_b.images_per_class = {"normal": 16, "pneumonia": 0, "other_disease": 16, "covid": 0}
    c.folds = 2
    c.model.width = 1 / 16
    c.stage_a.update(epochs=1, batch_size=8, eval_batch_size=16)
    c.stage_b.update(epochs=1, batch_size=8, eval_batch_size=16)
    c.eval.bootstrap = 50
    c.eval.gradcam.per_class = 1
    c.log_every = 1

  if args["init"] == "scratch":  # same network, every layer trained on Data-B, stage-A recipe
    c.stage_b.optimizer = c.stage_a.optimizer.to_dict()
    c.stage_b.param_rules = ((".*", "train"),)
  return c


def data_config(source: str) -> ml_collections.ConfigDict:
  """The data block: which sources, and every source's options."""
  placeholder = ml_collections.config_dict.placeholder
  source = {"nih": "nih_cxr14,ieee8023_covid"}.get(source, source)
  return ml_collections.ConfigDict(dict(
      source=source, image_size=96, tfds_dir=placeholder(str),
      synthetic=dict(image_size=128, patients=(800, 60, 800, 60), site_confounding=0.0, seed=0),
      # A CSV (path, label column, patient_id, source), e.g. ../shared/data/cxr_bench_64/
      # manifest.csv; path_env names the environment variable read when path is unset.
      manifest=dict(path=placeholder(str), path_env="XRAYJAX_MANIFEST", label_column="label4",
                    image_size=64),
      # Native layouts (data/sources/*.py); root also from $XRAYJAX_<SOURCE>.
      nih_cxr14=dict(root=placeholder(str), image_size=256),
      rsna_pneumonia=dict(root=placeholder(str), image_size=256),
      ieee8023_covid=dict(root=placeholder(str), image_size=256, frontal_only=True),
      covidx=dict(root=placeholder(str), image_size=256, label_files=""),
  ))
