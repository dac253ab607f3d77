"""What a saved model folder holds, read without torch: its file names and its meta."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WEIGHTS_FILE = "model.safetensors"
META_FILE = "mmops_model.json"
TOKENIZER_DIR = "tokenizer"


def read_meta(folder: Path | str) -> dict[str, Any]:
    """The folder's meta (labels, model config, image spec), with keys that models saved by older
    versions lack filled in; FileNotFoundError for a folder that is not a model's."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not an mmops model folder (no {META_FILE})")
    meta = json.loads(path.read_text())
    upgrade(meta["model"])
    return meta


def upgrade(model: dict[str, Any]) -> None:
    """Fill in keys that models saved by older versions lack, with what those versions did."""
    vision, text = model.setdefault("vision", {}), model.setdefault("text", {})
    # Before the vision stem was a choice: the plain patch projection; before the encoder
    # architectures were a choice: a ViT and a BERT.
    vision.setdefault("stem", "patch")
    vision.setdefault("arch", "vit")
    text.setdefault("arch", "bert")
