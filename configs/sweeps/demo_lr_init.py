r"""DETL's demo: stage-B learning rate x initialisation (DETL transfer vs scratch), 4 trials.

  python -m launch.sweep --config=configs/detl.py --sweep=configs/sweeps/demo_lr_init.py \
      --backend=local --parallel=1 --workdir=checkpoints/sweeps/demo_lr_init
  python -m launch.sweep --config=configs/detl.py --sweep=configs/sweeps/demo_lr_init.py --list

Each trial is the demo run (13 minutes on a 2-core CPU; init=scratch has no stage A and
is quicker). `init` is a config argument (configs/detl.py:init=detl|scratch), the rate a field.
With the demo's VGG16 recipe both inits train every layer in stage B with the same optimizer
(Adam, cosine, 3e-4 by default), so one grid of rates serves both: the default and 3x lower.
"""

from launch import hyper

LR = "config.stage_b.optimizer.lr"


def get_sweep():
  return hyper.product(hyper.sweep("config:init", ["detl", "scratch"]), hyper.sweep(LR, [3e-4, 1e-4]))
