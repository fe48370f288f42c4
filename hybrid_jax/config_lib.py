"""Shared pieces of the experiment configs in configs/.

A config file is `get_config(arg=None) -> ml_collections.ConfigDict`. The argument is a typed
string, big_vision style: `configs/xlmr_hybrid.py:runlocal,alpha=0.3` passes "runlocal,alpha=0.3"
which `parse_arg` turns into {"runlocal": True, "alpha": 0.3} using the defaults' types.
"""

from __future__ import annotations

import ml_collections


class ConfigArgError(ValueError):
  """A config argument string names an unknown key or a value of the wrong type."""


def _to_bool(key: str, text: str) -> bool:
  lowered = text.strip().lower()
  if lowered in ("1", "true", "yes", "on", ""):
    return True
  if lowered in ("0", "false", "no", "off"):
    return False
  raise ConfigArgError(f"config argument {key}={text!r}: expected true/false")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses "runlocal,alpha=0.3,langs=en+de" against typed defaults.

  A bare name sets a boolean to True. Values are cast to the type of their default; tuple
  defaults take "+"-separated items (commas separate arguments).
  """
  values = dict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, has_value, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigArgError(
          f"unknown config argument {key!r} in {arg!r}; known arguments: {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      values[key] = _to_bool(key, text) if has_value else True
    elif not has_value:
      raise ConfigArgError(f"config argument {key!r} needs a value, e.g. {key}={default!r}")
    elif isinstance(default, tuple):
      values[key] = tuple(x for x in text.split("+") if x)
    else:
      try:
        values[key] = type(default)(text)
      except ValueError as e:
        raise ConfigArgError(
            f"config argument {key}={text!r}: expected a {type(default).__name__}") from e
  return ml_collections.ConfigDict(values)
