"""Transparent huge pages for the memory XLA's CPU runtime allocates (Linux with glibc).

XLA's CPU runtime allocates each execution's temporary buffers with `malloc` and frees them
afterwards; glibc maps allocations that large afresh every time (`mmap`/`munmap`), so every
training step faults its buffers' 4 KiB pages in again, a large share of the step's CPU time
(TensorFlow keeps its memory in its own allocator and pays none of this). With glibc's
`glibc.malloc.hugetlb=1` tunable, malloc asks for transparent huge pages (2 MiB) for those
mappings: far fewer faults and a faster step (docs/performance.md has the figures).

Tunables are read when a process starts, so the command-line entry points (`xrayjax.main`,
`xrayjax.predict`, `xrayjax.bench`) call `reexec()` in their `__main__` blocks, before parsing
flags (never in a function that tests or other code call in their own process): it executes
the same command again with the tunable added to `GLIBC_TUNABLES`, once, where it can help
(glibc 2.35 or later, and transparent huge pages not disabled by the system). `XRAYJAX_HUGEPAGES=0` turns it off; code
that imports xrayjax in a process of its own (a notebook) can set
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` before starting Python.
"""

from __future__ import annotations

import os
import pathlib
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _unavailable() -> str | None:
  """Why the tunable cannot help here, or None."""
  if os.environ.get("XRAYJAX_HUGEPAGES", "1") == "0":
    return "off (XRAYJAX_HUGEPAGES=0)"
  libc, version = platform.libc_ver()
  if sys.platform != "linux" or libc != "glibc":
    return f"not used (needs Linux with glibc; this is {sys.platform}, {libc or 'no glibc'})"
  if tuple(int(p) for p in version.split(".")[:2]) < (2, 35):
    return f"not used (glibc {version}; the tunable needs 2.35 or later)"
  try:
    if "[never]" in _THP.read_text():
      return f"not used (transparent huge pages are disabled: {_THP})"
  except OSError:
    return f"not used ({_THP} is not readable)"
  return None


def status() -> str:
  """One line saying whether malloc's large mappings use transparent huge pages, and why."""
  if TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":"):
    return f"transparent huge pages for malloc (GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']})"
  return f"transparent huge pages for malloc: {_unavailable() or 'not set in this process'}"


def reexec() -> None:
  """Executes this process's command again with the tunable set, if it is not and can help.

  Only for a command's `__main__` block: the process is replaced, and whatever ran before in
  it runs again."""
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if TUNABLE in tunables.split(":") or _unavailable():
    return
  env = dict(os.environ, GLIBC_TUNABLES=f"{tunables}:{TUNABLE}" if tunables else TUNABLE)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
