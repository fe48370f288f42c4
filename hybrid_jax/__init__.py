"""hybrid_jax: multilingual dense retrieval with hybrid batch training, in JAX/Flax."""
