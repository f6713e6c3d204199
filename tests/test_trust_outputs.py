"""What the commands write for the user and which sources they compare against, through real
files and processes: one `error:` line naming the file and the fix, a non-zero exit, nothing lost,
and every refusal before any work."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tree_state
from test_cli_errors import PROMPT, assert_clean_error
from test_cli_errors import sd2mnn as run_cli

from sd2mnn.cli import build_parser
from sd2mnn.core.images import write_png

MINE = b"the user's own bytes\n"


@pytest.fixture(scope="module")
def diffusers_model(tmp_path_factory) -> Path:
    """A tiny real diffusers SD1.5 pipeline (convert exports it first)."""
    pytest.importorskip("diffusers")
    from builders import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("diffusers") / "model", seed=0)


def _mine(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(MINE)
    return path


# ---------------------------------------------------------------------------------------------
# convert MODEL MNN_DIR --keep-onnx DIR
# ---------------------------------------------------------------------------------------------
KEEP_ONNX_REFUSED = [
    # (--keep-onnx, MNN_DIR, extra flags, message)
    ("{tmp}/mine", "{tmp}/bundle", [], "mine already exists (folder); the exported ONNX pipeline would replace it"),
    ("{tmp}/bundle", "{tmp}/bundle", ["--overwrite"], "is MNN_DIR {tmp}/bundle"),
    ("{tmp}", "{tmp}/bundle", ["--overwrite"], "holds MNN_DIR {tmp}/bundle"),
    ("{tmp}/bundle/onnx", "{tmp}/bundle", ["--force"], "lies inside MNN_DIR {tmp}/bundle"),
    ("{model}/tokenizer", "{tmp}/bundle", ["--overwrite"], "lies inside the model {model}"),
    ("{model}", "{tmp}/bundle", ["--overwrite"], "is the model {model}"),
    ("{tmp}/mine/notes.txt/onnx", "{tmp}/bundle", [], "--keep-onnx {tmp}/mine/notes.txt/onnx is not a folder"),
    ("/proc/sd2mnn-keep", "{tmp}/bundle", [], "cannot write /proc/sd2mnn-keep"),  # access() says yes
    ("{tmp}/onnx", "{tmp}/mine/notes.txt/bundle", [], "MNN_DIR {tmp}/mine/notes.txt/bundle is not a folder"),
    ("{tmp}/onnx", "/proc/sd2mnn-bundle", [], "cannot write /proc/sd2mnn-bundle"),
]


@pytest.mark.parametrize("keep, mnn_dir, flags, message", KEEP_ONNX_REFUSED)
def test_keep_onnx_that_would_replace_something_is_refused_before_export(diffusers_model, fp32_bundle, tmp_path,
                                                                        keep, mnn_dir, flags, message):
    shutil.copytree(fp32_bundle, tmp_path / "bundle")  # an earlier good bundle
    _mine(tmp_path / "mine" / "notes.txt")
    fill = {"tmp": tmp_path, "model": diffusers_model}
    before = tree_state(tmp_path), tree_state(diffusers_model)
    done = run_cli("convert", diffusers_model, mnn_dir.format(**fill), "--keep-onnx", keep.format(**fill),
                   "--components", "vae_decoder", *flags, timeout=120)
    assert_clean_error(done, message.format(**fill))
    assert "exporting" not in done.stderr  # refused before the export
    assert (tree_state(tmp_path), tree_state(diffusers_model)) == before


def test_keep_onnx_replaces_a_folder_with_overwrite(diffusers_model, tmp_path):
    _mine(tmp_path / "onnx" / "notes.txt")
    done = run_cli("convert", diffusers_model, tmp_path / "bundle", "--keep-onnx", tmp_path / "onnx",
                   "--components", "vae_decoder", "--overwrite", "-q", timeout=600)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == [".sd2mnn-references", "sd2mnn_family.json", "tokenizer",
                                                                  "vae_decoder"]
    assert (tmp_path / "bundle" / "vae_decoder.mnn").is_file()


# ---------------------------------------------------------------------------------------------
# Files the user has are replaced only with --overwrite (alias --force), checked before any work
# ---------------------------------------------------------------------------------------------
def test_generate_refuses_to_replace_an_image_or_latents(fp32_bundle, tmp_path):
    image, latents = _mine(tmp_path / "mine.png"), _mine(tmp_path / "mine.npy")
    done = run_cli("generate", fp32_bundle, PROMPT, "-o", image, "--steps", 1)
    assert_clean_error(done, f"{image} already exists (file); the image would replace it")
    assert "step" not in done.stderr  # refused before loading
    done = run_cli("generate", fp32_bundle, PROMPT, "-o", tmp_path / "new.png", "--save-latents", latents, "--steps", 1)
    assert_clean_error(done, f"{latents} already exists (file); the latents would replace it")
    assert image.read_bytes() == latents.read_bytes() == MINE
    assert not (tmp_path / "new.png").exists()


def test_generate_replaces_with_the_force_alias(fp32_bundle, tmp_path):
    image, latents = _mine(tmp_path / "mine.png"), _mine(tmp_path / "mine.npy")
    done = run_cli("generate", fp32_bundle, PROMPT, "-o", image, "--save-latents", latents, "--steps", 1,
                   "--threads", 2, "-q", "--force")
    assert done.returncode == 0, done.stderr
    assert image.read_bytes().startswith(b"\x89PNG") and np.load(latents).shape == (1, 4, 64, 64)


def test_compare_refuses_to_replace_a_diff_picture(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    write_png(a, np.zeros((32, 32, 3), np.uint8))
    write_png(b, np.full((32, 32, 3), 9, np.uint8))
    for diff in (_mine(tmp_path / "mine.png"), _mine(tmp_path / "a_vs_b.diff.png")):  # named, and the default
        args = ["compare", a, b] + (["--diff", diff] if diff.name == "mine.png" else [])
        assert_clean_error(run_cli(*args), f"{diff} already exists (file); the diff picture would replace it")
        assert diff.read_bytes() == MINE
        assert run_cli(*args, "--overwrite").returncode == 0
        assert diff.read_bytes().startswith(b"\x89PNG")


def test_verify_refuses_to_replace_a_report(fp32_bundle, demo_onnx, tmp_path):
    report = tmp_path / "report"
    _mine(report / "verification.json")
    before = tree_state(report)
    done = run_cli("verify", demo_onnx, fp32_bundle, "--components", "vae_decoder", "--report", report)
    assert_clean_error(done, f"{report / 'verification.json'} already exists (file); the verification report would")
    assert "vae_decoder" not in done.stderr.replace(str(report / "verification.json"), "")  # nothing ran
    assert tree_state(report) == before
    done = run_cli("verify", demo_onnx, fp32_bundle, "--components", "vae_decoder", "--report", report, "-q",
                   "--overwrite")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in report.iterdir()) == ["vae_decoder.png", "verification.json"]
    assert (report / "verification.json").read_bytes() != MINE


def test_sweep_refuses_to_replace_a_plot_before_converting(demo_onnx, tmp_path):
    plot = _mine(tmp_path / "plot.png")
    done = run_cli("sweep", demo_onnx, tmp_path / "variants", "--variants", "fp32", "--plot", plot)
    assert_clean_error(done, f"{plot} already exists (file); the plot would replace it")
    assert plot.read_bytes() == MINE and not (tmp_path / "variants").exists()


@pytest.mark.parametrize("command", [
    ["convert", "o", "m"], ["export", "d", "o"], ["demo"], ["generate", "b", "p", "-o", "x.png"],
    ["compare", "a.png", "b.png"], ["verify", "o", "m"], ["sweep", "o", "v"],
])
@pytest.mark.parametrize("flag", ["--overwrite", "--force"])
def test_every_command_that_replaces_spells_the_flag_alike(command, flag):
    args = build_parser().parse_args([*command, flag])
    assert args.overwrite is True and not hasattr(args, "force")
    assert build_parser().parse_args(command).overwrite is False


def test_demo_names_the_overwrite_flag(tmp_path):
    _mine(tmp_path / "out" / "notes.txt")
    done = run_cli("demo", tmp_path / "out", "-q")
    assert_clean_error(done, "the demo would replace it: choose another folder, or pass --overwrite")
    assert (tmp_path / "out" / "notes.txt").read_bytes() == MINE


# ---------------------------------------------------------------------------------------------
# The ONNX sources compared with a bundle are the bundle's own
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def other_onnx(onnx_copy) -> Path:
    """The demo pipeline with other vae_decoder weights: the same file size, another model."""
    import onnx
    from onnx import numpy_helper

    path = onnx_copy / "vae_decoder" / "model.onnx"
    model = onnx.load(path)
    weight = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    weight.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(weight), weight.name))
    onnx.save(model, path)
    return onnx_copy


@pytest.mark.parametrize("command", [
    ["bench", "{bundle}", "--onnx", "{onnx}", "--components", "vae_decoder", "--runs", "1"],
    ["verify", "{onnx}", "{bundle}", "--components", "vae_decoder"],
])
def test_another_pipelines_onnx_is_refused(command, other_onnx, fp32_bundle, demo_onnx):
    done = run_cli(*[a.format(onnx=other_onnx, bundle=fp32_bundle) for a in command])
    model = other_onnx / "vae_decoder" / "model.onnx"
    assert_clean_error(done, f"so it is not the vae_decoder the bundle {fp32_bundle} was converted from ({demo_onnx}): "
                             "give that ONNX folder")
    assert f"error: {model}: " in done.stderr
    assert "steady" not in done.stdout and "PSNR" not in done.stdout  # nothing was timed or compared


def test_a_copy_of_the_source_with_new_mtimes_is_accepted(onnx_copy, fp32_bundle):
    for path in onnx_copy.rglob("*"):
        os.utime(path, (1e9, 1e9))  # the recorded mtime no longer vouches: the hash decides
    done = run_cli("bench", fp32_bundle, "--onnx", onnx_copy, "--components", "vae_decoder", "--runs", "1")
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr


def test_a_bundle_without_manifest_is_said_once(bundle_copy, other_onnx):
    (bundle_copy / "manifest.json").unlink()
    done = run_cli("verify", other_onnx, bundle_copy, "--components", "vae_decoder", "-q")
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {bundle_copy / 'manifest.json'} is missing, so {other_onnx} cannot be checked to "
                        "be the bundle's ONNX source; the numbers mean something only if it is"]
    assert_clean_error(done, "verification failed: vae_decoder.sample")  # compared as before, and failed


def _decoder_of_other_shapes(tmp_path: Path) -> Path:
    """An MNN vae_decoder with the runtime's tensor names but 16 latent channels (an SD3-like VAE)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((3, 16, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["latent_sample", "w"], ["sample"])], "decoder",
        [helper.make_tensor_value_info("latent_sample", TensorProto.FLOAT, [1, 16, 64, 64])],
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, [1, 3, 64, 64])], [weight])
    source = tmp_path / "decoder.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), source)
    target = tmp_path / "decoder.mnn"
    subprocess.run([sys.executable, "-m", "sd2mnn.conversion._mnnconvert", "-f", "ONNX", "--modelFile", source, "--MNNModel",
                    target, "--bizCode", "biz"], capture_output=True, check=True, timeout=120)
    return target


def test_a_decoder_of_other_tensors_is_one_line(bundle_copy, demo_onnx, tmp_path):
    (bundle_copy / "manifest.json").unlink()
    shutil.copyfile(_decoder_of_other_shapes(tmp_path), bundle_copy / "vae_decoder.mnn")
    done = run_cli("verify", demo_onnx, bundle_copy, "--components", "vae_decoder")
    assert_clean_error(done, f"{bundle_copy / 'vae_decoder.mnn'}: gives no 'sample' output for the inputs "
                             f"{demo_onnx / 'vae_decoder' / 'model.onnx'} takes")


# ---------------------------------------------------------------------------------------------
# Text files the user names are read a bounded way
# ---------------------------------------------------------------------------------------------
def _big(path: Path, size: int) -> Path:
    with open(path, "wb") as stream:
        stream.truncate(size)  # sparse: no disk used
    return path


@pytest.mark.parametrize("prompts, message", [
    ("/dev/zero", "/dev/zero holds more than 4 MiB, more than prompts ever need"),
    ("{tmp}/big.txt", "big.txt holds more than 4 MiB"),
    ("{tmp}/line.txt", "line.txt has a line over 10000 characters"),
    ("{tmp}", "is a folder; give a file of prompts"),
])
def test_verify_prompts_are_read_bounded(prompts, message, fp32_bundle, demo_onnx, tmp_path):
    _big(tmp_path / "big.txt", 5 << 20)
    (tmp_path / "line.txt").write_text("a cat " * 3000 + "\n")
    done = run_cli("verify", demo_onnx, fp32_bundle, "--prompts", prompts.format(tmp=tmp_path), timeout=60)
    assert_clean_error(done, message)
    assert "text_encoder" not in done.stderr  # nothing ran


@pytest.mark.parametrize("latents, message", [
    ("/dev/zero", "/dev/zero is not a file of at most 64 MiB"),
    ("{tmp}/big.npy", "big.npy is not a file of at most 64 MiB"),
    ("{tmp}/big.txt", "big.txt holds more than 64 MiB, more than latents ever need"),
])
def test_generate_latents_are_read_bounded(latents, message, fp32_bundle, tmp_path):
    _big(tmp_path / "big.npy", 65 << 20)
    _big(tmp_path / "big.txt", 65 << 20)
    done = run_cli("generate", fp32_bundle, PROMPT, "-o", tmp_path / "x.png", "--latents",
                   latents.format(tmp=tmp_path), "--steps", 1, timeout=120)
    assert_clean_error(done, message)
    assert not (tmp_path / "x.png").exists()
