"""Compiles this package's C and C++ sources into shared libraries, once per key.

Libraries go to `$XRAYJAX_CACHE/kernels` (default `~/.cache/xrayjax/kernels`), named by a hash
of the sources, the compiler and its flags and whatever else the caller says they depend on, so
a changed source, flag or library version builds anew and a cache shared between machines never
mixes them. Imports nothing heavy: `hostmem` builds its library before jax is imported.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence


def library(stem: str, files: Mapping[str, bytes], compile: Sequence[str],
            flags: Sequence[str], depends: Sequence[str] = (), compiler_var: str = "CXX",
            default_compiler: str = "c++") -> pathlib.Path:
  """The path of `stem-<key>.so`, compiled from `files` (name -> text; the names in `compile`
  are passed to the compiler, the others are headers) if it is not cached yet. The compiler is
  `$compiler_var`, else `default_compiler`.

  Raises RuntimeError, saying why, when the compiler is missing or fails."""
  compiler = os.environ.get(compiler_var, default_compiler)
  key = hashlib.sha256(b"\0".join(
      [*files.values(), compiler.encode(), " ".join(flags).encode(),
       *(d.encode() for d in depends)])).hexdigest()[:16]
  cache = pathlib.Path(os.environ.get("XRAYJAX_CACHE", pathlib.Path.home() / ".cache" / "xrayjax"))
  target = cache / "kernels" / f"{stem}-{key}.so"
  if target.exists():
    return target
  if shutil.which(compiler) is None:
    raise RuntimeError(f"no compiler ({compiler!r} is not on PATH; set ${compiler_var})")
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    for name, code in files.items():
      (pathlib.Path(tmp) / name).write_bytes(code)
    out = pathlib.Path(tmp) / target.name
    done = subprocess.run([compiler, *(str(pathlib.Path(tmp) / n) for n in compile), "-o",
                           str(out), *flags], capture_output=True, text=True)
    if done.returncode:
      errors = [line for line in done.stderr.splitlines() if "error" in line]
      raise RuntimeError(f"{compiler} failed on {', '.join(compile)}:\n"
                         + "\n".join(errors[:10] or [done.stderr[-2000:]]))
    os.replace(out, target)  # atomic: concurrent first uses (test workers) agree
  return target
