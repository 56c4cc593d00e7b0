"""Launching runs beyond one command: sweeps and cluster templates.

  hyper.py               helpers for sweep files (configs/sweeps/*.py): sweep, fixed, product, zipit
  sweep.py               `python -m launch.sweep`: every trial of a sweep as its own
                         `python -m xrayjax.main` process (local process pool or Ray tasks),
                         skip finished trials, ranked table (CSV, HTML, printed)
  slurm_array.sh         SLURM job array: one sweep trial per array task
  slurm_multihost.sh     SLURM job: one run over several nodes (`--distributed`)
  tpu_vm_pod.sh          Cloud TPU VM pod slice: one run on every worker (`--worker=all`)

Nothing here imports JAX or TensorFlow: the launcher must not take an accelerator from the
runs it starts.
"""
