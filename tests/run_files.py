"""What tests compare a run directory by."""

import os


def snapshot(directory):
  """Every file under `directory` with its bytes and mtime: equal snapshots mean nothing was
  written, replaced or touched."""
  out = {}
  for d, _, names in os.walk(directory):
    for n in names:
      p = os.path.join(d, n)
      with open(p, "rb") as f:
        out[os.path.relpath(p, directory)] = (f.read(), os.stat(p).st_mtime_ns)
  return out
