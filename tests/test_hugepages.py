"""The entry points' re-execution with glibc's transparent-huge-page tunable (xrayjax/hugepages)."""

import os
import subprocess
import sys

import pytest

from xrayjax import hugepages

# Prints GLIBC_TUNABLES as the process sees it after reexec(), then the page faults of the
# second of two calls that each allocate a fresh 64 MiB array (above glibc's mmap threshold).
_CHILD = """
import os, resource
from xrayjax import hugepages
hugepages.reexec()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: x * 2 + 1)
x = jnp.ones((16, 1024, 1024))
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f(x).block_until_ready()
print(os.environ.get("GLIBC_TUNABLES", ""))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(hugepages.status())
"""


def _child(**env):
  base = {k: v for k, v in os.environ.items()
          if k not in ("GLIBC_TUNABLES", "XRAYJAX_HUGEPAGES")}
  done = subprocess.run([sys.executable, "-c", _CHILD], env={**base, **env},
                        capture_output=True, text=True, timeout=120, check=True)
  tunables, faults, status = done.stdout.rstrip("\n").split("\n")[-3:]
  return tunables, int(faults), status


@pytest.mark.skipif(hugepages._unavailable() is not None,
                    reason=f"huge pages cannot help here: {hugepages._unavailable()}")
def test_reexec_sets_the_tunable_once_and_the_pages_stop_faulting():
  tunables, faults, status = _child()
  assert tunables == hugepages.TUNABLE
  assert status.startswith("transparent huge pages for malloc (GLIBC_TUNABLES=")
  # Existing tunables are kept; the tunable is not added twice.
  assert _child(GLIBC_TUNABLES="glibc.malloc.check=0")[0] == (
      f"glibc.malloc.check=0:{hugepages.TUNABLE}")
  assert _child(GLIBC_TUNABLES=hugepages.TUNABLE)[0] == hugepages.TUNABLE
  # Turned off: no tunable, and the 64 MiB array faults in 4 KiB pages (16,384 of them).
  off_tunables, off_faults, off_status = _child(XRAYJAX_HUGEPAGES="0")
  assert off_tunables == ""
  assert off_status.endswith("off (XRAYJAX_HUGEPAGES=0)")
  assert off_faults > 10_000
  assert faults < off_faults / 10


def test_where_it_cannot_help_nothing_runs_again(monkeypatch):
  monkeypatch.setenv("XRAYJAX_HUGEPAGES", "0")
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("re-executed"))
  hugepages.reexec()
  assert "XRAYJAX_HUGEPAGES=0" in hugepages.status()
  monkeypatch.setenv("XRAYJAX_HUGEPAGES", "1")
  monkeypatch.setattr(hugepages.platform, "libc_ver", lambda: ("glibc", "2.31"))
  hugepages.reexec()
  assert "glibc 2.31; the tunable needs 2.35 or later" in hugepages.status()
