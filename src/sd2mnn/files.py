"""Reading the small JSON files of a model (model_index.json, config.json) with one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

from sd2mnn.errors import InputError


def read_json_object(path: Path, fix: str = "re-download the model") -> dict:
    """The JSON object in ``path``, or an InputError naming the file and ``fix``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError(f"{path}: unreadable ({err}); {fix}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a JSON object; {fix}")
    return data
