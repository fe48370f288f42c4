"""The error classes shared by every module, and how the command-line tools report them.

Every error a user can cause and fix (bad config, path, data, flags) subclasses `UserError`.
Command-line entry points run through `exit_on_user_error`, which catches `UserError` only and
prints its message on one line; any other exception (a ValueError from inside JAX, NumPy or Orbax
included) keeps its traceback, because it is a bug to report, not a setting to change.
`UserError` subclasses ValueError so that `except ValueError` in user code keeps working.

This module imports nothing of hybrid_jax, so every module can import it.
"""

from __future__ import annotations

import sys
from typing import Any, Callable


class UserError(ValueError):
  """A problem the user can fix; the message says what was expected, what was found, and how."""


class TrainingDivergedError(FloatingPointError):
  """The loss became NaN or infinite; the message names the steps and how to inspect them."""


# Exit statuses of the command-line tools.
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3


def exit_on_user_error(fn: Callable[[], Any]) -> Any:
  """Runs fn; a problem the user can fix ends the process with one `error:` line, no traceback:
  status 2 for config, path and data errors (the message says what and how), 3 for a NaN loss."""
  try:
    return fn()
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
  except TrainingDivergedError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_DIVERGED)
