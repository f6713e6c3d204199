"""Pipelines off MNN's runtime contract, built tiny, exported, converted and run for real.

* ``small``: a unet with 16x16 latents and a 2x VAE (32x32 images). The runtime would refuse its
  bundle (it feeds 64x64 latents); generate, bench, sweep and verify run it with their sizes from
  the models and say what the runtime would refuse, naming the file.
* ``vocab``: a text encoder with 64 ids, whose tokenizer's BOS/EOS sit at 62/63: the runtime feeds
  49406/49407, so nothing can run; every command says so in one line before running anything.
* A Taiyi bundle whose tokenizer has only tokenizer.json (as current transformers saves it): MNN
  3.6.1 reads only tokenizer.mtok, so it meets the contract.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import sd2mnn
from sd2mnn.measurement.bench import bench
from sd2mnn.cli import main as cli_main
from sd2mnn.core.contract import check_contract, check_tensors, tensor_infos
from sd2mnn.errors import InputError
from sd2mnn.exporting.export import ExportOptions, export
from sd2mnn.families import SD15
from sd2mnn.core.layout import load_component
from sd2mnn.measurement.sweep import sweep
from sd2mnn.verification.verify import verify

pytest.importorskip("torch")
pytest.importorskip("diffusers")

# 16x16 latents, a VAE with one upsampling: the whole pipeline runs in milliseconds.
SMALL = dict(unet=dict(sample_size=16),
             vae=dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    from builders import make_tiny_pipeline

    root = tmp_path_factory.mktemp("small")
    pipeline = make_tiny_pipeline(root / "pipeline", **SMALL)
    export(pipeline, root / "onnx")  # the model's own size: 32x32
    sd2mnn.convert(root / "onnx", root / "bundle")
    return root / "onnx", root / "bundle"


@pytest.fixture(scope="module")
def vocab(small, tmp_path_factory) -> tuple[Path, Path]:
    """The small pipeline with a text encoder of 64 ids (its unet and VAE reused)."""
    from builders import make_tiny_pipeline, write_small_clip_tokenizer

    root = tmp_path_factory.mktemp("vocab")
    pipeline = make_tiny_pipeline(root / "pipeline", **SMALL, text=dict(vocab_size=64, bos_token_id=62, eos_token_id=63),
                                  write_tokenizer=write_small_clip_tokenizer)
    onnx = root / "onnx"
    export(pipeline, onnx, ExportOptions(components=("text_encoder",)))
    for name in ("unet", "vae_decoder"):
        shutil.copytree(small[0] / name, onnx / name)
    # MNN's own tokenizer scheme: the runtime's ids as they are, nothing rewritten in front.
    sd2mnn.convert(onnx, root / "bundle", tokenizer_scheme="mnn")
    return onnx, root / "bundle"


def _one_line_error(capsys, *words) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "device supports" not in line]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# -- a unet with 16x16 latents -----------------------------------------------------------------


def test_export_takes_its_size_from_the_model(small):
    onnx, _ = small
    unet = {t.name: t.shape for t in load_component(onnx, "unet", SD15).summary.inputs}
    assert unet["sample"] == (2, 4, 16, 16)
    assert {t.name: t.shape for t in load_component(onnx, "vae_decoder", SD15).summary.outputs}["sample"] == (1, 3, 32, 32)


def test_generate_previews_it_and_says_what_the_runtime_would_refuse(small, tmp_path, capsys):
    from PIL import Image

    onnx, bundle = small
    out = tmp_path / "small.png"
    assert cli_main(["generate", str(bundle), "a photo of a cat", "-o", str(out), "--steps", "2", "-q"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert "Traceback" not in err
    assert warnings == [
        "warning: MNN's runtime would refuse unet.mnn: shape: the runtime expects input 'sample' of shape "
        "[2,4,64,64]; found [2,4,16,16]",
        "warning: MNN's runtime would refuse vae_decoder.mnn: shape: the runtime expects input 'latent_sample' of "
        "shape [1,4,64,64]; found [1,4,16,16]",
    ]
    with Image.open(out) as image:
        assert image.size == (32, 32)
        assert "unet.mnn" in image.info["mnn_runtime_contract"]
        assert image.info["matches_mnn_runtime"].startswith("no: ") and "[2,4,16,16]" in image.info["matches_mnn_runtime"]
    # ONNX Runtime runs the same pipeline, and names the ONNX file.
    assert cli_main(["generate", "--onnx", str(onnx), "a photo of a cat", "-o", str(tmp_path / "ort.png"),
                     "--steps", "2", "-q"]) == 0
    assert "warning: MNN's runtime would refuse unet/model.onnx: shape" in capsys.readouterr().err


def test_bench_measures_it(small, capsys):
    onnx, bundle = small
    report = bench(bundle, onnx, components="unet,vae_decoder", runs=1)
    assert not report.errors and all(t.median_s > 0 for c in report.components for t in c.timings.values())
    assert "sample[2, 4, 16, 16]" in report.components[0].inputs
    assert any("unet.mnn: shape" in line for line in report.off_contract)
    assert cli_main(["bench", str(bundle), "--components", "unet", "--runs", "1", "--json"]) == 0
    captured = capsys.readouterr()
    assert "warning: MNN's runtime would refuse unet.mnn: shape" in captured.err
    assert json.loads(captured.out)["off_contract"][0].startswith("MNN's runtime would refuse unet.mnn")


def test_verify_compares_it_and_fails_on_the_contract_alone(small):
    onnx, bundle = small
    report = verify(onnx, bundle, components="unet,vae_decoder")
    assert all(o.psnr > 60 for c in report.components for o in c.outputs)
    assert not report.passed
    assert {(i.file, i.kind) for i in report.contract} == {("unet.mnn", "shape"), ("vae_decoder.mnn", "shape")}
    assert all("64,64" in f for f in report.failures)


def test_sweep_measures_it_and_reports_the_contract_once(small, tmp_path):
    onnx, _ = small
    report = sweep(onnx, tmp_path / "variants", {"fp32": None}, components="unet", runs=1)
    (fp32,) = report.variants
    assert fp32.ok and fp32.components["unet"].passed
    assert report.off_contract == [
        "MNN's runtime would refuse unet.mnn: shape: the runtime expects input 'sample' of shape [2,4,64,64]; "
        "found [2,4,16,16]",
        "MNN's runtime would refuse unet.mnn: shape: the runtime expects output 'out_sample' of shape [2,4,64,64]; "
        "found [2,4,16,16]",
    ]
    assert report.to_dict()["off_contract"] == report.off_contract


# -- a text encoder of 64 ids --------------------------------------------------------------------


def test_a_vocabulary_smaller_than_the_runtime_ids_is_one_line_before_any_run(vocab, tmp_path, capsys):
    onnx, bundle = vocab
    words = ("vocabulary of 64 ids", "49406/49407")
    assert cli_main(["generate", str(bundle), "a cat", "-o", str(tmp_path / "a.png"), "-q"]) == 2
    _one_line_error(capsys, str(bundle / "text_encoder.mnn"), *words)
    assert cli_main(["generate", "--onnx", str(onnx), "a cat", "-o", str(tmp_path / "a.png"), "-q"]) == 2
    _one_line_error(capsys, str(onnx / "text_encoder" / "model.onnx"), *words)
    assert not (tmp_path / "a.png").exists()
    for argv in (["bench", str(bundle), "-q"], ["bench", str(bundle), "--onnx", str(onnx), "-q"],
                 ["verify", str(onnx), str(bundle), "-q"],
                 ["sweep", str(onnx), str(tmp_path / "variants"), "--variants", "fp32", "-q"]):
        assert cli_main(argv) == 2, argv
        _one_line_error(capsys, "text_encoder", *words)
    assert not (tmp_path / "variants").exists()  # refused before the first conversion


def test_the_contract_names_the_vocabulary(vocab):
    _, bundle = vocab
    issues = [i for i in check_contract(bundle) if i.kind == "vocabulary"]
    assert [(i.file, i.blocking) for i in issues] == [("text_encoder.mnn", False)]
    assert "49407" in issues[0].expected and "64 ids" in issues[0].found


# -- the contract as MNN 3.6.1 has it ------------------------------------------------------------


def test_taiyi_bundle_with_only_tokenizer_json_meets_the_contract(tmp_path):
    from builders import make_tiny_pipeline, write_bert_tokenizer_json

    pipeline = make_tiny_pipeline(tmp_path / "pipeline", kind="taiyi", write_tokenizer=write_bert_tokenizer_json)
    assert sorted(p.name for p in (pipeline / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    export(pipeline, tmp_path / "onnx", ExportOptions(components=("text_encoder", "unet")))
    sd2mnn.convert(tmp_path / "onnx", tmp_path / "bundle", components=["text_encoder", "unet"])
    assert not (tmp_path / "bundle" / "vocab.txt").exists()
    assert check_contract(tmp_path / "bundle", ["text_encoder", "unet"]) == []


def test_the_decoder_may_draw_any_size_but_three_channels():
    """The runtime writes whatever the decoder returns (stable_diffusion.cpp:311-314) as RGB."""
    def decoder(sample):
        return tensor_infos({"vae_decoder": (
            [_spec("latent_sample", (1, 4, 64, 64))], [_spec("sample", sample)])})

    assert check_tensors(decoder((1, 3, 768, 640)), SD15) == []
    (issue,) = check_tensors(decoder((1, 4, 512, 512)), SD15)
    assert (issue.file, issue.kind) == ("vae_decoder.mnn", "shape") and "[1,3,?,?]" in issue.expected


def _spec(name, shape):
    from sd2mnn.core.onnx_scan import TensorSpec

    return TensorSpec(name, shape, "float32")


def test_export_refuses_a_size_whose_check_cannot_fit(small, tmp_path):
    """The 2x VAE at 512x512 puts 256x256 latents through the unet's attention: refused, with the
    numbers, before anything is loaded or written."""
    pipeline = small[0].parent / "pipeline"
    with pytest.raises(InputError, match=r"vae: checking the vae_encoder at 512x512 needs about [\d.]+ GiB, 1.0 GiB available"):
        export(pipeline, tmp_path / "onnx", ExportOptions(height=512, width=512, memory_budget=1 << 30))
    with pytest.raises(InputError, match=r"needs about [\d.]+ GiB"):  # far beyond any machine
        export(pipeline, tmp_path / "onnx", ExportOptions(height=4096, width=4096, components=("unet",)))
    assert not (tmp_path / "onnx").exists() and list(tmp_path.iterdir()) == []
