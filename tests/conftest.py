"""Shared fixtures: the tiny demo ONNX pipeline (real SD architecture, seeded random weights)
and bundles converted from it by the real converter, built once per test session."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sd2mnn.core.demo import demo_pipeline_dir


def tree_state(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones included) -> sha256; folders as "dir"."""
    state = {}
    if not root.exists():
        return state
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir():
            state[rel] = "dir"
        else:
            state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


@pytest.fixture(scope="session")
def demo_onnx() -> Path:
    return demo_pipeline_dir()


@pytest.fixture
def onnx_copy(demo_onnx, tmp_path) -> Path:
    """A private, writable copy of the demo ONNX pipeline."""
    target = tmp_path / "onnx"
    shutil.copytree(demo_onnx, target)
    return target


@pytest.fixture(scope="session")
def fp32_bundle(demo_onnx, tmp_path_factory) -> Path:
    """The demo pipeline converted at fp32 (all four components). Do not modify it."""
    import sd2mnn

    out = tmp_path_factory.mktemp("fp32") / "bundle"
    sd2mnn.convert(demo_onnx, out, components=["text_encoder", "unet", "vae_decoder", "vae_encoder"])
    return out


@pytest.fixture(scope="session")
def w8_bundle(demo_onnx, tmp_path_factory) -> Path:
    """The demo pipeline converted with 8-bit weights. Do not modify it."""
    import sd2mnn

    out = tmp_path_factory.mktemp("w8") / "bundle"
    sd2mnn.convert(demo_onnx, out, weight_quant_bits=8)
    return out


@pytest.fixture
def bundle_copy(fp32_bundle, tmp_path) -> Path:
    """A private, writable copy of the fp32 bundle."""
    target = tmp_path / "bundle"
    shutil.copytree(fp32_bundle, target)
    return target


@pytest.fixture(autouse=True)
def _package_converter(monkeypatch):
    # Tests use the MNN package's converter, whatever the developer has in $MNNCONVERT.
    monkeypatch.delenv("MNNCONVERT", raising=False)


# -- a tiny SD3 pipeline (two CLIPs, T5, an MMDiT, a 16-channel VAE), exported and converted ----


@pytest.fixture(scope="session")
def tiny_sd3_onnx(tmp_path_factory) -> Path:
    """tests/builders.make_tiny_sd3_pipeline exported by sd2mnn export. Do not modify it."""
    pytest.importorskip("diffusers")
    from builders import make_tiny_sd3_pipeline

    from sd2mnn.exporting.export import export

    root = tmp_path_factory.mktemp("sd3")
    export(make_tiny_sd3_pipeline(root / "diffusers"), root / "onnx")
    return root / "onnx"


@pytest.fixture(scope="session")
def tiny_sd3_bundle(tiny_sd3_onnx, tmp_path_factory) -> Path:
    """tiny_sd3_onnx converted at fp32, all five components. Do not modify it."""
    import sd2mnn

    out = tmp_path_factory.mktemp("sd3-bundle") / "bundle"
    sd2mnn.convert(tiny_sd3_onnx, out)
    return out


# A full disk while writing: one line, no partial file, the earlier file intact.
FULL_DISK = r"""
dir=$1; keep=$2; listing=$3; shift 3
mount -t tmpfs -o size=64k tmpfs "$dir" || exit 77
cp "$keep" "$dir/out.png"
cat /dev/zero > "$dir/fill" 2>/dev/null
"$@"; rc=$?
ls -A "$dir" > "$listing"
cmp -s "$keep" "$dir/out.png" || echo "out.png changed" >> "$listing"
exit $rc
"""


def on_full_disk(tmp_path: Path, keep: Path, make_args) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run sd2mnn with a full tmpfs (in a private mount namespace) at ``disk``, which holds a copy
    of ``keep`` as out.png; returns the run and what the disk held afterwards."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a small tmpfs")
    disk, listing = tmp_path / "disk", tmp_path / "listing.txt"
    disk.mkdir()
    command = [sys.executable, "-m", "sd2mnn.cli", *map(str, make_args(disk))]
    done = subprocess.run(["unshare", "-rm", "sh", "-c", FULL_DISK, "sh", disk, keep, listing, *command],
                          capture_output=True, text=True, timeout=300)
    if done.returncode == 77 or not listing.exists():
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()[-200:]}")
    return done, listing.read_text().split("\n")[:-1]


def assert_export_refuses(pipeline: Path, flag: str, bad: Path, message: str, tmp_path: Path, capsys) -> None:
    """``sd2mnn export PIPELINE OUT FLAG BAD`` exits 2 with one line naming ``bad`` and saying
    ``message``, and writes nothing: no OUT, nothing new in ``tmp_path``."""
    from sd2mnn.cli import main

    out = tmp_path / "out" / "onnx"
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert main(["export", str(pipeline), str(out), flag, str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and message in err, err
    assert not out.parent.exists() and sorted(p.name for p in tmp_path.iterdir()) == before
