"""Where the real data lives: one lookup rule for every module, command, config and test.

The data directory holds one folder per dataset (`xquad-r/`, `mlqa-r/`, each with one
`<lang>.json` per language). It is, in this order:
  1. an explicit path (a flag such as `--data_dir`, or a config field such as `data.path`);
  2. else `$HYBRID_JAX_DATA`;
  3. else `~/.cache/hybrid_jax/data`, where `python -m hybrid_jax.data.fetch` writes by default.
A relative dataset path in a config (`data.path=mlqa-r`) is looked up under that directory when it
does not exist as given (data/sources.py).

This module imports nothing of hybrid_jax but errors, so every reader can use it.
"""

from __future__ import annotations

import os

from hybrid_jax import errors

DATA_ENV_VAR = "HYBRID_JAX_DATA"
FETCH_COMMAND = "python -m hybrid_jax.data.fetch"


class DataNotFoundError(errors.UserError):
  """A dataset folder is missing; the message gives the lookup rule and the fetch command."""


def default_dir() -> str:
  """~/.cache/hybrid_jax/data: where the fetch command writes and readers look last."""
  return os.path.join(os.path.expanduser("~"), ".cache", "hybrid_jax", "data")


def data_root(explicit: str = "") -> str:
  """The data directory: `explicit` if given, else $HYBRID_JAX_DATA, else `default_dir()`."""
  if explicit:
    return explicit
  return os.environ.get(DATA_ENV_VAR) or default_dir()


def dataset_dir(dataset: str, explicit_dir: str = "") -> str:
  """The folder of one dataset: `explicit_dir` as given, else `<data_root()>/<dataset>`."""
  return explicit_dir or os.path.join(data_root(), dataset)


def lookup_rule() -> str:
  """The three places, in order, with what $HYBRID_JAX_DATA is set to now (for error messages)."""
  env = os.environ.get(DATA_ENV_VAR)
  return (f"an explicit path (flag or config field), else ${DATA_ENV_VAR} "
          f"({repr(env) if env else 'unset'}), else {default_dir()}")


def missing_message(problem: str) -> str:
  """`problem` (e.g. "X does not exist"), then the lookup rule and how to get the data."""
  return (f"{problem}. The data directory is {lookup_rule()}. Get the LAReQA "
          f"data with `{FETCH_COMMAND}` (writes to ${DATA_ENV_VAR} or {default_dir()}; "
          f"`--dir=DIR` to choose), or set {DATA_ENV_VAR} to a folder holding xquad-r/ and mlqa-r/.")


def has_dataset(dataset: str) -> bool:
  """Whether `<data_root()>/<dataset>` exists and holds at least one `<lang>.json`."""
  folder = dataset_dir(dataset)
  return os.path.isdir(folder) and any(f.endswith(".json") for f in os.listdir(folder))


def require_dataset_dir(dataset: str, explicit_dir: str = "") -> str:
  """`dataset_dir(...)`, or DataNotFoundError naming the lookup rule and the fetch command."""
  folder = dataset_dir(dataset, explicit_dir)
  if not os.path.isdir(folder):
    raise DataNotFoundError(missing_message(f"Dataset folder {folder!r} does not exist"))
  return folder
