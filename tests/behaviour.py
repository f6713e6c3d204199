"""What the demo pipeline's conversion, generation and verification produce, as plain data:
the bundle's files' sha256, the manifest (minus times, paths and mtimes), the generated PNG's
pixels' digest and verify's JSON. tests/data/demo_behaviour.json holds it as recorded before
the model family facts moved into sd2mnn.families; test_behaviour.py recomputes it."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import re

import numpy as np

from sd2mnn.cli import main
from sd2mnn.core.demo import demo_pipeline_dir

FIXTURE = Path(__file__).parent / "data" / "demo_behaviour.json"
# Measured, not part of what the code decides.
_VOLATILE = {"wall_s", "peak_rss_bytes", "mtime_ns", "onnx_dir", "seconds", "wall_seconds",
             "threads", "sd2mnn_version"}


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in _VOLATILE and not k.endswith("_s")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        return Path(value).name
    return value


# MNNConvert writes a fresh random UUID into every .mnn it makes.
_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _digest(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".mnn":
        data = _UUID.sub(b"0" * 36, data)
    return hashlib.sha256(data).hexdigest()


def _files(bundle: Path) -> dict[str, str]:
    return {p.relative_to(bundle).as_posix(): _digest(p)
            for p in sorted(bundle.rglob("*")) if p.is_file() and p.suffix in (".mnn", ".weight", ".mtok")}


def fingerprint(work: Path) -> dict:
    from PIL import Image

    onnx = demo_pipeline_dir()
    bundle = work / "bundle"
    assert main(["convert", str(onnx), str(bundle), "--quiet"]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    for record in manifest["components"].values():
        for output in record["outputs"]:
            output["sha256"] = _digest(bundle / output["path"])
    png = work / "out.png"
    assert main(["generate", str(bundle), "a red apple", "-o", str(png), "--steps", "2", "--seed", "0",
                 "--threads", "2", "--quiet"]) == 0
    pixels = np.asarray(Image.open(png).convert("RGB"))
    report_dir = work / "report"
    assert main(["verify", str(onnx), str(bundle), "--report", str(report_dir), "--quiet"]) in (0, 1)
    verification = json.loads((report_dir / "verification.json").read_text())
    return {
        "files": _files(bundle),
        "manifest": _strip(manifest),
        "pixels": {"shape": list(pixels.shape), "sha256": hashlib.sha256(pixels.tobytes()).hexdigest()},
        "verification": _strip(verification),
    }


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        data = fingerprint(Path(tmp))
    FIXTURE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE}", file=sys.stderr)
