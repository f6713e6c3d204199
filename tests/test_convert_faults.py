"""convert under faults: incremental reruns, parallel jobs, atomic commits, kills, locks,
untrusted models, no network, disk space, timeouts. Real converter, real files.

Where a test must act while a conversion is in flight, it uses a "stalling converter": a shell
script that waits while a flag file exists, then execs the real MNN converter
(sd2mnn.conversion._mnnconvert) with the same arguments. The conversion itself is real; the wait only
gives the test a window, and removing the flag lets it go on.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import psutil
import pytest
from conftest import tree_state

import sd2mnn
from sd2mnn.core import manifest as manifest_module
from sd2mnn.core.children import child_env
from sd2mnn.errors import BundleLockedError, ConversionTimeoutError, DiskSpaceError, UnsafeModelError
from sd2mnn.conversion.plan import default_jobs


def stalling_converter(tmp_path: Path, only: str | None = None) -> tuple[Path, Path]:
    """(converter, flag): the converter stalls while ``flag`` exists, for components whose output
    name contains ``only`` (all if None), then runs the real one."""
    flag = tmp_path / f"stall-{only}"
    flag.touch()
    script = tmp_path / f"MNNConvert-stalling-{only}"
    wait = f'while [ -e "{flag}" ]; do sleep 0.05; done'
    # Only conversions stall, not `--version`.
    condition = f'case "$*" in *--MNNModel*{only or ""}.mnn*) {wait};; esac'
    script.write_text(f'#!/bin/sh\n{condition}\nexec "{sys.executable}" -m sd2mnn.conversion._mnnconvert "$@"\n')
    script.chmod(0o755)
    return script, flag


def statuses(report) -> dict[str, str]:
    return {c.name: c.status for c in report.components}


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_leftover_runs():
    """A failed test must not leave its sd2mnn run behind to disturb the next one."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start_cli(args, tmp_path) -> subprocess.Popen:
    log = open(tmp_path / "cli.log", "wb")
    # A shell without job control starts background commands with SIGINT ignored, and Python
    # keeps it ignored: give the run the default disposition so Ctrl-C (SIGINT) reaches it.
    proc = subprocess.Popen([sys.executable, "-m", "sd2mnn.cli", "convert", *map(str, args)],
                            stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _started.append(proc)
    return proc


def wait_for(condition, timeout=120.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def converting(proc: subprocess.Popen, name: str) -> bool:
    return any(f"{name}.mnn" in " ".join(p.cmdline()) for p in converter_children(proc))


def converter_children(proc: subprocess.Popen) -> list[psutil.Process]:
    """The conversions running under ``proc`` (sd2mnn also runs the converter for its
    --version and --help)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            command = child.cmdline()
        except psutil.Error:  # it ended meanwhile (the stalling script's sleeps come and go)
            continue
        line = " ".join(command)
        if ("sd2mnn.conversion._mnnconvert" in line or "MNNConvert-stalling" in line) and "--MNNModel" in command:
            found.append(child)
    return found


# -- 1. incremental ----------------------------------------------------------------------------


def test_rerun_reuses_everything_without_rehashing(bundle_copy, demo_onnx, monkeypatch):
    before = tree_state(bundle_copy)
    calls = []
    real = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda p: calls.append((p, p.stat().st_size)) or real(p))
    report = sd2mnn.convert(demo_onnx, bundle_copy, components=["text_encoder", "unet", "vae_decoder", "vae_encoder"])
    assert set(statuses(report).values()) == {"reused"}
    # Only the few-KB tokenizer files, rebuilt every run, are hashed; no model or weight file.
    assert [p for p, _ in calls if p.suffix in (".onnx", ".pb", ".mnn", ".weight")] == [], f"re-hashed {calls}"
    assert all(size < 1 << 20 for _, size in calls)
    after = tree_state(bundle_copy)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == {k: v for k, v in before.items() if k != "manifest.json"}


def test_changed_source_reconverts_only_that_component(bundle_copy, onnx_copy):
    first = sd2mnn.convert(onnx_copy, bundle_copy, force=True)
    assert set(statuses(first).values()) == {"converted"}
    model = onnx.load(str(onnx_copy / "vae_decoder" / "model.onnx"))
    init = model.graph.initializer[0]
    init.raw_data = bytes(len(init.raw_data))  # zero one weight tensor
    onnx.save(model, str(onnx_copy / "vae_decoder" / "model.onnx"))
    report = sd2mnn.convert(onnx_copy, bundle_copy)
    assert statuses(report) == {"text_encoder": "reused", "unet": "reused", "vae_decoder": "converted"}
    assert report.components[2].reason == "source changed"


def test_touched_source_is_rehashed_and_reused(bundle_copy, onnx_copy):
    sd2mnn.convert(onnx_copy, bundle_copy, force=True)
    os.utime(onnx_copy / "unet" / "weights.pb", ns=(1, 1))
    report = sd2mnn.convert(onnx_copy, bundle_copy)
    assert statuses(report)["unet"] == "reused"


def test_changed_flags_converter_or_outputs(bundle_copy, demo_onnx, tmp_path):
    report = sd2mnn.convert(demo_onnx, bundle_copy, weight_quant_bits=8)
    assert {c.reason for c in report.components} == {"flags changed"}
    wrapper, flag = stalling_converter(tmp_path)
    flag.unlink()
    report = sd2mnn.convert(demo_onnx, bundle_copy, weight_quant_bits=8, converter=str(wrapper))
    assert {c.reason for c in report.components} == {"converter changed"}
    (bundle_copy / "unet.mnn.weight").unlink()
    report = sd2mnn.convert(demo_onnx, bundle_copy, weight_quant_bits=8, converter=str(wrapper))
    assert statuses(report) == {"text_encoder": "reused", "unet": "converted", "vae_decoder": "reused"}
    assert report.components[1].reason == "outputs changed"
    report = sd2mnn.convert(demo_onnx, bundle_copy, weight_quant_bits=8, converter=str(wrapper), force=True)
    assert set(statuses(report).values()) == {"converted"}


# -- 2. parallel -------------------------------------------------------------------------------


class RecordingProgress:
    def __init__(self):
        self.events: list[tuple[str, str]] = []

    def update(self, name, state, detail=""):
        self.events.append((name, state))

    def tick(self):
        pass

    def close(self):
        pass


def test_jobs_run_components_concurrently(demo_onnx, tmp_path):
    progress = RecordingProgress()
    sd2mnn.convert(demo_onnx, tmp_path / "b", jobs=2, progress=progress)
    states = [s for _, s in progress.events]
    assert states[:states.index("loading")].count("converting") == 2
    progress = RecordingProgress()
    sd2mnn.convert(demo_onnx, tmp_path / "c", jobs=1, progress=progress)
    # One conversion at a time; a finished one's load check may overlap the next conversion.
    converting = 0
    for _, state in progress.events:
        converting += {"converting": 1, "loading": -1}.get(state, 0)
        assert converting <= 1


def test_default_jobs_fits_memory():
    gib = 2**30
    sd15 = [int(3.4 * gib * 2.2), int(0.49 * gib * 2.2), int(0.32 * gib * 2.2)]
    assert default_jobs(sd15, cpu_count=2, available=24 * gib) == 2
    assert default_jobs(sd15, cpu_count=8, available=24 * gib) == 3
    # 8.5 GiB free: the unet's 7.5 GiB peak leaves no room beside it.
    assert default_jobs(sd15, cpu_count=8, available=int(8.5 * gib)) == 1
    assert default_jobs([], cpu_count=2, available=gib) == 1


# -- 3. atomic bundle: failures and kills leave the previous bundle exactly as it was ---------


def test_sigkill_of_a_converter_child(bundle_copy, demo_onnx, tmp_path):
    before = tree_state(bundle_copy)
    converter, _ = stalling_converter(tmp_path, only="unet")
    proc = start_cli([demo_onnx, bundle_copy, "--force", "--jobs", "1", "--converter", converter], tmp_path)
    wait_for(lambda: converting(proc, "unet"), what="the unet conversion")
    for child in converter_children(proc):
        child.kill()
    assert proc.wait(timeout=60) == 1
    assert "error: unet:" in (tmp_path / "cli.log").read_text()
    visible = {k: v for k, v in tree_state(bundle_copy).items() if not k.startswith(".sd2mnn")}
    assert visible == before
    assert not (bundle_copy / ".sd2mnn" / "work").exists()


def test_sigkill_of_sd2mnn_then_resume(bundle_copy, demo_onnx, tmp_path):
    before = tree_state(bundle_copy)
    converter, flag = stalling_converter(tmp_path, only="unet")
    proc = start_cli([demo_onnx, bundle_copy, "--weight-quant-bits", "8", "--jobs", "1", "--converter", converter], tmp_path)
    # Largest first: the text encoder (the biggest ONNX file) finishes, then the unet stalls.
    pending = bundle_copy / ".sd2mnn" / "pending" / "text_encoder" / "record.json"
    wait_for(pending.exists, what="text_encoder to finish")
    wait_for(lambda: converting(proc, "unet"), what="the unet conversion")
    children = converter_children(proc)
    proc.kill()
    proc.wait()
    # The converter child dies with its parent (PR_SET_PDEATHSIG).
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive
    visible = {k: v for k, v in tree_state(bundle_copy).items() if not k.startswith(".sd2mnn")}
    assert visible == before
    # The next run, same sources, flags and converter, resumes from the finished text encoder.
    flag.unlink()
    report = sd2mnn.convert(demo_onnx, bundle_copy, weight_quant_bits=8, converter=str(converter))
    assert statuses(report) == {"text_encoder": "resumed", "unet": "converted", "vae_decoder": "converted"}
    assert not (bundle_copy / ".sd2mnn").exists()
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    assert manifest["components"]["text_encoder"]["flags"] == ["--weightQuantBits=8"]


def test_ctrl_c_keeps_finished_work_for_the_right_rerun_only(onnx_copy, tmp_path):
    out = tmp_path / "bundle"
    converter, _ = stalling_converter(tmp_path, only="unet")
    proc = start_cli([onnx_copy, out, "--jobs", "1", "--converter", converter], tmp_path)
    pending = out / ".sd2mnn" / "pending" / "text_encoder" / "record.json"
    wait_for(pending.exists, what="text_encoder to finish")
    wait_for(lambda: converting(proc, "unet"), what="the unet conversion")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert sorted(p.name for p in out.iterdir()) == [".sd2mnn"]
    assert pending.exists() and not (out / ".sd2mnn" / "work").exists()
    # Other flags: the parked text encoder does not match and is converted again.
    report = sd2mnn.convert(onnx_copy, out, weight_quant_bits=8)
    assert statuses(report)["text_encoder"] == "converted"


def test_sigterm_cleans_up(bundle_copy, demo_onnx, tmp_path):
    before = tree_state(bundle_copy)
    converter, _ = stalling_converter(tmp_path)
    proc = start_cli([demo_onnx, bundle_copy, "--force", "--converter", converter], tmp_path)
    wait_for(lambda: converter_children(proc), what="a conversion to start")
    children = converter_children(proc)
    proc.terminate()
    assert proc.wait(timeout=60) == 143  # 128 + SIGTERM
    psutil.wait_procs(children, timeout=10)
    assert tree_state(bundle_copy) == before


INTERRUPTED_WHILE_A_CHILD_STARTS = """
import os, signal
from pathlib import Path
import psutil
from sd2mnn.core.children import Child

class Stop(Exception):
    pass

def stop(signum, frame):
    raise Stop

signal.signal(signal.SIGTERM, stop)
os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGTERM))
try:
    child = Child(["sleep", "60"], Path.cwd(), Path("child.log"))
except Stop:
    print("stopped", len(psutil.Process().children()))
else:
    print("lost")
    child.kill()
    child.wait()
"""


def test_a_sigterm_while_a_child_starts_is_not_lost(tmp_path):
    # Python prints and drops an exception raised in its at-fork hooks, which run around every
    # child sd2mnn starts: a SIGTERM handled there would be lost and the run would go on.
    done = subprocess.run([sys.executable, "-c", INTERRUPTED_WHILE_A_CHILD_STARTS], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, env=child_env())
    assert done.stdout.split() == ["stopped", "0"], done.stderr  # and the child it started is gone


# -- 4. one run at a time ----------------------------------------------------------------------


def test_second_run_is_refused_and_stale_lock_does_not_block(demo_onnx, tmp_path):
    out = tmp_path / "bundle"
    converter, _ = stalling_converter(tmp_path)
    proc = start_cli([demo_onnx, out, "--converter", converter], tmp_path)
    wait_for(lambda: converter_children(proc), what="the first run to start")
    with pytest.raises(BundleLockedError, match="being written by another sd2mnn run"):
        sd2mnn.convert(demo_onnx, out)
    proc.kill()
    proc.wait()
    assert (out / ".sd2mnn" / "lock").exists()  # left by the killed run
    report = sd2mnn.convert(demo_onnx, out, components=["vae_decoder"])
    assert statuses(report) == {"vae_decoder": "converted"}


# -- 5. untrusted models and the network -------------------------------------------------------


def point_external_data_at(onnx_dir: Path, location: str) -> None:
    model_path = onnx_dir / "unet" / "model.onnx"
    model = onnx.load(str(model_path), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(model_path))


@pytest.mark.parametrize("location", ["/etc/passwd", "../../secret.bin", "sub/../../x.bin"])
def test_external_data_outside_the_folder_is_refused(onnx_copy, tmp_path, location):
    point_external_data_at(onnx_copy, location)
    with pytest.raises(UnsafeModelError, match="leads outside|absolute path"):
        sd2mnn.convert(onnx_copy, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_symlink_escaping_the_folder_is_refused(onnx_copy, tmp_path):
    outside = tmp_path / "elsewhere.pb"
    shutil.move(onnx_copy / "unet" / "weights.pb", outside)
    (onnx_copy / "unet" / "weights.pb").symlink_to(outside)
    with pytest.raises(UnsafeModelError, match="is a link that leaves"):
        sd2mnn.convert(onnx_copy, tmp_path / "b")
    (onnx_copy / "vae_decoder" / "model.onnx").rename(tmp_path / "vae.onnx")
    (onnx_copy / "vae_decoder" / "model.onnx").symlink_to(tmp_path / "vae.onnx")
    with pytest.raises(UnsafeModelError):
        sd2mnn.convert(onnx_copy, tmp_path / "b", components=["vae_decoder"])


_PROBE_TOOLS = """\
# Stands in front of the MNN package's _tools: the converter's child imports it after it set up
# (or not) the network guard, so a connection attempt here shows what the conversion ran under.
import importlib.machinery, importlib.util, os, socket

try:
    socket.create_connection(("127.0.0.1", 9), timeout=1).close()
    outcome = "connected"
except OSError as err:
    outcome = f"refused: {err}"
with open(os.environ["SD2MNN_TEST_PROBE"], "a") as log:
    log.write(outcome + "\\n")
here = os.path.dirname(os.path.abspath(__file__))
spec = importlib.machinery.PathFinder.find_spec(
    "_tools", [p for p in __import__("sys").path if os.path.abspath(p or ".") != here])
real = importlib.util.module_from_spec(spec)
spec.loader.exec_module(real)
mnnconvert = real.mnnconvert
"""


def test_conversion_needs_no_network(demo_onnx, tmp_path, monkeypatch):
    # Each converter child records whether a socket connection was possible inside it: with
    # SD2MNN_NO_NETWORK=1 every one must have met sd2mnn's guard (not merely a closed port).
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "_tools.py").write_text(_PROBE_TOOLS)
    probe = tmp_path / "probe.log"
    monkeypatch.setenv("PYTHONPATH", str(shim))
    monkeypatch.setenv("SD2MNN_TEST_PROBE", str(probe))
    monkeypatch.setenv("SD2MNN_NO_NETWORK", "1")
    report = sd2mnn.convert(demo_onnx, tmp_path / "b")
    assert set(statuses(report).values()) == {"converted"}
    outcomes = probe.read_text().splitlines()
    assert len(outcomes) >= len(statuses(report))  # one per component, and the version query
    assert all("network access is disabled" in line for line in outcomes), outcomes


# -- 6. disk space, 7. timeout -----------------------------------------------------------------


def test_not_enough_disk_space(demo_onnx, tmp_path, monkeypatch):
    from sd2mnn.conversion import convert as conversion

    real = shutil.disk_usage
    monkeypatch.setattr(conversion.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=1_000_000))
    with pytest.raises(DiskSpaceError, match=r"has 976.6 KiB free but the conversion needs about .*MiB; free .*MiB"):
        sd2mnn.convert(demo_onnx, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_timeout_kills_a_hung_converter(bundle_copy, demo_onnx, tmp_path):
    before = tree_state(bundle_copy)
    converter, _ = stalling_converter(tmp_path, only="unet")
    # The unet alone: a real conversion may take over 2 s on a busy machine.
    with pytest.raises(ConversionTimeoutError, match="unet: the converter ran past --timeout 2s"):
        sd2mnn.convert(demo_onnx, bundle_copy, components=["unet"], force=True, timeout=2, converter=str(converter))
    visible = {k: v for k, v in tree_state(bundle_copy).items() if not k.startswith(".sd2mnn")}
    assert visible == before
    assert not (bundle_copy / ".sd2mnn" / "work").exists()
    # The hung converter was converted in this process: none of its children may live on.
    alive = [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [p.cmdline() for p in alive]
