"""labse trained with mono batches (see ../shared/PAPER.md, "Batch sampling").

    python -m hybrid_jax.train --config=configs/labse_mono.py --workdir=DIR
    python -m hybrid_jax.train --config=configs/labse_mono.py:runlocal --workdir=/tmp/demo
"""

from hybrid_jax import config_lib


def get_config(arg=None):
  return config_lib.build_config(backbone="labse", batch_type="mono", arg=arg)
