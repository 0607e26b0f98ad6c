"""What serving checks a published index against: the model files its item vectors came from."""
from __future__ import annotations

import hashlib
from pathlib import Path

MODEL_FILES = ("model.pt", "encoder.json")


def model_digest(model_dir: Path) -> str:
    """Hash of the model files: serving checks that its user tower is the one the index was built with."""
    digest = hashlib.sha256()
    for name in MODEL_FILES:
        digest.update(name.encode())
        digest.update((model_dir / name).read_bytes())
    return digest.hexdigest()[:16]
