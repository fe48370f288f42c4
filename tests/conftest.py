"""Test-wide setup: 8 simulated CPU devices, quiet and thread-limited TensorFlow.

Runs before any test module imports jax, so that sharded code is exercised on a 8-device mesh on
any laptop (the same code paths as an 8-chip TPU host).
"""

import os

from train_helpers import FEW_OPTIMIZATIONS_VARIABLE, xla_flags  # noqa: E402  (numpy only)

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ[FEW_OPTIMIZATIONS_VARIABLE] = "1"  # see train_helpers.py
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # TensorFlow must never grab an accelerator
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402  (must come after XLA_FLAGS)

assert jax.device_count() == 8, (
    f"expected 8 simulated CPU devices, found {jax.device_count()}: jax was imported before "
    "tests/conftest.py could set XLA_FLAGS"
)

import pytest  # noqa: E402

from hybrid_jax.data import locations  # noqa: E402

# Tests that read the real LAReQA files carry the `real_data` marker (per test, or `pytestmark`
# per module). Without the data they are skipped with one reason, folded into one summary line;
# with HYBRID_JAX_REQUIRE_DATA=1 (set by .ci/run) a missing folder ends the session at once, so a
# run can never pass by skipping.
REAL_DATASETS = ("xquad-r", "mlqa-r")
_MISSING = [d for d in REAL_DATASETS if not locations.has_dataset(d)]
_SKIP_REASON = (f"LAReQA data not found ({', '.join(_MISSING)} under {locations.data_root()}): run "
                f"`{locations.FETCH_COMMAND}` or set {locations.DATA_ENV_VAR}")


def pytest_configure(config):
  config.addinivalue_line("markers", "real_data: reads the real XQuAD-R / MLQA-R files")
  if _MISSING and os.environ.get("HYBRID_JAX_REQUIRE_DATA") == "1":
    raise pytest.UsageError(
        f"HYBRID_JAX_REQUIRE_DATA=1 but {_SKIP_REASON}. The data directory is "
        f"{locations.lookup_rule()}.")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  # A hook, not an autouse fixture: it runs before session fixtures that would read the data.
  if _MISSING and item.get_closest_marker("real_data"):
    pytest.skip(_SKIP_REASON)


# pytest-xdist (pytest.ini: -n auto --dist=worksteal) hands worker k the k-th of n equal-count
# slices of the collection, in order; a worker that runs dry takes over the tail of another's
# queue. So each slice is built to cost the same: the slow files are dealt out to the slices
# (heaviest first, to the cheapest slice so far), each slice runs its slow files first, and its
# tail, what another worker may take over, is its cheapest tests (a module fixture split by a
# takeover is built twice). Seconds per file: measured with 2 workers on 2 cores (2026-12-07);
# files not listed count DEFAULT_TEST_SECONDS per test.
FILE_SECONDS = {
    "test_trainer.py": 229, "test_fault_injection.py": 86, "test_export.py": 55,
    "test_gradcache_packing.py": 54, "test_gradcache.py": 30, "test_sharding.py": 41,
    "test_memory_plan.py": 38, "test_dropout_sharding.py": 38, "test_checkpointing.py": 37,
    "test_sweep.py": 36, "test_benchmarks_smoke.py": 33, "models/test_encoder_packing.py": 29,
    "models/test_e5_convert.py": 27, "test_losses.py": 25, "eval/test_eval_runner.py": 24,
    "test_mine_cli.py": 24, "models/test_encoder.py": 23, "data/test_mining.py": 22,
    "data/test_tokenization.py": 20, "test_packed_training.py": 20, "search/test_topk.py": 18,
    "eval/test_eval_significance.py": 18, "eval/test_eval_collection.py": 15,
    "data/test_lareqa.py": 13, "eval/test_eval_metrics.py": 10,
}
DEFAULT_TEST_SECONDS = 0.25
# Files whose tests start several processes (two hosts, a reference + 11 SIGKILLed trainings):
# they share a slice, so they run one after the other. Run at the same time they oversubscribe
# the cores (gloo and XLA threads spin) and each takes ~40% longer (fault injection 108 -> 150 s,
# two hosts 83 -> 102 s, measured 2026-12-07).
SERIAL_FILES = ("test_trainer.py", "test_fault_injection.py")
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def balanced_order(files: dict[str, list], costs: dict[str, float], workers: int,
                   serial: tuple[str, ...] = ()) -> list:
  """The items of `files` ({file: its items in order}) as `workers` consecutive equal-count
  slices of about equal total cost, each slice's files in decreasing cost; the `serial` files
  all in the first slice, in their order."""
  total = sum(len(v) for v in files.values())
  sizes = [total // workers + (k >= workers - total % workers) for k in range(workers)]
  together = [f for f in serial if f in files]
  units = ([tuple(together)] if together else []) + [(f,) for f in files if f not in together]
  slices = [[] for _ in range(workers)]
  spent = [0.0] * workers
  # Heaviest unit first, to the cheapest slice so far (stable: ties keep collection order).
  for unit in sorted(units, key=lambda u: -sum(costs[f] for f in u)):
    k = min(range(workers), key=lambda i: spent[i])
    slices[k].extend(unit)
    spent[k] += sum(costs[f] for f in unit)
  ordered = [[item for name in names for item in files[name]] for names in slices]
  # Equal counts: a slice over its size hands its last (cheapest) items to the next slices.
  for k in range(workers - 1):
    surplus = len(ordered[k]) - sizes[k]
    if surplus > 0:
      ordered[k + 1] += ordered[k][-surplus:]
      del ordered[k][-surplus:]
    elif surplus < 0:
      ordered[k] += ordered[k + 1][-(-surplus):]
      del ordered[k + 1][-(-surplus):]
  return [item for part in ordered for item in part]


def pytest_collection_modifyitems(config, items):
  workers = getattr(config, "workerinput", {}).get("workercount", 1)
  if workers < 2:
    return
  files: dict[str, list] = {}
  for item in items:
    files.setdefault(os.path.relpath(str(item.path), _TESTS_DIR).replace(os.sep, "/"),
                     []).append(item)
  costs = {f: FILE_SECONDS.get(f, DEFAULT_TEST_SECONDS * len(v)) for f, v in files.items()}
  items[:] = balanced_order(files, costs, workers, SERIAL_FILES)
