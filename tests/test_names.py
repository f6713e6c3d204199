"""One name per setting: the tokenizer scheme from the command line to the manifest (its former
spellings still taken), and the C++ demos' memory_mode read by each family's recipe as the setting
it is in that runtime: SD1.x's Winograd level, SD3.5's model lifetime."""
from __future__ import annotations

import json

import pytest

import sd2mnn
from sd2mnn.cli import build_parser, main
from sd2mnn.families import SD15, SD35
from sd2mnn.generation.pipeline import Pipeline, mnn_runtime_config
from sd2mnn.recipes import KEEP_ALL, ModelLifetime, steps_for


def _scheme(bundle) -> str:
    return json.loads((bundle / "manifest.json").read_text())["tokenizer_scheme"]


@pytest.mark.parametrize("flag", ["--tokenizer-scheme", "--tokenizer"])
def test_convert_takes_the_tokenizer_scheme_under_both_spellings(demo_onnx, tmp_path, flag):
    bundle = tmp_path / "bundle"
    assert main(["convert", str(demo_onnx), str(bundle), "--components", "text_encoder", flag, "mnn", "-q"]) == 0
    assert _scheme(bundle) == "mnn"


def test_the_python_api_keeps_the_former_keyword(demo_onnx, tmp_path):
    sd2mnn.convert(demo_onnx, tmp_path / "bundle", components=["text_encoder"], tokenizer="mnn")
    assert _scheme(tmp_path / "bundle") == "mnn"


def test_convert_help_shows_only_the_new_spelling(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "--help"])
    shown = capsys.readouterr().out
    assert "--tokenizer-scheme" in shown and "--tokenizer " not in shown


def test_generate_keeps_whose_ids_apart_from_the_scheme():
    args = build_parser().parse_args(["generate", "b/", "p", "-o", "x.png", "--tokenizer", "hf", "--tokenizer-scheme", "mnn"])
    assert (args.tokenizer, args.tokenizer_scheme) == ("hf", "mnn")


def test_each_recipe_reads_the_memory_mode_as_its_own_setting():
    for mode in (0, 1, 2):
        sd15 = mnn_runtime_config(memory_mode=mode, family=SD15)
        assert sd15.winograd == (mode != 0) and ((3, 1) in sd15.hints) == (mode == 2)  # the Winograd level
        assert steps_for(SD15).model_lifetime(mode) == KEEP_ALL
        assert steps_for(SD35).model_lifetime(mode) == ModelLifetime(at_start=False, release_after_use=mode != 1)
        assert mnn_runtime_config(memory_mode=mode, family=SD35) == mnn_runtime_config(family=SD35)


def test_a_pipeline_without_a_config_takes_its_winograd_level_from_the_memory_mode(fp32_bundle):
    # As generate --memory-mode N: mode 0 turns Winograd off on SD1.x, mode 2 sets memory level 1.
    assert not Pipeline(fp32_bundle, memory_mode=0).config.winograd
    assert (3, 1) in Pipeline(fp32_bundle, memory_mode=2).config.hints
    assert Pipeline(fp32_bundle).config.winograd
