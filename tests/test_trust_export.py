"""sd2mnn export against hostile model folders: each is refused with one `error:` line that names
the file and the fix, before anything is loaded or written; nothing from the folder runs.

Tiny real pipelines (tests/builders.py) are copied and spoiled one way per test; most refusals
happen before torch loads a model, so they cost a file copy.
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

import pytest

from conftest import tree_state
from sd2mnn.cli import main

SRC = str(Path(__file__).resolve().parent.parent / "src")


@pytest.fixture(scope="module")
def sd15(tmp_path_factory) -> Path:
    pytest.importorskip("diffusers")
    from builders import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("trust") / "sd15", seed=0)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory) -> Path:
    pytest.importorskip("diffusers")
    from builders import make_tiny_sd3_pipeline

    return make_tiny_sd3_pipeline(tmp_path_factory.mktemp("trust") / "sd3", seed=0)


def _copy(pipeline: Path, tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(pipeline, model)
    return model


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DROP:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


_DROP = object()


def refused(capsys, model: Path, onnx_dir: Path, *args: str) -> str:
    """Run `sd2mnn export`; assert it failed with one error line and left model and ONNX_DIR
    as they were, no staging folder beside ONNX_DIR; return the line."""
    before, target_before = tree_state(model), tree_state(onnx_dir)
    code = main(["export", str(model), str(onnx_dir), *args])
    err = capsys.readouterr().err
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err  # no progress: nothing was loaded
    assert tree_state(model) == before and tree_state(onnx_dir) == target_before
    assert not list(onnx_dir.parent.glob(f".{onnx_dir.name}.export-*"))
    return lines[0]


# -- ONNX_DIR overlapping what export reads ----------------------------------------------------


def test_onnx_dir_inside_the_model_is_refused(sd15, tmp_path, capsys):
    model = _copy(sd15, tmp_path)
    line = refused(capsys, model, model / "unet", "--overwrite")
    assert f"{model / 'unet'}: lies inside {model}" in line and "outside" in line
    line = refused(capsys, model, model / "new" / "onnx")
    assert "lies inside" in line
    assert not (model / "new").exists()
    line = refused(capsys, model, tmp_path, "--overwrite")  # a folder holding the model
    assert f"{tmp_path}: holds {model}" in line


def test_onnx_dir_inside_the_config_folder_is_refused(sd15, tmp_path, capsys):
    from builders import make_config_folder, save_single_file

    ckpt = save_single_file(sd15, tmp_path / "tiny.safetensors")
    config = make_config_folder(sd15, tmp_path / "config")
    before = tree_state(config)
    line = refused(capsys, ckpt, config / "tokenizer", "--config", str(config), "--overwrite")
    assert f"lies inside {config}" in line
    assert tree_state(config) == before


# -- a model folder's own code never runs ---------------------------------------------------------


def _plant_code(folder: Path, marker: Path, module: str) -> None:
    (folder / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")


def _export_process(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run([sys.executable, "-m", "sd2mnn.cli", "export", *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_a_class_outside_the_family_is_refused_without_running_the_folders_code(sd15, tmp_path):
    model = _copy(sd15, tmp_path)
    marker = tmp_path / "ran"
    _edit_json(model / "model_index.json", text_encoder=["transformers", "AutoModel"])
    _edit_json(model / "text_encoder" / "config.json", auto_map={"AutoModel": "modeling_evil.EvilModel"})
    _plant_code(model / "text_encoder", marker, "modeling_evil")
    done = _export_process(str(model), str(tmp_path / "onnx"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: {model / 'model_index.json'}: text_encoder is transformers.AutoModel, which sd2mnn does not load "
        "for a sd15 model (it loads transformers.CLIPTextModel); set that class or use the model's own "
        "model_index.json"]
    assert "[y/N]" not in done.stdout + done.stderr and not marker.exists()
    assert not (tmp_path / "onnx").exists()


def test_a_tokenizer_asking_for_its_own_code_is_read_with_the_familys_class(sd15, tmp_path):
    """No tokenizer entry in model_index.json and an auto_map in tokenizer_config.json: the
    family's CLIPTokenizer reads the files; nothing asks, nothing of the folder runs."""
    model = _copy(sd15, tmp_path)
    marker = tmp_path / "ran"
    _edit_json(model / "model_index.json", tokenizer=_DROP)
    _edit_json(model / "tokenizer" / "tokenizer_config.json",
               auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
    _plant_code(model / "tokenizer", marker, "tokenization_evil")
    done = _export_process(str(model), str(tmp_path / "onnx"), "--components", "text_encoder")
    assert done.returncode == 0, done.stderr
    assert "[y/N]" not in done.stdout + done.stderr and not marker.exists()
    assert (tmp_path / "onnx" / "text_encoder" / "model.onnx").is_file()


def test_every_class_is_checked_before_any_component_is_exported(sd15, tmp_path, capsys):
    model = _copy(sd15, tmp_path)
    _edit_json(model / "model_index.json", vae=["diffusers", "AsymmetricAutoencoderKL"])
    line = refused(capsys, model, tmp_path / "onnx")
    assert "vae is diffusers.AsymmetricAutoencoderKL" in line and "diffusers.AutoencoderKL" in line


# -- tokenizers ------------------------------------------------------------------------------------


def test_an_empty_tokenizer_folder_is_refused(sd15, tmp_path, capsys):
    model = _copy(sd15, tmp_path)
    for path in (model / "tokenizer").iterdir():
        path.unlink()
    line = refused(capsys, model, tmp_path / "onnx")
    assert line == (f"error: {model / 'tokenizer'}: no CLIPTokenizer files (it needs vocab.json and merges.txt or "
                    "tokenizer.json); copy the model's tokenizer/ folder whole")


@pytest.mark.parametrize("name, content", [("tokenizer_config.json", "[]"), ("vocab.json", '"text"'),
                                           ("special_tokens_map.json", "[1, 2]")])
def test_a_tokenizer_json_that_is_not_an_object_is_refused(sd15, tmp_path, capsys, name, content):
    model = _copy(sd15, tmp_path)
    (model / "tokenizer" / name).write_text(content)
    line = refused(capsys, model, tmp_path / "onnx")
    assert line == f"error: {model / 'tokenizer' / name}: not a JSON object; restore tokenizer/ from the model"


def test_a_tokenizer_file_linking_out_of_the_model_is_refused(sd15, tmp_path, capsys):
    model = _copy(sd15, tmp_path)
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"private": "data"}))
    (model / "tokenizer" / "added_tokens.json").symlink_to(secret)
    line = refused(capsys, model, tmp_path / "onnx")
    assert f"{model / 'tokenizer' / 'added_tokens.json'} is a link that leaves {model}" in line


def _hub_cache_snapshot(pipeline: Path, repo: Path) -> Path:
    """``pipeline`` laid out as Hugging Face's cache keeps a download: every file of
    repo/snapshots/REVISION a relative link to repo/blobs/."""
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    for i, path in enumerate(sorted(p for p in pipeline.rglob("*") if p.is_file())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copy2(path, blob)
        link = snapshot / path.relative_to(pipeline)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def test_a_hub_cache_snapshot_exports_and_its_links_stay_in_the_repository(sd15, tmp_path, capsys):
    snapshot = _hub_cache_snapshot(sd15, tmp_path / "models--tiny--sd15")
    assert main(["export", str(snapshot), str(tmp_path / "onnx"), "--components", "vae_decoder"]) == 0
    assert (tmp_path / "onnx" / "vae_decoder" / "model.onnx").is_file()
    vocab = "tokenizer/vocab.json"
    assert (tmp_path / "onnx" / vocab).read_bytes() == (sd15 / vocab).read_bytes()
    capsys.readouterr()
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"private": "data"}))
    (snapshot / "tokenizer" / "added_tokens.json").symlink_to(secret)
    line = refused(capsys, snapshot, tmp_path / "onnx2")
    assert "added_tokens.json is a link that leaves" in line and "models--tiny--sd15" in line


# -- what MNN's runtime can draw with -----------------------------------------------------------


def test_an_inpainting_unet_is_refused(sd15, tmp_path, capsys):
    model = _copy(sd15, tmp_path)
    _edit_json(model / "unet" / "config.json", in_channels=9)
    line = refused(capsys, model, tmp_path / "onnx")
    assert line.startswith(f"error: {model / 'unet' / 'config.json'}: in_channels 9; MNN's sd15 runtime draws "
                           "text-to-image with 4 latent channels only")


def test_an_sd3_transformer_of_other_latent_channels_is_refused(sd3, tmp_path, capsys):
    model = _copy(sd3, tmp_path)
    _edit_json(model / "transformer" / "config.json", in_channels=33)
    line = refused(capsys, model, tmp_path / "onnx")
    assert f"{model / 'transformer' / 'config.json'}: in_channels 33; MNN's sd35 runtime draws text-to-image " \
           "with 16 latent channels only" in line


# -- garbled files: one line each, before anything loads -------------------------------------------


@pytest.mark.parametrize("file, key, value, says", [
    ("model_index.json", "tokenizer", 5, "'tokenizer' is 5, not a [library, class] pair"),
    ("model_index.json", "unet", ["diffusers"], "'unet' is ['diffusers'], not a [library, class] pair"),
    ("unet/config.json", "sample_size", "abc", "sample_size 'abc' is not a positive whole number or a pair"),
    ("unet/config.json", "sample_size", -8, "sample_size -8 is not a positive whole number or a pair"),
    ("vae/config.json", "block_out_channels", 5, "block_out_channels 5 is not a non-empty list"),
    ("vae/config.json", "block_out_channels", None, "block_out_channels None is not a non-empty list"),
    ("text_encoder/config.json", "hidden_size", _DROP, "no hidden_size; it must be a positive whole number"),
])
def test_garbled_sd15_values_are_one_line(sd15, tmp_path, capsys, file, key, value, says):
    model = _copy(sd15, tmp_path)
    _edit_json(model / file, **{key: value})
    line = refused(capsys, model, tmp_path / "onnx")
    assert line.startswith(f"error: {model / file}: {says}"), line
    assert "re-download the model" in line


@pytest.mark.parametrize("file, key, value, says", [
    ("transformer/config.json", "patch_size", "x", "patch_size 'x' is not a positive whole number"),
    ("text_encoder/config.json", "projection_dim", None, "projection_dim None is not a positive whole number"),
    ("text_encoder_3/config.json", "d_model", 0, "d_model 0 is not a positive whole number"),
])
def test_garbled_sd3_values_are_one_line(sd3, tmp_path, capsys, file, key, value, says):
    model = _copy(sd3, tmp_path)
    _edit_json(model / file, **{key: value})
    line = refused(capsys, model, tmp_path / "onnx")
    assert line.startswith(f"error: {model / file}: {says}"), line


def test_onnx_dir_under_a_file_is_one_line(sd15, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    code = main(["export", str(sd15), str(blocker / "onnx"), "--components", "vae_decoder"])
    err = capsys.readouterr().err
    assert code != 0
    assert err == f"error: {blocker}: a file, not a folder, so {blocker / 'onnx'} cannot be made in it; " \
                  "choose another ONNX_DIR\n", err
    assert blocker.read_text() == "mine"


@pytest.fixture
def read_only_folder(tmp_path):
    """An empty folder nobody may write in (root too: chattr +i where chmod does not hold it)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if os.access(folder, os.W_OK) and shutil.which("chattr"):
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        (folder / "probe").touch()
    except OSError:
        yield folder
    else:
        pytest.skip("this user writes into read-only folders")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_read_only_parent_is_one_line(sd15, read_only_folder, capsys):
    for onnx_dir in (read_only_folder / "onnx", read_only_folder / "sub" / "onnx"):
        code = main(["export", str(sd15), str(onnx_dir), "--components", "vae_decoder"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"error: {onnx_dir.parent}: ") and "run again" in err, err
        assert list(read_only_folder.iterdir()) == []


# -- pickles --------------------------------------------------------------------------------------


class _Runs:
    """Unpickling this runs Path.touch on a marker: what a weights-only loader must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_code_running_ckpt_is_refused_as_unsafe(sd15, tmp_path, capsys):
    import torch
    from builders import make_config_folder

    marker = tmp_path / "ran"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": _Runs(marker)}}, ckpt)
    config = make_config_folder(sd15, tmp_path / "config")
    code = main(["export", str(ckpt), str(tmp_path / "onnx"), "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists()
    line = [x for x in err.splitlines() if x.startswith("error: ")]
    assert line and line[0].startswith(f"error: {ckpt}: refused as unsafe: its pickle calls code beyond plain tensors")
    assert line[0].endswith("use the model's .safetensors file") and "re-download" not in line[0]
    assert not (tmp_path / "onnx").exists() and not list(tmp_path.glob(".onnx.export-*"))


def test_a_code_running_bin_in_a_model_folder_is_refused_as_unsafe(sd15, tmp_path, capsys):
    import torch

    model = _copy(sd15, tmp_path)
    marker = tmp_path / "ran"
    (model / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"encoder.conv_in.weight": _Runs(marker)}, model / "vae" / "diffusion_pytorch_model.bin")
    code = main(["export", str(model), str(tmp_path / "onnx"), "--components", "vae_decoder"])
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists()
    line = [x for x in err.splitlines() if x.startswith("error: ")]
    assert line and line[0].startswith(f"error: {model / 'vae'}: refused as unsafe"), err
    assert not (tmp_path / "onnx").exists() and not list(tmp_path.glob(".onnx.export-*"))


# -- SIGTERM ----------------------------------------------------------------------------------------


def test_sigterm_removes_the_staging_folder_and_keeps_onnx_dir(sd15, tmp_path):
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "keep.txt").write_text("mine")
    env = dict(os.environ, PYTHONPATH=SRC)
    proc = subprocess.Popen([sys.executable, "-m", "sd2mnn.cli", "export", str(sd15), str(onnx_dir), "--overwrite"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".onnx.export-*")):
            assert proc.poll() is None and time.monotonic() < deadline, "no staging folder appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert b"Traceback" not in err
    assert not list(tmp_path.glob(".onnx.export-*"))
    assert tree_state(onnx_dir) == {"keep.txt": tree_state(onnx_dir)["keep.txt"]}
    assert (onnx_dir / "keep.txt").read_text() == "mine"


def test_a_check_killed_by_the_kernel_is_an_error_not_a_hang(tmp_path):
    """ONNX Runtime's check runs in a child; killed (as the kernel kills one out of memory), the
    export stops with one line instead of waiting forever for its answer."""
    import threading

    import numpy as np
    import onnx
    import psutil
    from onnx import TensorProto, helper

    from sd2mnn.errors import Sd2MnnError
    from sd2mnn.exporting.export import check_onnx

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(model))
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    stop = threading.Event()

    def kill_the_child():
        while not stop.is_set():
            for child in me.children(recursive=True):
                try:
                    if child.pid not in before and "resource_tracker" not in " ".join(child.cmdline()):
                        child.kill()
                        return
                except psutil.Error:  # gone meanwhile
                    pass
            time.sleep(0.01)

    killer = threading.Thread(target=kill_the_child)
    killer.start()
    try:
        with pytest.raises(Sd2MnnError, match="ONNX Runtime's check was killed"):
            check_onnx(model, {"x": np.ones(1, np.float32)}, {"y": np.ones(1)})
    finally:
        stop.set()
        killer.join()
