"""Interoperability tests: our FP8 checkpoints in transformers, llm-compressor's in w8a8_jax.

They run in their own torch venv (scripts/interop.sh) and call the JAX side through
`$W8A8_JAX_PYTHON`. Nothing is downloaded: the hub stays offline.
"""

import os

for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
