#!/bin/bash
# One xrayjax run over several nodes (multi-host data parallelism): srun starts one process
# per GPU, each with --distributed, and jax.distributed.initialize() takes the coordinator, the
# process count and this process's index from SLURM's environment, and gives each process the
# GPU numbered by its SLURM_LOCALID (so every task must see all of its node's GPUs: --gres, not
# --gpus-per-task). All devices join one mesh; each process reads its shard of every batch;
# process 0 writes the reports.
#
#   sbatch --nodes=2 launch/slurm_multihost.sh --config=configs/detl.py:scale=paper \
#       --workdir=$PWD/checkpoints/detl-paper-2nodes
#
# --workdir is required and must be on a file system every node sees (the default name holds
# the start time, which the processes would not agree on); the data (--config.data.tfds_dir, or
# the sources' roots) too. Batch sizes must be multiples of the global device count. The same
# command resumes a killed or preempted run. Set --ntasks-per-node and --gres to your nodes'
# GPU count (CPU-only nodes: one task per node, no --gres).
#SBATCH --job-name=xrayjax-multihost
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail
case " $* " in
  *" --workdir="*) ;;
  *) echo "give --workdir=DIR on a shared file system (the same for every node)" >&2; exit 2 ;;
esac
cd "${SLURM_SUBMIT_DIR:-.}"
. .venv/bin/activate
srun python -m xrayjax.main --distributed "$@"
