#!/bin/bash
# One xrayjax run on a Cloud TPU VM pod slice (e.g. v4-32: 4 hosts of 4 chips): the same
# command on every worker (--worker=all), each with --distributed; jax.distributed.initialize()
# finds the other hosts from the TPU VM's metadata.
#
#   export TPU=my-v4-32 ZONE=us-central2-b REPO=https://github.com/<you>/xrayjax.git
#   bash launch/tpu_vm_pod.sh setup        # once: clone and install on every worker
#   bash launch/tpu_vm_pod.sh run --config=configs/detl.py:scale=paper \
#       --workdir=/mnt/shared/detl-paper --config.data.tfds_dir=/mnt/shared/tfds
#
# The run directory and the data must be at the same path on every worker (a Filestore / NFS
# mount; xrayjax writes files with POSIX renames, so not a gs:// path). The same `run` command
# resumes a preempted run. Each worker's output streams back here, prefixed by its index.
set -euo pipefail
: "${TPU:?set TPU (the TPU VM name)}" "${ZONE:?set ZONE}"
dir=${XRAYJAX_DIR:-xrayjax}  # the checkout on every worker, relative to the home directory
on_all() {
  gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$1"
}
case "${1:-}" in
  setup)
    : "${REPO:?set REPO (a git URL every worker can clone)}"
    on_all "set -e; [ -d $dir ] || git clone $REPO $dir; cd $dir && python3 -m venv .venv &&
      . .venv/bin/activate && pip install -q -e . 'jax[tpu]>=0.10,<0.11'"
    ;;
  run)
    shift
    on_all "cd $dir && . .venv/bin/activate && python -m xrayjax.main --distributed $(printf '%q ' "$@")"
    ;;
  *)
    echo "usage: $0 setup | run XRAYJAX_MAIN_FLAGS (with TPU, ZONE and for setup REPO set)" >&2
    exit 2
    ;;
esac
