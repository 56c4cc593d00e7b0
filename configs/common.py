"""Helpers shared by experiment configs: the `key=value,flag` argument string."""

from __future__ import annotations


def parse_arg(arg: str | None, defaults: dict[str, str], choices: dict[str, tuple],
              flags: tuple[str, ...]) -> dict:
  """Parses "model=vgg16,runlocal" into {"model": "vgg16", "runlocal": True, ...}.

  Unknown keys and values outside `choices` raise ValueError listing what is valid.
  """
  out: dict = dict(defaults)
  out.update({f: False for f in flags})
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key in flags and not value:
      out[key] = True
    elif key in defaults and value:
      if key in choices and value not in choices[key]:
        raise ValueError(f"config arg {key}={value!r} is not valid; choose one of "
                         f"{list(choices[key])}")
      out[key] = value
    else:
      raise ValueError(f"unknown config arg {item!r}; valid: "
                       f"{[f'{k}=' + '|'.join(choices.get(k, ('...',))) for k in defaults]} "
                       f"and flags {list(flags)}")
  return out
