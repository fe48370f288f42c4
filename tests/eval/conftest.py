"""Session fixtures of the evaluator tests: the real LAReQA collections scored on the full grid."""

from __future__ import annotations

import pytest

from eval_helpers import Scored  # tests/eval/eval_helpers.py
from train_helpers import fully_optimized_xla


@pytest.fixture(scope="session")
def xquad_scored() -> Scored:
  with fully_optimized_xla():  # the grid's rank counting runs 4x slower at LLVM level 0
    return Scored("xquad-r")


@pytest.fixture(scope="session")
def mlqa_scored() -> Scored:
  with fully_optimized_xla():
    return Scored("mlqa-r")
