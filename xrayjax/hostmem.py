"""How XLA's CPU runtime gets its memory (Linux with glibc): huge pages, and blocks kept.

XLA's CPU runtime mallocs each execution's temporary buffers as one block (a ResNet50 training
step at 128 px: 620 MB) and frees it when the execution ends. glibc maps a block that large
afresh every time, so every step faults its memory in again (TensorFlow keeps its own), and on
a VM that hands freed memory back to its host some steps stall while it comes back. Two
remedies, both read when a process starts:

- glibc's `glibc.malloc.hugetlb=1` tunable (glibc 2.35 or later): malloc's mappings use 2 MiB
  transparent huge pages, far fewer faults than 4 KiB pages;
- `hostmem.c`, compiled on first use with the C compiler (`$CC`, else `cc`) and preloaded
  (`LD_PRELOAD`): a freed block of 32 MiB or more stays mapped, and the next request of its
  size gets it back, so steps stop faulting their buffers in. Peak memory does not grow
  (hostmem.c says how).

The command-line entry points (`xrayjax.main`, `xrayjax.predict`, `xrayjax.bench`) call
`reexec()` in their `__main__` blocks, before parsing flags (never in a function that tests or
other code call in their own process): it executes the same command again, once, with
`GLIBC_TUNABLES` and `LD_PRELOAD` set where each can help. `XRAYJAX_HOSTMEM=0` turns both off;
a command started with `LD_PRELOAD` already set (another allocator) keeps it and gets no block
cache. docs/performance.md has the figures.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import platform
import sys

from xrayjax import build

TUNABLE = "glibc.malloc.hugetlb=1"
_THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
_SOURCE = pathlib.Path(__file__).with_name("hostmem.c")


def _off() -> str | None:
  """Why neither remedy is used here, or None."""
  if os.environ.get("XRAYJAX_HOSTMEM", "1") == "0":
    return "off (XRAYJAX_HOSTMEM=0)"
  return _not_linux_glibc()


def _not_linux_glibc() -> str | None:
  libc, _ = platform.libc_ver()
  if sys.platform != "linux" or libc != "glibc":
    return f"not used (needs Linux with glibc; this is {sys.platform}, {libc or 'no glibc'})"
  return None


def _huge_pages_unavailable() -> str | None:
  """Why the tunable cannot help here, or None."""
  version = platform.libc_ver()[1]
  if tuple(int(p) for p in version.split(".")[:2]) < (2, 35):
    return f"huge pages not used (glibc {version}; the tunable needs 2.35 or later)"
  try:
    if "[never]" in _THP.read_text():
      return f"huge pages not used (transparent huge pages are disabled: {_THP})"
  except OSError:
    return f"huge pages not used ({_THP} is not readable)"
  return None


def _library() -> pathlib.Path:
  """hostmem.c's shared library, compiled once per source and compiler."""
  return build.library("xrayjax_hostmem", {_SOURCE.name: _SOURCE.read_bytes()}, [_SOURCE.name],
                       ["-O2", "-shared", "-fPIC", "-pthread", "-ldl"], compiler_var="CC",
                       default_compiler="cc")


def _wanted() -> tuple[dict[str, str], list[str]]:
  """The environment variables this process should run with, and why any remedy is missing."""
  if off := _off():
    return {}, [off]
  env, why = {}, []
  if huge := _huge_pages_unavailable():
    why.append(huge)
  else:
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if TUNABLE not in tunables.split(":"):
      env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
  preload = os.environ.get("LD_PRELOAD", "")
  try:
    library = str(_library())
  except (OSError, RuntimeError) as e:
    why.append(f"large blocks not kept (hostmem.c cannot be built: {e})")
  else:
    if preload and preload != library:
      why.append(f"large blocks not kept (LD_PRELOAD is already set: {preload})")
    elif any(c in library for c in " :"):  # LD_PRELOAD's separators
      why.append(f"large blocks not kept (LD_PRELOAD cannot name {library}: it has a space or "
                 "colon; set XRAYJAX_CACHE to a path without them)")
    elif not preload:
      env["LD_PRELOAD"] = library
  return env, why


def stats() -> dict[str, int] | None:
  """The block cache's counts in this process, or None where it is not loaded."""
  try:
    fn = ctypes.CDLL(None).xrayjax_hostmem_stats
  except AttributeError:
    return None
  out = (ctypes.c_ulonglong * 5)()
  fn(out)
  return dict(zip(("kept", "mapped", "waited", "bytes", "idle_bytes"), out))


def status() -> str:
  """One line saying what this process's memory runs with, and why not more."""
  if off := _off():
    return f"glibc's malloc as it is: {off}"
  parts = []
  if TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":"):
    parts.append(f"transparent huge pages for malloc ({TUNABLE})")
  if stats() is not None:
    parts.append(f"large blocks kept between executions (LD_PRELOAD={os.environ['LD_PRELOAD']})")
  if len(parts) < 2:
    env, why = _wanted()
    parts += why
    if env:
      parts.append(f"{' and '.join(env)} not set in this process (only the command-line entry "
                   "points run again with them)")
  return "; ".join(parts)


def reexec() -> None:
  """Executes this process's command again with what `_wanted()` adds, if anything.

  Only for a command's `__main__` block: the process is replaced, and whatever ran before in
  it runs again."""
  env = _wanted()[0]
  if not env:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **env})
