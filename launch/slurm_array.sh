#!/bin/bash
# SLURM job array: one sweep trial per array task (python -m launch.sweep --trial=K).
#
#   CONFIG=configs/detl.py SWEEP=configs/sweeps/demo_lr_init.py
#   DIR=$PWD/checkpoints/sweeps/demo_lr_init            # on a file system every node sees
#   N=$(python -m launch.sweep --config=$CONFIG --sweep=$SWEEP --list | wc -l)   # 4 trials
#   sbatch --array=0-$((N - 1))%4 launch/slurm_array.sh $CONFIG $SWEEP $DIR [-- --config.x=y ...]
#   python -m launch.sweep --config=$CONFIG --sweep=$SWEEP --workdir=$DIR --table   # ranked table
#
# Task K runs trial K of the sweep file (the order of get_sweep(), as --list prints it) in the
# foreground in $DIR/<trial name>, its output in that directory's trial.log and in the SLURM
# output file. A finished trial is skipped, an unfinished one resumes in its directory, so
# resubmitting the same array after a preemption or a failure runs only what is left. Every
# task refreshes $DIR/sweep.csv and sweep.html when its trial ends. Submit from the project
# root (its .venv is used); adjust the resources below to one trial's needs.
#SBATCH --job-name=xrayjax-sweep
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:1
#SBATCH --time=08:00:00
#SBATCH --output=slurm-%A_%a.out
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: sbatch --array=0-<N-1> $0 CONFIG SWEEP_FILE SWEEP_DIR [-- xrayjax.main flags]" >&2
  exit 2
fi
config=$1 sweep=$2 sweep_dir=$3
shift 3
cd "${SLURM_SUBMIT_DIR:-.}"
. .venv/bin/activate
exec python -m launch.sweep --config="$config" --sweep="$sweep" --workdir="$sweep_dir" \
  --trial="${SLURM_ARRAY_TASK_ID:?submit with sbatch --array}" "$@"
