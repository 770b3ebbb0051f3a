"""The local cache root: ``$SOFTMASK_CACHE``, else ``~/.cache/softmask`` (torch-free; read when called).

Under it: ``gguf/`` and ``evaluators/`` (dequantised GGUF copies, models.gguf), ``corpora/`` (pipelines.corpus),
``checkpoints/`` (s3:// checkpoints the Serve deployment downloaded, workers.serving_config).
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("SOFTMASK_CACHE") or Path.home() / ".cache" / "softmask").expanduser()
