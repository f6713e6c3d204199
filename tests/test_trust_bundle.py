"""A hostile ONNX folder, tokenizer folder or bundle, through real conversions and real processes:
one `error:` line that names the file and the fix, a non-zero exit, and nothing read, lost or
written outside the folders the user named."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import tree_state
from onnx import TensorProto, helper
from test_cli_errors import PROMPT, assert_clean_error, sd2mnn

from sd2mnn import families
from sd2mnn.core.images import read_image
from sd2mnn.core.manifest import FileRecord

SECRET = "the user's own file, outside every folder sd2mnn was given\n"


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_text(SECRET)
    return path


def assert_untouched(secret: Path) -> None:
    assert secret.read_text() == SECRET


def convert(onnx_dir: Path, out: Path, *flags) -> object:
    return sd2mnn("convert", onnx_dir, out, *flags)


# -- a pending record naming paths outside the bundle ----------------------------------------


def plant_pending(bundle: Path, reference: Path, name: str, outside: str) -> Path:
    """A pending component that matches the sources, flags and converter of ``reference``'s, and
    names one more output, ``outside`` (relative to its folder)."""
    record = json.loads((reference / "manifest.json").read_text())["components"][name]
    folder = bundle / ".sd2mnn" / "pending" / name
    folder.mkdir(parents=True)
    for output in record["outputs"]:
        shutil.copy2(reference / output["path"], folder / output["path"])
    shutil.copy2(reference / "logs" / f"{name}.log", folder / f"{name}.log")
    planted = folder / outside
    planted.write_text("planted by the bundle\n")
    record["outputs"].append(asdict(FileRecord.of(planted, planted.parent)) | {"path": outside})
    (folder / "record.json").write_text(json.dumps(record))
    return folder


def test_a_pending_record_naming_a_path_outside_the_bundle_is_discarded(fp32_bundle, demo_onnx, tmp_path, secret):
    out = tmp_path / "bundle"
    # Its extra output is read from pending/ and would be written to the bundle's parent, over the
    # user's file.
    plant_pending(out, fp32_bundle, "vae_decoder", "../secret.txt")
    done = convert(demo_onnx, out, "--components", "vae_decoder")
    assert done.returncode == 0, done.stderr
    assert_untouched(secret)
    assert json.loads((out / "manifest.json").read_text())["components"]["vae_decoder"]["outputs"][0]["path"] \
        == "vae_decoder.mnn"
    assert not (out / ".sd2mnn").exists()


def test_a_pending_record_of_other_outputs_is_not_resumed(fp32_bundle, demo_onnx, tmp_path):
    out = tmp_path / "bundle"
    plant_pending(out, fp32_bundle, "vae_decoder", "extra.bin")  # inside, but not the component's
    report = json.loads(convert(demo_onnx, out, "--components", "vae_decoder", "--json").stdout)
    assert [c["status"] for c in report["components"]] == ["converted"]
    assert not (out / "extra.bin").exists()


# -- manifest.json naming paths outside the bundle ---------------------------------------------


@pytest.mark.parametrize("path", ["/etc/passwd", "../secret.txt"])
def test_a_manifest_path_outside_the_bundle_is_refused_without_a_word_about_it(bundle_copy, demo_onnx, tmp_path,
                                                                             secret, path):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["tokenizer"][0]["path"] = path
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    before = tree_state(bundle_copy)
    outside = Path(path) if path.startswith("/") else secret
    for done in (sd2mnn("generate", bundle_copy, PROMPT, "-o", tmp_path / "x.png", "--steps", 1),
                 sd2mnn("bench", bundle_copy, "--runs", 1),
                 convert(demo_onnx, bundle_copy, "--components", "vae_decoder")):
        assert_clean_error(done, f"{bundle_copy / 'manifest.json'} lists it: delete manifest.json and reconvert")
        assert f"{outside.stat().st_size} bytes" not in done.stderr
    assert not (tmp_path / "x.png").exists()
    assert tree_state(bundle_copy) == before
    assert_untouched(secret)


# -- external data on node attributes ----------------------------------------------------------


def external_tensor(location: str) -> TensorProto:
    tensor = TensorProto(name="stolen", data_type=TensorProto.UINT8, dims=[len(SECRET)])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(SECRET)))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def add_node(model_path: Path, node) -> None:
    model = onnx.load(str(model_path), load_external_data=False)
    model.graph.node.append(node)
    onnx.save(model, str(model_path))


def constant_node(location: str):
    return helper.make_node("Constant", [], ["stolen_out"], value=external_tensor(location))


def node_in_a_subgraph(location: str):
    branch = helper.make_graph([constant_node(location)], "branch", [],
                               [helper.make_tensor_value_info("stolen_out", TensorProto.UINT8, [len(SECRET)])])
    return helper.make_node("If", ["cond"], ["if_out"], then_branch=branch, else_branch=branch)


@pytest.mark.parametrize("make_node", [constant_node, node_in_a_subgraph])
def test_external_data_on_a_node_attribute_outside_the_folder_is_refused(onnx_copy, tmp_path, secret, make_node):
    add_node(onnx_copy / "vae_decoder" / "model.onnx", make_node("../../secret.txt"))
    done = convert(onnx_copy, tmp_path / "b", "--components", "vae_decoder")
    assert_clean_error(done, "'../../secret.txt' leads outside")
    assert "vae_decoder/model.onnx names it as external data: re-export the model" in done.stderr
    assert not (tmp_path / "b").exists()


def test_external_data_on_a_node_attribute_is_checked_like_an_initializer(onnx_copy, tmp_path):
    (onnx_copy / "vae_decoder" / "short.bin").write_bytes(b"abc")
    add_node(onnx_copy / "vae_decoder" / "model.onnx", constant_node("short.bin"))
    done = convert(onnx_copy, tmp_path / "b", "--components", "vae_decoder")
    assert_clean_error(done, "short.bin is too short for tensor 'stolen'")
    assert not (tmp_path / "b").exists()


# -- links in tokenizer folders ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["added_tokens.json", "vocab.json", "tokenizer.mtok"])
def test_a_tokenizer_file_linked_outside_its_folder_is_refused(onnx_copy, tmp_path, secret, name):
    link = onnx_copy / "tokenizer" / name
    link.unlink(missing_ok=True)
    link.symlink_to(secret)
    done = convert(onnx_copy, tmp_path / "b", "--components", "vae_decoder")
    assert_clean_error(done, f"{link} is a link that leaves {onnx_copy / 'tokenizer'}; replace the link with the file")
    assert not (tmp_path / "b").exists()
    # generate on ONNX Runtime reads the same folder, by the same rule.
    done = sd2mnn("generate", "--onnx", onnx_copy, PROMPT, "-o", tmp_path / "x.png", "--steps", 1)
    assert_clean_error(done, f"{link} is a link that leaves")
    assert not (tmp_path / "x.png").exists()
    assert_untouched(secret)


def test_a_tokenizer_folder_linked_outside_the_onnx_folder_is_refused(onnx_copy, tmp_path):
    shutil.move(onnx_copy / "tokenizer", tmp_path / "elsewhere")
    (onnx_copy / "tokenizer").symlink_to(tmp_path / "elsewhere")
    done = convert(onnx_copy, tmp_path / "b", "--components", "vae_decoder")
    assert_clean_error(done, f"{onnx_copy / 'tokenizer'} is a link that leaves {onnx_copy}")
    assert not (tmp_path / "b").exists()


def test_a_link_inside_the_tokenizer_folder_is_taken(onnx_copy, tmp_path):
    folder = onnx_copy / "tokenizer"
    shutil.move(folder / "vocab.json", folder / "vocab.real.json")
    (folder / "vocab.json").symlink_to("vocab.real.json")
    done = convert(onnx_copy, tmp_path / "b", "--components", "vae_decoder")
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "b" / "vocab.json").is_symlink()


# -- tokenizer files named like the bundle's own -----------------------------------------------


@pytest.mark.parametrize("name", ["unet.mnn", "text_encoder.mnn.weight", "manifest.json", "logs", ".sd2mnn",
                                  "transformer.mnn"])
def test_a_tokenizer_file_named_like_a_bundle_file_is_refused(bundle_copy, onnx_copy, tmp_path, name):
    planted = onnx_copy / "tokenizer" / name
    planted.write_text("not a model\n")
    before = tree_state(bundle_copy)
    for out in (bundle_copy, tmp_path / "new"):
        done = convert(onnx_copy, out, "--components", "vae_decoder", "--force")
        assert_clean_error(done, f"{planted} has the name of the bundle's own {name}, which it would replace; "
                                 f"remove it from {onnx_copy / 'tokenizer'}")
    assert tree_state(bundle_copy) == before
    assert not (tmp_path / "new").exists()


# -- bundle files changed after the conversion -------------------------------------------------


def test_a_weight_file_of_other_bytes_and_the_same_size_is_refused(bundle_copy, tmp_path):
    weight = bundle_copy / "unet.mnn.weight"
    weight.write_bytes(np.random.default_rng(0).bytes(weight.stat().st_size))
    for done in (sd2mnn("generate", bundle_copy, PROMPT, "-o", tmp_path / "x.png", "--steps", 1),
                 sd2mnn("bench", bundle_copy, "--runs", 1, "--components", "unet")):
        assert_clean_error(done, f"{weight} is damaged: content changed (sha256 differs from manifest.json's")
        assert "reconvert the bundle" in done.stderr
    assert not (tmp_path / "x.png").exists()


def test_a_copied_bundle_with_new_mtimes_and_the_same_content_is_taken(bundle_copy, tmp_path):
    for path in bundle_copy.rglob("*"):
        os.utime(path, ns=(0, 10**18))
    done = sd2mnn("generate", bundle_copy, PROMPT, "-o", tmp_path / "x.png", "--steps", 1)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "x.png").is_file()


def test_a_model_file_linked_outside_the_bundle_is_refused(bundle_copy, demo_onnx, tmp_path):
    weight = bundle_copy / "vae_decoder.mnn.weight"
    shutil.move(weight, tmp_path / "outside.weight")
    weight.symlink_to(tmp_path / "outside.weight")
    for done in (sd2mnn("generate", bundle_copy, PROMPT, "-o", tmp_path / "x.png", "--steps", 1),
                 sd2mnn("bench", bundle_copy, "--runs", 1),
                 sd2mnn("verify", demo_onnx, bundle_copy)):
        assert_clean_error(done, f"{weight} is a link that leaves {bundle_copy}")
    assert not (tmp_path / "x.png").exists()


# -- links in the bundle that a conversion would write through ---------------------------------


@pytest.mark.parametrize("entry", ["logs", ".sd2mnn"])
def test_a_bundle_folder_linked_outside_is_not_written_through(bundle_copy, demo_onnx, tmp_path, entry):
    outside = tmp_path / "outside"
    if (bundle_copy / entry).exists():
        shutil.move(bundle_copy / entry, outside)
    else:
        outside.mkdir()
    (outside / "keep.txt").write_text("keep\n")
    (bundle_copy / entry).symlink_to(outside)
    before = tree_state(outside)
    done = convert(demo_onnx, bundle_copy, "--components", "vae_decoder", "--force")
    assert_clean_error(done, f"is a link that leaves {bundle_copy}")
    assert tree_state(outside) == before


# -- family detection rests on files -----------------------------------------------------------


def test_an_empty_transformer_folder_leaves_an_sd15_folder_sd15(onnx_copy, tmp_path):
    (onnx_copy / "transformer").mkdir()
    (onnx_copy / "text_encoder_3").mkdir()
    assert families.detect(onnx_copy) is families.SD15
    done = convert(onnx_copy, tmp_path / "b", "--components", "vae_decoder")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["family"] == "sd15"


# -- SD3.5: a T5 the manifest lists -------------------------------------------------------------


def test_an_sd35_bundle_whose_listed_t5_is_gone_is_refused(tiny_sd3_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sd3_bundle, bundle)
    for name in ("text_encoder_3.mnn", "text_encoder_3.mnn.weight"):
        (bundle / name).unlink()
    done = sd2mnn("generate", bundle, PROMPT, "-o", tmp_path / "x.png", "--steps", 1)
    assert_clean_error(done, f"{bundle / 'text_encoder_3.mnn'} is missing, but {bundle / 'manifest.json'} lists "
                             f"text_encoder_3; copy the file back, or reconvert it")
    assert not (tmp_path / "x.png").exists()


def test_an_sd35_bundle_converted_without_t5_still_draws(tiny_sd3_onnx, tmp_path):
    bundle = tmp_path / "bundle"
    done = convert(tiny_sd3_onnx, bundle, "--components", "text_encoder,text_encoder_2,transformer,vae_decoder")
    assert done.returncode == 0, done.stderr
    done = sd2mnn("generate", bundle, PROMPT, "-o", tmp_path / "x.png", "--steps", 1)
    assert done.returncode == 0, done.stderr
    _, meta = read_image(tmp_path / "x.png")
    assert "text_encoder_3.mnn: conditioned on zeros" in meta["notes"]
