r"""DETL (Basu, Mitra & Saha 2020): train on Data-A from scratch, fine-tune on Data-B.

Commands (from the project root):

  # Demo scale (default): synthetic 128 px data, a 1/8-width VGG16, maps by HiResCAM;
  # about 8 minutes on a 2-core CPU, data generation and evaluation (report.html) included.
  python -m xrayjax.main --config=configs/detl.py

  # AlexNet, the paper's protocol, or training from scratch on Data-B (no stage A):
  python -m xrayjax.main --config=configs/detl.py:model=alexnet
  python -m xrayjax.main --config=configs/detl.py:protocol=paper
  python -m xrayjax.main --config=configs/detl.py:init=scratch

  # The published protocol and the corrected one side by side (how much it inflates):
  python -m xrayjax.main --config=configs/detl.py:protocol=both

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

  # Every run ends with a shortcut audit (docs/shortcut-audit.md); its opt-in retrained
  # runs train the same method on border-only and lung-only inputs, side by side:
  python -m xrayjax.main --config=configs/detl.py --config.audit.retrain=border,lungs

  # Tiny (for tests and smoke runs, seconds):
  python -m xrayjax.main --config=configs/detl.py:runlocal --workdir=/tmp/detl_tiny

  # The published recipe: 224 px, full-width networks, the paper's data sizes and
  # 100 epochs (an accelerator job; synthetic data at 256 px takes ~1 h to build):
  python -m xrayjax.main --config=configs/detl.py:scale=paper

  # Any field can be overridden: --config.stage_b.epochs=30 --config.model.width=0.25

Config args (comma separated): model=vgg16|alexnet|resnet50|resnet50v2|xception|concat
(resnet50 is the paper's 3x3-stem variant; the last three are paper 2's networks),
data=synthetic|manifest|nih, classes=4|3 (Data-B's task: the paper's four classes or paper
2's three), protocol=corrected|paper|both, init=detl|scratch, scale=demo|paper, runlocal.
Other native sources (rsna_pneumonia, covidx) are chosen with --config.data.source, several
at once comma separated, each with its --config.data.<source>.root.

The config reads top to bottom: every field once, at demo scale, in the config's own names;
then what `scale=paper` and `runlocal` change; then the demo's recipe per model (DEMO_RECIPES,
keyed by config path); then what the data and `init` decide. `--print_config` prints the
result. What to expect, and the measurements behind each choice: docs/detl.md.

Where the paper is silent we chose, and say so here:
  - input size: 224 (paper scale); batch size 32 (stage A) and 16 (stage B);
    stage-B epochs: the stage-A count (paper scale);
  - stage B keeps the best-validation weights (corrected) or the last (paper);
  - init=scratch trains every layer of the same network on Data-B with the
    stage-A recipe (Adam, cosine), since SGD 1e-4 from random weights barely moves.
Where the demo departs from the paper (scale=paper does not): a recipe per model
(DEMO_RECIPES: learning rates; VGG16, AlexNet and ResNet50 fine-tune every layer in stage B;
VGG16 at 128 px with fewer epochs, and HiResCAM on block4 against the mean map of the
normal training films in place of Grad-CAM) and
AlexNet without dropout (docs/detl.md, "Why each demo recipe").
"""

from __future__ import annotations

import ml_collections

from configs import common

MODELS = ("vgg16", "alexnet", "resnet50", "resnet50v2", "xception", "concat")
PAPER_DATA_A = {"normal": 57_560, "disease": 50_819}  # train 47,560/40,819 + val 10,000/10,000
PAPER_DATA_B = {"normal": 350, "pneumonia": 322, "other_disease": 300, "covid": 305}

# Stage B's two rules. The paper's: the last conv block and the head train (SGD, momentum
# 0.9), everything before them is frozen. "all": every layer, Adam with cosine decay.
LAST_BLOCK = (("{before_last_conv_block}", "freeze"), ("{last_conv_block}|{head}", "train"))
ALL_LAYERS = ((".*", "train"),)


def _last_block(lr: float) -> dict:
  return {"stage_b.optimizer": dict(name="sgd", lr=lr, schedule="constant", momentum=0.9),
          "stage_b.param_rules": LAST_BLOCK}


def _all_layers(lr: float) -> dict:
  return {"stage_b.optimizer": dict(name="adam", lr=lr, schedule="cosine", momentum=0.0),
          "stage_b.param_rules": ALL_LAYERS}


# The demo's recipe per model, by config path (measured on the demo data; docs/detl.md,
# "Why each demo recipe"): stage A's Adam rate, and what stage B trains.
DEMO_RECIPES = {
    "vgg16": {"stage_a.optimizer.lr": 3e-4, **_all_layers(3e-4), "data.image_size": 128,
              "stage_a.epochs": 6, "stage_b.epochs": 20, "eval.gradcam.target": "block4",
              "eval.gradcam.method": "hirescam", "eval.gradcam.reference": "normal"},
    "alexnet": {"stage_a.optimizer.lr": 1e-3, **_all_layers(1e-3)},
    "resnet50": {"stage_a.optimizer.lr": 3e-3, **_all_layers(3e-3)},
    # Paper 2's networks: not tuned for DETL.
    "resnet50v2": {"stage_a.optimizer.lr": 3e-4, **_last_block(3e-3)},
    "xception": {"stage_a.optimizer.lr": 3e-4, **_last_block(3e-3)},
    "concat": {"stage_a.optimizer.lr": 3e-4, **_last_block(3e-3)},
}
# Data-B images per class (whole patients are drawn; 0 = every available image), by
# (data, classes) below paper scale; paper scale takes the paper's sizes for 4 classes.
DATA_B = {
    ("synthetic", "4"): {"normal": 120, "pneumonia": 0, "other_disease": 120, "covid": 0},
    ("nih", "4"): {"normal": 120, "pneumonia": 0, "other_disease": 120, "covid": 0},
    # sized for the 64 px benchmark (about 400 images per class)
    ("manifest", "4"): {"normal": 120, "pneumonia": 120, "other_disease": 120, "covid": 120},
    ("synthetic", "3"): {"normal": 0, "pneumonia": 0, "covid": 0},
    ("nih", "3"): {"normal": 0, "pneumonia": 0, "covid": 0},
    # Half the normals: the other half (the same patients at 64 px) are Data-A's normals.
    ("manifest", "3"): {"normal": 200, "pneumonia": 0, "covid": 0},
}
RUNLOCAL_DATA_B = {"4": {"normal": 16, "pneumonia": 0, "other_disease": 16, "covid": 0},
                   "3": {"normal": 16, "pneumonia": 0, "covid": 0}}
# The model's input size where the data decide it (demo scale): the 64 px 4-class benchmark,
# and the 3-class 256 px one at 128.
MANIFEST_INPUT = {"4": 64, "3": 128}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(
      arg,
      defaults={"model": "vgg16", "data": "synthetic", "classes": "4", "protocol": "corrected",
                "init": "detl", "scale": "demo"},
      choices={"model": MODELS, "data": ("synthetic", "manifest", "nih"), "classes": ("4", "3"),
               "protocol": ("corrected", "paper", "both"), "init": ("detl", "scratch"),
               "scale": ("demo", "paper")},
      flags=("runlocal",))
  model, data, classes = args["model"], args["data"], args["classes"]
  scale = "runlocal" if args["runlocal"] else args["scale"]  # runlocal wins over scale
  c = ml_collections.ConfigDict()
  common.header(c, "detl", args["protocol"], data)

  # --- data ---
  # source: one or several (comma separated) of synthetic, manifest, nih_cxr14,
  # rsna_pneumonia, ieee8023_covid, covidx; each has its options below. Native sources are
  # built once into tfds_dir (None: $TFDS_DATA_DIR or ~/tensorflow_datasets) at their
  # image_size; data.image_size is the model's input (images are resized).
  c.data = common.data_config(data)
  c.data.image_size = 96
  c.data.synthetic.image_size = 128
  c.data.synthetic.patients = (800, 60, 800, 60)  # normal, pneumonia, other_disease, covid
  # Images per class (whole patients are drawn; 0 = every available image).
  # data_a.sources: only these sources (comma separated values of the `source` field) feed
  # Data-A ("" = all; data=nih: NIH alone, as the paper); data_a.data: a data config of its
  # own for Data-A (None = data; its image_size is unused, both stages take data.image_size).
  c.data_a = dict(images_per_class={"normal": 0, "disease": 0}, val_fraction=0.2,
                  sources="nih_cxr14" if data == "nih" else "", data=None)
  # task: data_b (normal, pneumonia, other_disease, covid) or three_class (paper 2's classes).
  c.data_b = dict(task="data_b" if classes == "4" else "three_class",
                  images_per_class=DATA_B[data, classes], val_fraction=0.2)
  # The DETL paper's augmentation: random rotation, scaling and mirroring (pipeline.parse_ops).
  c.augment = ("rotate(10)", "zoom(0.1)", "flip_lr")

  # --- model ---
  c.model_name = model
  c.model = common.model_config(width=0.125)
  if model == "resnet50":
    c.model.stem_kernel = 3  # the DETL variant: 3x3 kernels in place of ResNet50's 7x7 stem
  if model == "alexnet":
    c.model.dropout = 0.0  # at 1/8 width the paper's 0.5 killed conv5 (docs/detl.md)

  # --- stage A: from scratch on Data-A (paper: Adam 1e-3, cosine decay, best val accuracy) ---
  c.stage_a = dict(enabled=args["init"] == "detl", epochs=10, batch_size=32, eval_batch_size=64)
  c.stage_a.optimizer = dict(name="adam", lr=1e-3, schedule="cosine", momentum=0.0)
  # --- stage B: a new head; the paper's rule (_last_block: SGD 1e-4, momentum 0.9) ---
  c.stage_b = dict(epochs=30, batch_size=16, eval_batch_size=64, optimizer={}, param_rules=())
  common.override(c, _last_block(1e-4))

  # --- evaluation ---
  c.eval = common.eval_config(bootstrap=1000, per_class=3)
  c.eval.gradcam.update(target="features", method="gradcam")
  c.audit = common.audit_config()

  if scale == "paper":  # the published recipe: 224 px, full width, the paper's data sizes
    c.log_every = 100
    c.data.image_size = 224
    c.data.synthetic.update(image_size=256, patients=(30_000, 330, 27_000, 320))
    c.data_a.images_per_class = PAPER_DATA_A
    c.data_a.val_fraction = 20_000 / sum(PAPER_DATA_A.values())
    if classes == "4":
      c.data_b.images_per_class = PAPER_DATA_B
    c.model.width = 1.0
    if model == "alexnet":
      c.model.dropout = 0.5
    c.stage_a.epochs = c.stage_b.epochs = 100
  if scale == "runlocal":  # tiny everything, for tests and smoke runs (seconds)
    c.folds, c.log_every = 2, 1
    c.data.image_size = 32
    c.data.synthetic.update(image_size=64, patients=(24, 8, 24, 8))
    c.data_b.images_per_class = RUNLOCAL_DATA_B[classes]
    c.model.width = 1 / 16
    c.stage_a.update(epochs=1, batch_size=8, eval_batch_size=16)
    c.stage_a.optimizer.lr = 3e-4
    c.stage_b.update(epochs=1, batch_size=8, eval_batch_size=16)
    c.stage_b.optimizer.lr = 3e-3
    c.eval.update(bootstrap=50)
    c.eval.gradcam.per_class = 1
  if scale == "demo":
    common.override(c, DEMO_RECIPES[model])
    if data == "manifest":
      c.data.image_size = MANIFEST_INPUT[classes]

  if data == "manifest" and classes == "3":  # the 3-class 256 px benchmark: Data-A from the 64 px
    c.data.manifest.update(label_column="label3", image_size=256)
    c.data_a.data = common.data_config("manifest")
    c.data_a.data.manifest.update(path_env="XRAYJAX_DATA_A_MANIFEST", label_column="label4",
                                  image_size=64)
  if args["init"] == "scratch":
    # No stage A: the same network, every layer trained on Data-B with the stage-A recipe
    # (SGD 1e-4 from random weights barely moves).
    c.stage_b.optimizer = c.stage_a.optimizer.to_dict()
    c.stage_b.param_rules = ALL_LAYERS
  return c
