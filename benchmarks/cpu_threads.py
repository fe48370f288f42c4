"""--threads for the CPU benchmarks, applied before jax is imported (XLA:CPU sizes its thread pool
at start-up), so that both sides of a comparison get the same number of threads."""

from __future__ import annotations

import os
import sys


def pin_from_argv(default: int) -> int:
  """The --threads=N (or --threads N) of the command line, else `default`; with 1, XLA is told
  to run single-threaded too (no Eigen pool). Call before `import jax`."""
  threads = default
  for i, arg in enumerate(sys.argv):
    if arg.startswith("--threads="):
      threads = int(arg.split("=", 1)[1])
    elif arg == "--threads" and i + 1 < len(sys.argv):
      threads = int(sys.argv[i + 1])
  if threads == 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false"
                               " intra_op_parallelism_threads=1").strip()
  return threads
