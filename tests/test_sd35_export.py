"""sd2mnn export of an SD3 pipeline: a tiny StableDiffusion3Pipeline on disk -> the ONNX folder of
MNN's SD3.5 runtime (diffusion_sd35.cpp), each part checked against PyTorch.

The CLIP outputs are held against diffusers itself: the penultimate hidden state it conditions on,
and the whole conditioning its pipeline builds from the three encoders.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sd2mnn import families
from sd2mnn.errors import InputError
from sd2mnn.families import SD35, SD35Dims

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from sd2mnn.exporting.export import ExportOptions, describe_io, export  # noqa: E402

NO_T5 = ("text_encoder", "text_encoder_2", "transformer", "vae_decoder")


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> Path:
    from builders import make_tiny_sd3_pipeline

    return make_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipeline", seed=0)


@pytest.fixture(scope="module")
def sd3_export(sd3_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sd3_onnx") / "onnx"
    return out, export(sd3_dir, out, ExportOptions())


def _ort(path: Path, feeds: dict, outputs: list[str]) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(outputs, feeds)


def _no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_detects_the_sd3_folder_and_its_export(sd3_dir, sd3_export):
    onnx_dir, report = sd3_export
    assert families.detect(sd3_dir) is SD35
    assert families.detect(onnx_dir) is SD35
    assert report.kind == "sd35"


def test_export_writes_the_runtime_layout_at_the_models_widths(sd3_dir, sd3_export):
    onnx_dir, report = sd3_export
    assert [c.name for c in report.components] == list(SD35.runtime_components)
    dims = SD35Dims.from_configs(sd3_dir)
    assert (dims.clip_l, dims.clip_g, dims.joint, dims.pooled, dims.latent_height) == (16, 32, 64, 48, 16)
    found = {}
    for name, spec in SD35.components.items():
        inputs, outputs = describe_io(onnx_dir / name / "model.onnx")
        assert list(inputs) == list(spec.inputs) and list(outputs) == list(spec.outputs), name
        found[name] = {n: (dtype, list(shape)) for n, (dtype, shape) in {**inputs, **outputs}.items()}
        assert found[name] == spec.shapes(dims), name
    assert found["transformer"]["timestep"] == ("float32", [2])
    assert found["transformer"]["encoder_hidden_states"] == ("float32", [2, 77 + 256, 64])
    assert SD35Dims.from_tensors(found) == dims
    # Over 2 GB at full size: their weights gathered into one external file, as the unet's.
    for name in ("text_encoder_2", "text_encoder_3", "transformer"):
        assert (onnx_dir / name / "weights.pb").is_file(), name
    for folder in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        for file in (sd3_dir / folder).iterdir():
            assert (onnx_dir / folder / file.name).read_bytes() == file.read_bytes()
    for comp in report.components:
        assert comp.max_abs_error and all(0 <= e <= comp.tolerance for e in comp.max_abs_error.values()), comp


def _clip_ids(sd3_dir: Path, folder: str, prompt: str) -> np.ndarray:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(sd3_dir / folder))
    return np.asarray(tokenizer([prompt], padding="max_length", max_length=77, truncation=True).input_ids, np.int32)


@pytest.mark.parametrize("name, folder", [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")])
def test_clip_last_hidden_state_is_the_penultimate_layer_diffusers_conditions_on(sd3_dir, sd3_export, name, folder):
    import torch
    from transformers import CLIPTextModelWithProjection

    onnx_dir, _ = sd3_export
    ids = np.repeat(_clip_ids(sd3_dir, folder, "a photo of a cat"), 2, axis=0)
    hidden, embeds = _ort(onnx_dir / name / "model.onnx", {"input_ids": ids}, ["last_hidden_state", "text_embeds"])
    model = CLIPTextModelWithProjection.from_pretrained(str(sd3_dir / name)).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(ids).long(), output_hidden_states=True)
    penultimate = out.hidden_states[-2].numpy()
    np.testing.assert_allclose(hidden, penultimate, atol=1e-4, rtol=0)
    np.testing.assert_allclose(embeds, out.text_embeds.numpy(), atol=1e-4, rtol=0)
    # The last layer (or its normed output) is far from it: an export of that would fail above.
    for other in (out.hidden_states[-1].numpy(), out.last_hidden_state.numpy()):
        assert np.abs(other - penultimate).max() > 100 * 1e-4


def test_runtime_joins_the_exported_encoders_into_diffusers_conditioning(sd3_dir, sd3_export):
    """The C++'s concatenation (SD35:232-243) of the exported outputs, fed the ids diffusers'
    tokenizers make, is exactly StableDiffusion3Pipeline.encode_prompt's conditioning."""
    import torch
    from diffusers import StableDiffusion3Pipeline
    from transformers import T5TokenizerFast

    onnx_dir, _ = sd3_export
    prompt = "a photo of a cat"
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir))
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, do_classifier_free_guidance=False)
    ids_l = _clip_ids(sd3_dir, "tokenizer", prompt)
    ids_g = _clip_ids(sd3_dir, "tokenizer_2", prompt)
    t5_tok = T5TokenizerFast.from_pretrained(str(sd3_dir / "tokenizer_3"))
    ids_t5 = np.asarray(t5_tok([prompt], padding="max_length", max_length=256, truncation=True).input_ids, np.int32)
    clip_l, pooled_l = _ort(onnx_dir / "text_encoder" / "model.onnx", {"input_ids": np.repeat(ids_l, 2, 0)},
                            ["last_hidden_state", "text_embeds"])
    clip_g, pooled_g = _ort(onnx_dir / "text_encoder_2" / "model.onnx", {"input_ids": np.repeat(ids_g, 2, 0)},
                            ["last_hidden_state", "text_embeds"])
    (t5,) = _ort(onnx_dir / "text_encoder_3" / "model.onnx", {"input_ids": np.repeat(ids_t5, 2, 0)},
                 ["last_hidden_state"])
    clip = np.concatenate([clip_l, clip_g], -1)
    clip = np.concatenate([clip, np.zeros((2, 77, t5.shape[-1] - clip.shape[-1]), np.float32)], -1)
    joined = np.concatenate([clip, t5], 1)
    np.testing.assert_allclose(joined[1:], embeds.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.concatenate([pooled_l, pooled_g], -1)[1:], pooled.numpy(), atol=1e-4, rtol=0)


def test_t5_can_be_left_out(sd3_dir, tmp_path):
    out = tmp_path / "onnx"
    report = export(sd3_dir, out, ExportOptions(components=NO_T5))
    assert [c.name for c in report.components] == list(NO_T5)
    # MNN's runtime loads tokenizer_3 with or without T5 (SD35:106-109): it is exported all the same.
    assert sorted(p.name for p in out.iterdir()) == sorted([*NO_T5, ".sd2mnn-references", "sd2mnn_family.json", "tokenizer",
                                                             "tokenizer_2", "tokenizer_3"])
    _no_leftovers(tmp_path)


def test_a_pipeline_saved_without_t5_exports_without_it_but_needs_its_tokenizer(tmp_path):
    from builders import make_tiny_sd3_pipeline

    pipeline = make_tiny_sd3_pipeline(tmp_path / "pipeline", seed=1, with_t5=False)
    with pytest.raises(InputError, match=r"tokenizer_3: missing; MNN's SD3.5 runtime loads it even without T5") as err:
        export(pipeline, tmp_path / "onnx", ExportOptions())
    assert "\n" not in str(err.value)
    from t5_tokenizer import write_t5_tokenizer

    write_t5_tokenizer(pipeline / "tokenizer_3")
    with pytest.raises(InputError, match=r"model_index.json: no .text_encoder_3. component; leave it out of --components"):
        export(pipeline, tmp_path / "onnx", ExportOptions(components=("text_encoder_3",)))
    events = []
    report = export(pipeline, tmp_path / "onnx", ExportOptions(), progress=lambda c, m: events.append((c, m)))
    assert [c.name for c in report.components] == list(NO_T5)
    assert ("text_encoder_3", "not in the pipeline: left out (MNN's runtime conditions on zeros without it)") in events
    assert (tmp_path / "onnx" / "tokenizer_3" / "tokenizer.json").is_file()
    _no_leftovers(tmp_path)


def test_sd1_components_are_refused_for_an_sd3_pipeline(sd3_dir, tmp_path):
    with pytest.raises(InputError, match=r"--components unet: not part of a Stable Diffusion 3 pipeline .*transformer"):
        export(sd3_dir, tmp_path / "onnx", ExportOptions(components=("unet", "text_encoder")))
    assert list(tmp_path.iterdir()) == []


def test_text_encoders_of_another_model_are_refused(sd3_dir, tmp_path):
    broken = tmp_path / "pipeline"
    shutil.copytree(sd3_dir, broken)
    config_path = broken / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["pooled_projection_dim"] = 40
    config_path.write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"transformer/config.json: pooled_projection_dim 40 is not .* 16 \+ 32"):
        export(broken, tmp_path / "onnx", ExportOptions(components=("transformer",)))
    assert not (tmp_path / "onnx").exists()
    _no_leftovers(tmp_path)


def test_a_transformer_without_its_config_is_one_line_from_the_cli(sd3_dir, tmp_path):
    broken = tmp_path / "pipeline"
    shutil.copytree(sd3_dir, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    (broken / "transformer" / "config.json").unlink()
    out = tmp_path / "onnx"
    proc = subprocess.run([sys.executable, "-m", "sd2mnn.cli", "export", str(broken), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines == [f"error: {broken / 'transformer' / 'config.json'}: missing; re-download the model"], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    _no_leftovers(tmp_path)


# -- single-file checkpoints (Stability's layout) with a local --config folder ----------------------


@pytest.fixture(scope="module")
def sd3_single_file(sd3_dir, tmp_path_factory):
    """(checkpoint with every model, checkpoint with the MMDiT and VAE only, config folder without weights)."""
    from builders import make_config_folder, save_sd3_single_file

    root = tmp_path_factory.mktemp("sd3_single")
    everything = save_sd3_single_file(sd3_dir, root / "sd3_medium_incl_clips_t5xxl.safetensors")
    dit = save_sd3_single_file(sd3_dir, root / "sd3.5_medium.safetensors", models=("transformer", "vae"))
    return everything, dit, make_config_folder(sd3_dir, root / "config")


def _same_files(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir()), (a, b)
    for path in a.iterdir():
        assert path.read_bytes() == (b / path.name).read_bytes(), path


def test_a_single_file_exports_the_models_diffusers_loads_from_it(sd3_dir, sd3_export, sd3_single_file, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    ckpt, _, config = sd3_single_file
    events = []
    report = export(ckpt, tmp_path / "onnx", ExportOptions(config=config), progress=lambda c, m: events.append((c, m)))
    onnx_dir = tmp_path / "onnx"
    assert report.kind == "sd35" and [c.name for c in report.components] == list(SD35.components)
    assert ("text_encoder_3", "21 tensors from sd3_medium_incl_clips_t5xxl.safetensors") in events
    # The same weights as the diffusers folder the file was written from give the same ONNX bytes.
    for name in ("transformer", "vae_decoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                 "tokenizer_3"):
        _same_files(onnx_dir / name, sd3_export[0] / name)
    # CLIP-L: diffusers gives an SD3 file's CLIP-L the identity projection; the export follows it.
    pipe = StableDiffusion3Pipeline.from_single_file(str(ckpt), config=str(config), local_files_only=True,
                                                     text_encoder_3=None, tokenizer_3=None)
    ids = np.concatenate([_clip_ids(sd3_dir, "tokenizer", p) for p in ("", "a photo of a cat")])  # the runtime's pair
    import torch

    with torch.no_grad():
        want = pipe.text_encoder(torch.from_numpy(ids).long(), output_hidden_states=True)
    embeds, hidden = _ort(onnx_dir / "text_encoder" / "model.onnx", {"input_ids": ids},
                          ["text_embeds", "last_hidden_state"])
    np.testing.assert_allclose(embeds, want.text_embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(hidden, want.hidden_states[-2].numpy(), atol=1e-5)
    assert torch.equal(pipe.text_encoder.text_projection.weight, torch.eye(embeds.shape[-1]))
    _no_leftovers(tmp_path)


def test_models_a_single_file_lacks_come_from_the_config_folder(sd3_dir, sd3_export, sd3_single_file, tmp_path):
    from conftest import tree_state

    _, dit, _ = sd3_single_file
    config_before = tree_state(sd3_dir)
    events = []
    export(dit, tmp_path / "onnx", ExportOptions(config=sd3_dir, components=("text_encoder", "transformer")),
           progress=lambda c, m: events.append((c, m)))
    assert ("text_encoder", f"not in sd3.5_medium.safetensors: from {sd3_dir / 'text_encoder'}") in events
    for name in ("text_encoder", "transformer"):
        _same_files(tmp_path / "onnx" / name, sd3_export[0] / name)
    assert tree_state(sd3_dir) == config_before  # its weights were read in place, not moved or changed
    _no_leftovers(tmp_path)


def test_without_t5_in_the_file_or_the_config_the_export_leaves_it_out(sd3_dir, sd3_single_file, tmp_path):
    from builders import save_sd3_single_file

    _, _, config = sd3_single_file
    ckpt = save_sd3_single_file(sd3_dir, tmp_path / "sd3_medium_incl_clips.safetensors",
                                models=("transformer", "vae", "text_encoder", "text_encoder_2"))
    with pytest.raises(InputError, match=r"sd3_medium_incl_clips.safetensors: no text_encoder_3 weights "
                                         r"\(text_encoders.t5xxl.transformer.\*\) and .*config/text_encoder_3 has "
                                         r"none; leave text_encoder_3 out of --components"):
        export(ckpt, tmp_path / "onnx", ExportOptions(config=config, components=("text_encoder_3",)))
    assert not (tmp_path / "onnx").exists()
    events = []
    report = export(ckpt, tmp_path / "onnx", ExportOptions(config=config), progress=lambda c, m: events.append((c, m)))
    assert [c.name for c in report.components] == list(NO_T5)
    assert (tmp_path / "onnx" / "tokenizer_3").is_dir() and not (tmp_path / "onnx" / "text_encoder_3").exists()
    assert any(c == "text_encoder_3" and "left out" in m for c, m in events), events
    _no_leftovers(tmp_path)


def test_a_single_file_without_the_text_encoders_and_a_config_without_weights_is_one_line(sd3_single_file, tmp_path):
    _, dit, config = sd3_single_file
    out = tmp_path / "onnx"
    proc = subprocess.run([sys.executable, "-m", "sd2mnn.cli", "export", str(dit), str(out), "--config", str(config)],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {dit}: no text_encoder weights (text_encoders.clip_l.transformer.*) and {config / 'text_encoder'} "
        "has none; use a checkpoint that includes it or a --config folder with text_encoder's weights"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    events = []  # settled before reading anything: the transformer is not read for nothing
    with pytest.raises(InputError, match="no text_encoder weights"):
        export(dit, out, ExportOptions(config=config), progress=lambda c, m: events.append((c, m)))
    assert not [e for e in events if "tensors from" in e[1]], events
    _no_leftovers(tmp_path)


def test_reading_a_model_of_a_single_file_that_cannot_fit_is_refused_before_reading(sd3_single_file, tmp_path):
    ckpt, _, config = sd3_single_file
    with pytest.raises(InputError, match=r"sd3_medium_incl_clips_t5xxl.safetensors: reading its text_encoder_2 needs "
                                         r"about 1.3 GiB, 1.0 GiB available; free memory, or export the model's "
                                         r"diffusers folder"):
        export(ckpt, tmp_path / "onnx", ExportOptions(config=config, memory_budget=2**30))
    assert not (tmp_path / "onnx").exists()
    _no_leftovers(tmp_path)


def test_a_checkpoint_of_the_other_family_is_refused_before_loading(sd3_dir, sd3_single_file, tmp_path):
    from builders import make_config_folder, make_tiny_pipeline, save_single_file

    ckpt, _, config = sd3_single_file
    sd15 = make_tiny_pipeline(tmp_path / "sd15")
    sd15_ckpt = save_single_file(sd15, tmp_path / "v1-5.safetensors")
    with pytest.raises(InputError, match=r"v1-5.safetensors: not a Stable Diffusion 3 checkpoint \(no "
                                         r"model.diffusion_model.joint_blocks.\* tensors"):
        export(sd15_ckpt, tmp_path / "a", ExportOptions(config=config))
    with pytest.raises(InputError, match=r"sd3_medium_incl_clips_t5xxl.safetensors: not a Stable Diffusion 1.x "
                                         r"checkpoint \(no model.diffusion_model.input_blocks"):
        export(ckpt, tmp_path / "b", ExportOptions(config=make_config_folder(sd15, tmp_path / "sd15_config")))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    _no_leftovers(tmp_path)


def test_an_onnx_dir_that_is_or_holds_what_export_reads_is_refused_even_with_overwrite(sd3_dir, sd3_single_file,
                                                                                      tmp_path):
    from conftest import tree_state

    model = shutil.copytree(sd3_dir, tmp_path / "sd35")
    ckpt, _, config = sd3_single_file
    inside = Path(shutil.copy2(ckpt, model / ckpt.name))
    before = tree_state(model)
    # (MODEL, ONNX_DIR, --config): the pipeline itself, a folder above it, the folder of the file,
    # the config folder.
    for source, out, cfg in [(model, model, None), (model, tmp_path, None), (inside, model, config),
                             (ckpt, model, model)]:
        with pytest.raises(InputError, match=f"{out}: holds .*, which export reads; choose another ONNX_DIR"):
            export(source, out, ExportOptions(overwrite=True, config=cfg))
    assert tree_state(model) == before
    _no_leftovers(tmp_path)


def test_a_full_disk_is_one_line_and_leaves_nothing(sd3_dir, tmp_path):
    from conftest import on_full_disk

    done, left = on_full_disk(tmp_path, sd3_dir / "model_index.json", lambda disk: [
        "export", sd3_dir, disk / "onnx", "--components", "text_encoder"])
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'disk' / 'onnx'} ran out of disk "
                                                           "space ("), done.stderr
    assert sorted(left) == ["fill", "out.png"]  # no ONNX_DIR, no scratch folder


def test_a_transformer_check_that_cannot_fit_is_refused_before_loading(sd3_dir, tmp_path):
    from sd2mnn.exporting.export import check_bytes, weights_bytes

    # Its joint attention spans the latent patches and the 77 + 256 text tokens together: the
    # estimate grows with the image, as the score matrices do (tokens squared).
    small, large = (check_bytes(sd3_dir, "transformer", size, size, 333, SD35) for size in (128, 512))
    patches = (512 // 16) ** 2 + 333, (128 // 16) ** 2 + 333
    assert large - small >= 2 * 2 * 2 * (patches[0] ** 2 - patches[1] ** 2) * 4
    budget = 2 * weights_bytes(sd3_dir, "transformer", SD35)  # its weights fit: the size is what does not
    with pytest.raises(InputError, match=r"transformer: checking the transformer at 128x128 needs about .* GiB available"):
        export(sd3_dir, tmp_path / "onnx", ExportOptions(components=("transformer",), memory_budget=budget))
    assert list(tmp_path.iterdir()) == []


def test_tensors_torch_wrote_one_file_each_end_in_one_weights_file_and_still_convert(sd3_export, tmp_path):
    """Over 2 GiB of initializers (SD3.5 Medium's transformer), torch's exporter writes every tensor of
    more than 1024 elements to a file of its own, node attributes included: the Constant ones and
    zeros of each LayerNorm without affine weights, 192 files such as
    _model_norm_out_norm_Constant_attr__value beside weights.pb. The tiny transformer, far below that
    switch, is written so by onnx's own writer (one file per tensor, Constant values too); export's
    save step then leaves model.onnx and weights.pb only, and the model runs, converts and verifies."""
    import onnx

    import sd2mnn
    from sd2mnn.exporting.export import consolidate_external_data
    from sd2mnn.verification.verify import verify

    onnx_dir, _ = sd3_export
    copy = tmp_path / "onnx"
    shutil.copytree(onnx_dir, copy)
    folder = copy / "transformer"
    path = folder / "model.onnx"
    model = onnx.load(str(path))
    (folder / "weights.pb").unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0,
                    convert_attribute=True)
    written = onnx.load(str(path), load_external_data=False)
    constants = [a.t for n in written.graph.node if n.op_type == "Constant" for a in n.attribute if a.HasField("t")]
    assert sum(t.data_location == onnx.TensorProto.EXTERNAL for t in constants) >= 10
    assert len(list(folder.iterdir())) > len(constants)

    consolidate_external_data(path, "weights.pb")
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "weights.pb"]
    saved = onnx.load(str(path), load_external_data=False)
    external = [t for t in saved.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(t.external_data[0].value == "weights.pb" for t in external)
    assert not [a for n in saved.graph.node for a in n.attribute
                if a.HasField("t") and a.t.data_location == onnx.TensorProto.EXTERNAL]
    names = [o.name for o in saved.graph.output]
    feeds = {i.name: np.random.default_rng(0).standard_normal(
        [d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32) for i in saved.graph.input}
    np.testing.assert_array_equal(_ort(path, feeds, names)[0], _ort(onnx_dir / "transformer" / "model.onnx", feeds, names)[0])

    bundle = tmp_path / "bundle"
    sd2mnn.convert(copy, bundle, components=["transformer"])
    (result,) = verify(copy, bundle, components="transformer").components
    # MNN against ONNX Runtime; the contract flags only the tiny widths, off the runtime's.
    assert result.name == "transformer" and result.error is None and result.outputs
    assert not [f for o in result.outputs for f in o.failures(result.thresholds)], result.to_dict()
