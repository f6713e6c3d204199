"""sd2mnn.families: which family a folder holds is decided in one place, and the bundle records it."""
from __future__ import annotations

import json

import pytest

from bert_tokenizer import write_bert_tokenizer
from sd2mnn import families
from sd2mnn.core.contract import FORMATS
from sd2mnn.errors import InputError
from sd2mnn.families import SD15, TAIYI
from sd2mnn.core.manifest import read_manifest


def test_detect_sd15_from_onnx_folder_tokenizer_and_bundle(demo_onnx, fp32_bundle):
    assert families.detect(demo_onnx) is SD15
    assert families.detect(demo_onnx / "tokenizer") is SD15
    assert families.detect(fp32_bundle) is SD15
    assert families.detect(fp32_bundle / "tokenizer.mtok") is SD15
    assert read_manifest(fp32_bundle / "manifest.json").family == "sd15"


def test_a_manifest_without_a_family_reads_and_detects_from_tokenizer_mtok(bundle_copy):
    path = bundle_copy / "manifest.json"
    data = json.loads(path.read_text())
    del data["family"]
    path.write_text(json.dumps(data))
    assert read_manifest(path).family == ""
    assert families.detect(bundle_copy) is SD15


def test_detect_taiyi_from_bert_tokenizer_mtok_and_diffusers_index(tmp_path):
    from sd2mnn.tokenization.writer import write_mtok

    folder = write_bert_tokenizer(tmp_path / "tokenizer")
    assert families.detect(folder) is TAIYI
    assert families.detect(write_mtok(folder, tmp_path / "tokenizer.mtok", "diffusers")) is TAIYI
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"tokenizer": ["transformers", "BertTokenizer"],
                                                        "text_encoder": ["transformers", "BertModel"]}))
    assert families.detect(model) is TAIYI
    (model / "model_index.json").write_text(json.dumps({"tokenizer": ["transformers", "CLIPTokenizer"]}))
    assert families.detect(model) is SD15


def test_detect_names_the_folder_when_it_cannot_tell(tmp_path):
    with pytest.raises(InputError, match=str(tmp_path)) as err:
        families.detect(tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="does not exist"):
        families.detect(tmp_path / "nowhere")
    with pytest.raises(InputError, match="WordLevel"):
        families.by_tokenizer_model("WordLevel")


def test_the_family_answers_what_the_engines_used_to_branch_on():
    assert FORMATS == {77: SD15.prompt, 512: TAIYI.prompt}
    assert SD15.default_components == ("text_encoder", "unet", "vae_decoder")
    unet = SD15.components["unet"].runtime_tensors(77, 768)
    assert unet["encoder_hidden_states"] == ("float32", [2, 77, 768]) and unet["timestep"] == ("int32", [1])
    assert SD15.components["vae_encoder"].runtime_tensors(77, 768) == {}  # the runtime never loads it
    assert SD15.recipe.scheduler == "plms" and SD15.recipe.guidance == 7.5


def test_detect_sd35_from_diffusers_index_onnx_folder_and_t5_mtok(tmp_path):
    from sd2mnn.families import SD35

    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline",
                                                        "tokenizer": ["transformers", "CLIPTokenizer"]}))
    assert families.detect(model) is SD35
    # An ONNX export or a bundle without a manifest: CLIP's tokenizer/ alone would read as SD1.5.
    onnx = tmp_path / "onnx"
    (onnx / "tokenizer").mkdir(parents=True)
    (onnx / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer"}))
    assert families.detect(onnx) is SD15
    (onnx / "transformer").mkdir()
    assert families.detect(onnx) is SD15  # an empty folder says nothing
    (onnx / "transformer" / "model.onnx").write_bytes(b"")
    assert families.detect(onnx) is SD35
    # T5's Unigram is SD3.5's and Wan's (umT5): a tokenizer alone cannot tell them apart.
    with pytest.raises(InputError, match="a Unigram tokenizer is the tokenizer of sd35 and wan"):
        families.by_tokenizer_model("Unigram")


def test_sd35_family_states_the_runtime_contract():
    from sd2mnn.families import SD35, SD35Dims
    from sd2mnn.schedulers import SCHEDULERS

    assert SD35.default_components == ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder")
    assert SD35.runtime_components == SD35.default_components and SD35.denoiser == "transformer"
    assert SD35.components["text_encoder_3"].runtime_optional
    assert [s.tokenizer for s in SD35.components.values() if s.prompt_ids] == ["tokenizer", "tokenizer_2", "tokenizer_3"]
    formats = SD35.prompt_formats
    assert formats["tokenizer"] is SD15.prompt and formats["tokenizer_2"] is SD15.prompt
    t5 = formats["tokenizer_3"]
    assert (t5.bos_id, t5.eos_id, t5.max_length) == (-1, 1, 256)
    assert SD15.prompt_formats == {"tokenizer": SD15.prompt}
    runtime = {n: s.runtime_tensors(77, None) for n, s in SD35.components.items()}
    assert runtime["text_encoder"]["last_hidden_state"] == ("float32", [2, 77, 768])
    assert runtime["text_encoder_2"]["text_embeds"] == ("float32", [2, 1280])
    assert runtime["text_encoder_3"]["input_ids"] == ("int32", [2, 256])
    assert runtime["transformer"] == {
        "hidden_states": ("float32", [2, 16, 128, 128]), "encoder_hidden_states": ("float32", [2, 333, 4096]),
        "pooled_projections": ("float32", [2, 2048]), "timestep": ("float32", [2]),
        "out_hidden_states": ("float32", [2, 16, 128, 128])}
    assert runtime["vae_decoder"]["latent_sample"] == ("float32", [1, 16, 128, 128])
    recipe = SD35.recipe
    assert recipe.scheduler in SCHEDULERS and recipe.guidance == 5.0
    assert (recipe.latent_scale, recipe.latent_shift, recipe.image_size) == (1 / 1.5305, 0.0609, 1024)
    # A model of other widths gets its own tensors, and says how it departs from the C++.
    tiny = SD35Dims(clip_l=16, clip_l_embeds=16, clip_g=32, clip_g_embeds=32, t5=64, joint=64, pooled=48,
                    latent_height=16, latent_width=16, image_height=128, image_width=128)
    assert SD35.components["transformer"].shapes(tiny)["encoder_hidden_states"] == ("float32", [2, 333, 64])
    assert SD35Dims.from_tensors({n: s.shapes(tiny) for n, s in SD35.components.items()}) == tiny
    assert SD35Dims().off_contract() == [] and "joint 64 (MNN's runtime: 4096)" in tiny.off_contract()


def test_sd35_verify_feeds_are_the_runtimes_inputs_at_the_models_shapes():
    import numpy as np

    from sd2mnn.families import SD35, SD35Dims
    from sd2mnn.schedulers.flow_match import sd35_timesteps

    tiny = SD35Dims(joint=64, pooled=48, latent_height=16, latent_width=16)
    rng = np.random.default_rng(0)
    spec = SD35.components["transformer"]
    tensors = spec.shapes(tiny)
    shape = {n: tensors[n][1] for n in spec.inputs}
    dtype = {n: np.dtype(tensors[n][0]) for n in spec.inputs}
    feeds, what = spec.verify_feeds(shape, dtype, rng, [], None, spec.verify_cases)
    assert [f["timestep"].tolist() for f in feeds] == [[float(t)] * 2 for t in sd35_timesteps(spec.verify_cases)]
    for feed in feeds:
        assert {n: (str(a.dtype), list(a.shape)) for n, a in feed.items()} == {n: tensors[n] for n in spec.inputs}
        assert np.array_equal(feed["hidden_states"][0], feed["hidden_states"][1])  # [latent, latent]
    spec = SD35.components["vae_decoder"]
    (feed,), _ = spec.verify_feeds({"latent_sample": [1, 16, 64, 64]}, {"latent_sample": np.float32}, rng, [], None, 1)
    assert abs(feed["latent_sample"].mean() - 0.0609) < 0.01 and abs(feed["latent_sample"].std() - 1 / 1.5305) < 0.01


def test_detect_reads_the_record_export_writes_before_any_file(tmp_path):
    from sd2mnn.families import SD35

    onnx = tmp_path / "onnx"
    (onnx / "tokenizer").mkdir(parents=True)
    (onnx / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer"}))
    families.write_marker(onnx, SD35)
    assert families.detect(onnx) is SD35  # a CLIP tokenizer/ alone would read as SD1.5
    (onnx / families.FAMILY_MARKER).write_text(json.dumps({"family": "sana"}))
    with pytest.raises(InputError, match=families.FAMILY_MARKER):
        families.detect(onnx)


def test_a_tokenizer_kind_two_families_share_names_both():
    from dataclasses import replace

    with pytest.raises(InputError, match="sd15 and wan") as err:
        families.by_tokenizer_model("BPE", (SD15, TAIYI, replace(SD15, name="wan")), "tokenizer.mtok")
    assert "manifest.json" in str(err.value) and "\n" not in str(err.value)
    assert families.by_tokenizer_model("BPE", (SD15, TAIYI)) is SD15


def test_a_wan_bundle_without_its_manifest_is_told_from_sd35_by_its_tokenizer_folders(tmp_path):
    """T5's Unigram is SD3.5's and Wan's, and so are a transformer and a VAE decoder: the single
    tokenizer.mtok at the top says Wan, where SD3.5 keeps one per tokenizer folder."""
    from t5_tokenizer import write_t5_tokenizer

    from sd2mnn.families import SD35, WAN
    from sd2mnn.tokenization.writer import write_mtok

    tokenizer = write_t5_tokenizer(tmp_path / "t5")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in ("text_encoder", "transformer", "vae_decoder"):
        (bundle / f"{name}.mnn").write_bytes(b"")
    write_mtok(tokenizer, bundle / "tokenizer.mtok")
    assert families.detect(bundle) is WAN
    for folder in ("tokenizer", "tokenizer_2", "tokenizer_3"):  # SD3.5's layout
        (bundle / folder).mkdir()
    (bundle / "tokenizer.mtok").rename(bundle / "tokenizer_3" / "tokenizer.mtok")
    assert families.detect(bundle) is SD35
