r"""DETL's demo: stage-B learning rate x initialisation (DETL transfer vs scratch), 4 trials.

  python -m launch.sweep --config=configs/detl.py --sweep=configs/sweeps/demo_lr_init.py \
      --backend=local --parallel=1 --workdir=checkpoints/sweeps/demo_lr_init
  python -m launch.sweep --config=configs/detl.py --sweep=configs/sweeps/demo_lr_init.py --list

Each trial is the demo run (about 9 minutes on a 2-core CPU; init=scratch has no stage A and
is quicker). `init` is a config argument (configs/detl.py:init=detl|scratch), the rate a field.
The two inits train stage B with different optimizers: detl fine-tunes stage A's weights with
SGD (demo default 3e-3), scratch trains every layer from random weights with Adam (demo default
3e-4; the stage-A recipe). One grid of rates would put one of them far outside its range, so
each init gets its own default and a rate 3x lower.
"""

from launch import hyper

LR = "config.stage_b.optimizer.lr"


def get_sweep():
  return (hyper.product(hyper.fixed("config:init", "detl"), hyper.sweep(LR, [3e-3, 1e-3])) +
          hyper.product(hyper.fixed("config:init", "scratch"), hyper.sweep(LR, [3e-4, 1e-4])))
