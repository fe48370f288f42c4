"""xlmr-base trained with hybrid batches (see ../shared/PAPER.md, "Batch sampling").

    python -m hybrid_jax.train --config=configs/xlmr_hybrid.py --workdir=DIR
    python -m hybrid_jax.train --config=configs/xlmr_hybrid.py:runlocal --workdir=/tmp/demo
"""

from hybrid_jax import config_lib


def get_config(arg=None):
  return config_lib.build_config(backbone="xlmr-base", batch_type="hybrid", arg=arg)
