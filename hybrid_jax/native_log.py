"""Keeps TensorFlow's C++ start-up banners out of the console, and its real warnings in it.

TensorFlow 2.21 logs through absl's C++ logging before anything initialises it, so its INFO lines
go straight to file descriptor 2 whatever TF_CPP_MIN_LOG_LEVEL says (measured: levels 1-3 all
print "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR" and
"I0000 ... port.cc] oneDNN custom operations are on ..." twice per import). `quiet_native_banners`
captures fd 2 while TensorFlow loads and re-emits every line except those INFO lines and absl's
banner, so warnings and errors (W/E/F lines, Python tracebacks) still reach the user.

This module imports nothing of hybrid_jax, so every module may use it.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

# absl's one-line notice, and absl C++ INFO records ("I<MMDD> <time> <thread> <file>:<line>] ...").
DROPPED_LINES = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written "
               r"to STDERR$"),
    re.compile(r"^I\d{4} [\d:.]+\s+\d+ [\w.]+:\d+\] "),
)


def kept_lines(text: str) -> list[str]:
  """The lines of captured native stderr that are not start-up INFO noise."""
  return [line for line in text.splitlines()
          if line.strip() and not any(p.match(line) for p in DROPPED_LINES)]


@contextlib.contextmanager
def quiet_native_banners():
  """Within the block, native stderr is captured; on exit the kept lines are written to stderr."""
  sys.stderr.flush()
  try:
    saved = os.dup(2)
  except OSError:  # no file descriptor 2 (some embedded interpreters): nothing to filter
    yield
    return
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      for line in kept_lines(capture.read().decode("utf-8", errors="replace")):
        print(line, file=sys.stderr)
      sys.stderr.flush()


def quiet_library_info_logs() -> None:
  """For a command's main(): absl INFO records off unless --verbosity was given.

  Orbax logs every checkpoint file operation at INFO and JAX its backend probing; the commands
  print their own progress, so a user sees those lines only when asking with --verbosity=0.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top  (absl: every command's parser)
  from absl import logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
