"""The entry points' re-execution with glibc's huge pages and the block cache (xrayjax/hostmem),
and the block cache itself (xrayjax/hostmem.c), in processes of their own."""

import json
import os
import subprocess
import sys

import pytest

from xrayjax import hostmem

# After reexec(): the environment it set, the page faults of the second of two calls that each
# return a fresh 64 MiB array (above glibc's largest mmap threshold), the cache's counts and the
# status line.
_CHILD = """
import json, os, resource
from xrayjax import hostmem
hostmem.reexec()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: x * 2 + 1)
x = jnp.ones((16, 1024, 1024))
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f(x).block_until_ready()
print(json.dumps(dict(
    tunables=os.environ.get("GLIBC_TUNABLES", ""), preload=os.environ.get("LD_PRELOAD", ""),
    faults=resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
    stats=hostmem.stats(), status=hostmem.status())))
"""


def _child(code=_CHILD, **env):
  base = {k: v for k, v in os.environ.items()
          if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "XRAYJAX_HOSTMEM")}
  done = subprocess.run([sys.executable, "-c", code], env={**base, **env},
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.splitlines()[-1])


linux_glibc = pytest.mark.skipif(hostmem._not_linux_glibc() is not None,
                                 reason=f"needs Linux with glibc: {hostmem._not_linux_glibc()}")


@linux_glibc
@pytest.mark.skipif(hostmem._huge_pages_unavailable() is not None,
                    reason=f"{hostmem._huge_pages_unavailable()}")
def test_reexec_sets_both_once_and_the_second_call_reuses_the_first_ones_block():
  on = _child()
  library = str(hostmem._library())
  assert on["tunables"] == hostmem.TUNABLE and on["preload"] == library
  assert on["status"] == (f"transparent huge pages for malloc ({hostmem.TUNABLE}); large blocks "
                          f"kept between executions (LD_PRELOAD={library})")
  assert on["stats"]["kept"] >= 1 and on["stats"]["bytes"] >= 64 << 20
  # Existing tunables are kept and the tunable is not added twice.
  assert _child(GLIBC_TUNABLES="glibc.malloc.check=0")["tunables"] == (
      f"glibc.malloc.check=0:{hostmem.TUNABLE}")
  assert _child(GLIBC_TUNABLES=hostmem.TUNABLE)["tunables"] == hostmem.TUNABLE
  # Another allocator preloaded by the user stays, and the status says why no blocks are kept.
  other = _child(LD_PRELOAD="libm.so.6")
  assert other["preload"] == "libm.so.6" and other["stats"] is None
  assert "large blocks not kept (LD_PRELOAD is already set: libm.so.6)" in other["status"]
  # Huge pages alone: the second call maps its 64 MiB afresh, 32 faults of 2 MiB or more.
  huge = _child(GLIBC_TUNABLES=hostmem.TUNABLE, LD_PRELOAD=" ")
  assert huge["stats"] is None and huge["faults"] >= 32
  assert on["faults"] < huge["faults"] / 4
  # Turned off: nothing set, and the 64 MiB array faults in 4 KiB pages (16,384 of them).
  off = _child(XRAYJAX_HOSTMEM="0")
  assert off["tunables"] == off["preload"] == "" and off["stats"] is None
  assert off["status"] == "glibc's malloc as it is: off (XRAYJAX_HOSTMEM=0)"
  assert off["faults"] > 10_000


# malloc and friends called through ctypes in a process with the block cache preloaded.
_CACHE = """
import ctypes, json, threading
from xrayjax import hostmem
c = ctypes.CDLL(None)
vp, sz = ctypes.c_void_p, ctypes.c_size_t
for name, res, args in [("malloc", vp, [sz]), ("calloc", vp, [sz, sz]), ("free", None, [vp]),
                        ("realloc", vp, [vp, sz]), ("aligned_alloc", vp, [sz, sz]),
                        ("malloc_usable_size", sz, [vp])]:
  getattr(c, name).restype, getattr(c, name).argtypes = res, args
MiB = 1 << 20
out = {}
p = c.malloc(40 * MiB)
out["aligned"] = p % (2 * MiB) == 0
out["usable"] = c.malloc_usable_size(p)
ctypes.memset(p, 7, 40 * MiB)
c.free(p)
q = c.calloc(1, 39 * MiB)  # the same 40 MiB block, zeroed
out["same"] = q == p
out["zeroed"] = ctypes.string_at(q + 20 * MiB, 4096) == bytes(4096)
out["after_reuse"] = hostmem.stats()
ctypes.memset(q, 5, 39 * MiB)
r = c.realloc(q, 100 * MiB)  # grows: a new block, the contents copied
out["grown_copied"] = ctypes.string_at(r + 39 * MiB - 16, 16) == bytes([5]) * 16
small = c.realloc(r, 1000)  # shrinks below 32 MiB: glibc's, the contents copied
out["shrunk_copied"] = ctypes.string_at(small, 1000) == bytes([5]) * 1000
c.free(small)
out["after_realloc"] = hostmem.stats()
for attempt in range(5):  # a busy machine may run the timer late
  waited = hostmem.stats()["waited"]
  a = c.aligned_alloc(4096, 50 * MiB)
  timer = threading.Timer(0.01, c.free, [a])  # freed while the next request waits for it
  timer.start()
  b = c.malloc(50 * MiB)
  timer.join()
  if b == a and hostmem.stats()["waited"] == waited + 1:
    break
  c.free(b)
out["waited_for_it"] = b == a
before = hostmem.stats()
d = c.malloc(50 * MiB)  # its size stays in use (b): a new block after the wait
out["new_after_wait"] = d != b
out["two_live"] = {k: v - before[k] if k in ("kept", "mapped", "waited") else v
                   for k, v in hostmem.stats().items()}
c.free(b); c.free(d)
e = c.malloc(64 * MiB)  # another size: the two idle blocks are unmapped first
out["after_miss"] = hostmem.stats()["bytes"], hostmem.stats()["idle_bytes"]
c.free(e)
print(json.dumps(out))
"""


@linux_glibc
def test_block_cache_reuses_unmaps_on_a_miss_and_waits_for_a_block_in_use():
  out = _child(_CACHE, LD_PRELOAD=str(hostmem._library()))
  MiB = 1 << 20
  assert out["aligned"] and out["usable"] == 40 * MiB
  assert out["same"] and out["zeroed"]
  assert out["after_reuse"] == dict(kept=1, mapped=1, waited=0, bytes=40 * MiB, idle_bytes=0)
  assert out["grown_copied"] and out["shrunk_copied"]
  # Both idle: the 40 MiB block was still in use when the 100 MiB request mapped its own.
  assert out["after_realloc"] == dict(kept=1, mapped=2, waited=0, bytes=140 * MiB,
                                      idle_bytes=140 * MiB)
  assert out["waited_for_it"] and out["new_after_wait"]
  # The 50 MiB request mapped (the first unmapped both idle blocks), then this one waited in vain.
  assert out["two_live"] == dict(kept=0, mapped=1, waited=1, bytes=100 * MiB, idle_bytes=0)
  assert out["after_miss"] == [64 * MiB, 0]


@linux_glibc
def test_without_a_c_compiler_only_the_block_cache_is_missing(monkeypatch, tmp_path):
  monkeypatch.delenv("XRAYJAX_HOSTMEM", raising=False)
  monkeypatch.setenv("XRAYJAX_CACHE", str(tmp_path))  # nothing built there yet
  monkeypatch.setenv("CC", "no-such-compiler")
  monkeypatch.delenv("LD_PRELOAD", raising=False)
  env, why = hostmem._wanted()
  assert "LD_PRELOAD" not in env
  assert why == ["large blocks not kept (hostmem.c cannot be built: no compiler "
                 "('no-such-compiler' is not on PATH; set $CC))"]
  assert why[0] in hostmem.status()


@linux_glibc
def test_a_cache_path_ld_preload_cannot_name_is_refused(monkeypatch, tmp_path):
  monkeypatch.delenv("XRAYJAX_HOSTMEM", raising=False)
  monkeypatch.setenv("XRAYJAX_CACHE", str(tmp_path / "my cache"))
  monkeypatch.delenv("LD_PRELOAD", raising=False)
  env, why = hostmem._wanted()
  assert "LD_PRELOAD" not in env
  assert len(why) == 1 and why[0].startswith("large blocks not kept (LD_PRELOAD cannot name ")
  assert why[0].endswith("it has a space or colon; set XRAYJAX_CACHE to a path without them)")


def test_where_it_cannot_help_nothing_runs_again(monkeypatch):
  monkeypatch.setenv("XRAYJAX_HOSTMEM", "0")
  monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("re-executed"))
  hostmem.reexec()
  assert hostmem.status() == "glibc's malloc as it is: off (XRAYJAX_HOSTMEM=0)"
  monkeypatch.setenv("XRAYJAX_HOSTMEM", "1")
  monkeypatch.setattr(hostmem.platform, "libc_ver", lambda: ("", ""))
  hostmem.reexec()
  assert "not used (needs Linux with glibc" in hostmem.status()
  monkeypatch.setattr(hostmem.platform, "libc_ver", lambda: ("glibc", "2.31"))
  assert hostmem._huge_pages_unavailable() == (
      "huge pages not used (glibc 2.31; the tunable needs 2.35 or later)")
