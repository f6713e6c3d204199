"""sd2mnn.families: which family a folder holds is decided in one place, and the bundle records it."""
from __future__ import annotations

import json

import pytest

from bert_tokenizer import write_bert_tokenizer
from sd2mnn import families
from sd2mnn.contract import FORMATS
from sd2mnn.errors import InputError
from sd2mnn.families import SD15, TAIYI
from sd2mnn.layout import COMPONENTS
from sd2mnn.manifest import read_manifest


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
    from sd2mnn.mtok import write_mtok

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
    with pytest.raises(InputError, match="Unigram"):
        families.by_tokenizer_model("Unigram")


def test_the_family_answers_what_the_engines_used_to_branch_on():
    assert families.by_text_length(77) is SD15 and families.by_text_length(512) is TAIYI
    assert families.by_text_length(64) is None
    assert FORMATS == {77: SD15.prompt, 512: TAIYI.prompt}
    assert COMPONENTS is SD15.components and SD15.default_components == ("text_encoder", "unet", "vae_decoder")
    unet = SD15.components["unet"].runtime_tensors(77, 768)
    assert unet["encoder_hidden_states"] == ("float32", [2, 77, 768]) and unet["timestep"] == ("int32", [1])
    assert SD15.components["vae_encoder"].runtime_tensors(77, 768) == {}  # the runtime never loads it
    assert SD15.recipe.scheduler == "plms" and SD15.recipe.guidance == 7.5
