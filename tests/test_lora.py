"""--lora: LoRAs fused into the weights at export, read and fused by diffusers' own loaders.

LoRAs are made with PEFT on the tiny pipelines (tests/loras.py): diffusers/PEFT files as diffusers'
save_lora_weights writes them, and an SD1.5 one rewritten with kohya's keys as sd-scripts writes
them. The merged export's parts equal diffusers' pipeline with the same LoRAs loaded and fused; its
image moves from the base pipeline's; SD3.5's draws diffusers' StableDiffusion3Pipeline's image
with the LoRA. Bad LoRAs are refused in one line before anything is written.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from loras import make_sd3_lora, make_sd15_lora, make_wan_lora, to_kohya  # noqa: E402

from conftest import assert_export_refuses  # noqa: E402
from sd2mnn.cli import main  # noqa: E402
from sd2mnn.core.images import psnr  # noqa: E402
from sd2mnn.core.manifest import sha256_file  # noqa: E402
from sd2mnn.exporting.export import ExportOptions, check_onnx, export  # noqa: E402
from sd2mnn.exporting.lora import Lora  # noqa: E402
from sd2mnn.generation.noise import initial_noise  # noqa: E402
from sd2mnn.generation.pipeline import GenerationParams, Pipeline  # noqa: E402

PROMPT = "a photo of a cat"
PARTS = "text_encoder,unet,vae_decoder"
KOHYA_SCALE, PEFT_SCALE = 0.8, 0.5


@pytest.fixture(scope="module")
def sd15(tmp_path_factory) -> Path:
    from builders import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("lora-sd15") / "diffusers", seed=0)


@pytest.fixture(scope="module")
def sd15_loras(sd15) -> dict[str, Path]:
    """A PEFT LoRA (attention layers, CLIP q/v, alpha 2x the rank) and a kohya one (every layer
    sd-scripts targets, float16), both with seeded non-zero weights."""
    root = sd15.parent / "loras"
    kohya_source = make_sd15_lora(sd15, root / "kohya-source.safetensors", seed=3, kohya_targets=True)
    return {"peft": make_sd15_lora(sd15, root / "style.safetensors", seed=1),
            "kohya": to_kohya(kohya_source, root / "kohya_style.safetensors"),
            "kohya_source": kohya_source}


@pytest.fixture(scope="module")
def merged(sd15, sd15_loras):
    """The one-command convert with both LoRAs (kohya at 0.8, PEFT at 0.5), its export kept."""
    onnx, bundle = sd15.parent / "merged-onnx", sd15.parent / "merged-bundle"
    rc = main(["convert", str(sd15), str(bundle), "--keep-onnx", str(onnx), "--quiet",
               "--lora", f"{sd15_loras['kohya']}:{KOHYA_SCALE}", "--lora", f"{sd15_loras['peft']}:{PEFT_SCALE}"])
    assert rc == 0
    return onnx, bundle


@pytest.fixture(scope="module")
def base_onnx(sd15):
    out = sd15.parent / "base-onnx"
    export(sd15, out, ExportOptions(components=tuple(PARTS.split(","))))
    return out


def _diffusers_with_loras(sd15, loras: list[tuple[Path, float]]):
    """diffusers' own recipe: the pipeline, each LoRA loaded as an adapter, weighted, fused."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(sd15), torch_dtype=torch.float32)
    names = []
    for index, (path, _) in enumerate(loras):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"l{index}")
        names.append(f"l{index}")
    pipe.set_adapters(names, [scale for _, scale in loras])
    pipe.fuse_lora(components=["unet", "text_encoder"])
    pipe.unload_lora_weights()
    return pipe


def test_kohya_file_loads_back_in_diffusers_as_its_peft_original(sd15, sd15_loras):
    """The kohya rewrite is what sd-scripts writes: diffusers reads it to the weights of the PEFT
    LoRA it came from (float16 rounding apart), and they move the model."""
    import torch
    from diffusers import StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(str(sd15), torch_dtype=torch.float32)
    kohya = _diffusers_with_loras(sd15, [(sd15_loras["kohya"], 1.0)])
    peft = _diffusers_with_loras(sd15, [(sd15_loras["kohya_source"], 1.0)])
    for part in ("unet", "text_encoder"):
        ref, got, old = (getattr(p, part).state_dict() for p in (peft, kohya, base))
        moved = max(float((ref[k] - old[k]).abs().max()) for k in ref)
        differ = max(float((ref[k] - got[k]).abs().max()) for k in ref)
        assert moved > 0.5 and differ < 0.01 * moved, (part, moved, differ)


def test_merged_parts_equal_diffusers_with_the_loras_fused(sd15, sd15_loras, merged, base_onnx):
    import torch

    onnx, _ = merged
    pipe = _diffusers_with_loras(sd15, [(sd15_loras["kohya"], KOHYA_SCALE), (sd15_loras["peft"], PEFT_SCALE)])
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 60, (2, 77), generator=gen, dtype=torch.int32)
    feeds = {
        "text_encoder": {"input_ids": ids},
        "unet": {"sample": torch.randn(2, 4, 64, 64, generator=gen), "timestep": torch.tensor([501], dtype=torch.int32),
                 "encoder_hidden_states": torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=gen)},
    }
    with torch.no_grad():
        expected = {
            "text_encoder": {"last_hidden_state": pipe.text_encoder(ids.long()).last_hidden_state},
            "unet": {"out_sample": pipe.unet(feeds["unet"]["sample"], torch.tensor(501.0),
                                             feeds["unet"]["encoder_hidden_states"]).sample},
        }
    for part in ("text_encoder", "unet"):
        inputs = {k: v.numpy() for k, v in feeds[part].items()}
        want = {k: v.numpy().astype(np.float64) for k, v in expected[part].items()}
        scale = max(1.0, max(float(np.abs(w).max()) for w in want.values()))
        merged_error = check_onnx(onnx / part / "model.onnx", inputs, want, in_process=True)
        base_error = check_onnx(base_onnx / part / "model.onnx", inputs, want, in_process=True)
        assert max(merged_error.values()) <= 1e-4 * scale, (part, merged_error)
        assert min(base_error.values()) > 100 * max(merged_error.values()), (part, base_error)


def test_merged_image_moves_from_the_base_and_mnn_draws_it(merged, base_onnx):
    onnx, bundle = merged
    with_loras, base = Pipeline.from_onnx(onnx, threads=2), Pipeline.from_onnx(base_onnx, threads=2)
    latents = initial_noise(7, with_loras.latent_shape, "mnn")
    params = GenerationParams(PROMPT, steps=3, latents=latents)
    drawn = with_loras.run(params).pixels
    # MNN and ONNX Runtime agree to about 70 dB on this image; the LoRAs move it to about 30.
    assert psnr(drawn, base.run(params).pixels) < 40
    assert psnr(Pipeline(bundle).run(params).pixels, drawn) >= 50


def test_manifest_records_each_lora(merged, sd15_loras):
    _, bundle = merged
    recorded = json.loads((bundle / "manifest.json").read_text())["loras"]
    assert recorded == [
        {"file": "kohya_style.safetensors", "sha256": sha256_file(sd15_loras["kohya"]), "scale": KOHYA_SCALE,
         "components": ["text_encoder", "unet"]},
        {"file": "style.safetensors", "sha256": sha256_file(sd15_loras["peft"]), "scale": PEFT_SCALE,
         "components": ["text_encoder", "unet"]},
    ]


def test_single_file_checkpoint_takes_the_same_loras(sd15, sd15_loras, merged, tmp_path):
    """A CompVis-layout file with --config: the LoRAs fuse into the models read from it as into
    the folder's (the same unet, to float error)."""
    import torch

    from builders import make_config_folder, save_single_file

    single = save_single_file(sd15, tmp_path / "model.safetensors")
    config = make_config_folder(sd15, tmp_path / "config")
    loras = (Lora(sd15_loras["kohya"], KOHYA_SCALE), Lora(sd15_loras["peft"], PEFT_SCALE))
    out = export(single, tmp_path / "onnx", ExportOptions(components=("unet",), config=config, loras=loras)).onnx_dir
    gen = torch.Generator().manual_seed(1)
    inputs = {"sample": torch.randn(2, 4, 64, 64, generator=gen).numpy(), "timestep": np.array([301], np.int32),
              "encoder_hidden_states": torch.randn(2, 77, 16, generator=gen).numpy()}
    import onnxruntime as ort

    folder_unet = ort.InferenceSession(str(merged[0] / "unet" / "model.onnx")).run(None, inputs)[0]
    assert check_onnx(out / "unet" / "model.onnx", inputs, {"out_sample": folder_unet.astype(np.float64)},
                      in_process=True)["out_sample"] < 1e-4


# ---------------------------------------------------------------------------------------------
# SD3.5: diffusers' format, against StableDiffusion3Pipeline with the LoRA
# ---------------------------------------------------------------------------------------------
def test_sd3_merged_export_draws_diffusers_image_with_the_lora(tiny_sd3_onnx, tmp_path):
    import torch
    from diffusers import StableDiffusion3Pipeline

    sd3 = tiny_sd3_onnx.parent / "diffusers"
    lora = make_sd3_lora(sd3, tmp_path / "sd3-style.safetensors")
    out = tmp_path / "onnx"
    report = export(sd3, out, ExportOptions(loras=(Lora(lora, 0.7),)))
    assert report.loras[0].components == ("text_encoder", "text_encoder_2", "transformer")

    torch.set_num_threads(2)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3))
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipe.fuse_lora(components=["transformer", "text_encoder", "text_encoder_2"], lora_scale=0.7)
    ours, base = Pipeline.from_onnx(out, threads=2), Pipeline.from_onnx(tiny_sd3_onnx, threads=2)
    latents = initial_noise(5, ours.latent_shape, "mnn")
    image = pipe(PROMPT, num_inference_steps=4, guidance_scale=5.0, latents=torch.from_numpy(latents),
                 height=ours.image_size[0], width=ours.image_size[1], output_type="np").images[0]
    reference = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    params = GenerationParams(PROMPT, steps=4, latents=latents, tokenizer="hf", schedule="diffusers")
    drawn = ours.run(params).pixels
    assert psnr(drawn, reference) >= 60
    assert np.abs(drawn.astype(int) - reference).max() <= 1
    assert psnr(base.run(params).pixels, reference) < 40


def test_wan_merged_export_draws_wan_pipelines_video_with_the_lora(tmp_path):
    """WanLoraLoaderMixin's LoRA (transformer attention): the merged export's frames are those of
    diffusers' WanPipeline with it loaded and fused, from the same latents."""
    import torch

    from builders import load_wan_pipeline, make_tiny_wan_pipeline
    from sd2mnn.families.wan import TEXT_LENGTH, WanDims

    wan = make_tiny_wan_pipeline(tmp_path / "diffusers")
    lora = make_wan_lora(wan, tmp_path / "wan-style.safetensors")
    size = dict(height=64, width=64, frames=5)
    report = export(wan, tmp_path / "onnx", ExportOptions(loras=(Lora(lora, 0.9),), **size))
    assert report.loras[0].components == ("transformer",)
    prompt, steps = "a red car on a bridge at night", 3
    latents = initial_noise(5, tuple(WanDims(**size).latent), "mnn")
    params = GenerationParams(prompt, steps=steps, latents=latents, tokenizer="hf", schedule="diffusers")
    ours = Pipeline.from_onnx(report.onnx_dir, threads=2).run(params).pixels

    def diffusers_frames(with_lora: bool) -> np.ndarray:
        pipe = load_wan_pipeline(wan)
        if with_lora:
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
            pipe.fuse_lora(components=["transformer"], lora_scale=0.9)
        with torch.no_grad():
            video = pipe(prompt, negative_prompt="", num_inference_steps=steps, guidance_scale=5.0,
                         latents=torch.from_numpy(latents), output_type="np", max_sequence_length=TEXT_LENGTH,
                         num_frames=5, height=64, width=64).frames[0]
        return np.clip(np.round(video * 255), 0, 255).astype(int)

    theirs = diffusers_frames(with_lora=True)
    assert np.abs(ours.astype(int) - theirs).max() <= 2
    assert np.abs(diffusers_frames(with_lora=False) - theirs).max() > 10


# ---------------------------------------------------------------------------------------------
# Bad LoRAs: one line naming the file, nothing written
# ---------------------------------------------------------------------------------------------
def _rewritten(source: Path, target: Path, change) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(source), "pt") as f:
        metadata = f.metadata()
    save_file(change(load_file(str(source))), str(target), metadata=metadata)
    return target


def _wrong_shape(state: dict) -> dict:
    import torch

    key = next(k for k in state if k.startswith("unet.") and "lora_A" in k)
    return {**state, key: torch.zeros(state[key].shape[0], state[key].shape[1] + 3)}


BAD_LORAS = {
    "other family": (lambda d, l, s: make_sd3_lora(s, d / "sd3.safetensors"),
                     "its weights are not for a Stable Diffusion 1.x pipeline"),
    "a layer it lacks": (lambda d, l, s: _rewritten(l, d / "renamed.safetensors", lambda st: {
        k.replace("attn1.to_q", "attn1.to_qq"): v for k, v in st.items()}),
        "8 of its 64 unet weights match no layer of"),
    "other shapes": (lambda d, l, s: _rewritten(l, d / "shape.safetensors", _wrong_shape),
                     "does not fit"),
    "not safetensors": (lambda d, l, s: _write(d / "style.ckpt", b"\x80\x04K\x01."),
                        "only .safetensors LoRAs are read (a pickled file can run code)"),
    "not a LoRA": (lambda d, l, s: _write(d / "junk.safetensors", b"junk"), "not a LoRA diffusers reads"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", list(BAD_LORAS))
def test_bad_lora_is_one_line_before_anything_is_written(case, sd15, sd15_loras, tiny_sd3_onnx, tmp_path, capsys):
    make, message = BAD_LORAS[case]
    bad = make(tmp_path, sd15_loras["peft"], tiny_sd3_onnx.parent / "diffusers")
    assert_export_refuses(sd15, "--lora", bad, message, tmp_path, capsys)


@pytest.mark.parametrize("args, message", [
    (["--lora", "style.safetensors:strong"], "the scale 'strong' is not a number"),
    (["--lora", "missing.safetensors"], "missing.safetensors: not found"),
])
def test_bad_lora_argument(args, message, sd15, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(sd15), "onnx", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "onnx").exists()


def test_kohya_keys_on_sd3_say_diffusers_does_not_convert_them(tiny_sd3_onnx, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    lora = tmp_path / "sd3_kohya.safetensors"
    save_file({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(96, 4)}, str(lora))
    assert main(["export", str(tiny_sd3_onnx.parent / "diffusers"), str(tmp_path / "onnx"), "--lora", str(lora)]) == 2
    err = capsys.readouterr().err
    assert "kohya keys, which diffusers' SD3LoraLoaderMixin does not convert" in err


def test_convert_of_an_onnx_folder_refuses_lora(base_onnx, sd15_loras, tmp_path, capsys):
    assert main(["convert", str(base_onnx), str(tmp_path / "bundle"), "--lora", str(sd15_loras["peft"])]) == 2
    assert "LoRAs and VAEs change the pipeline at export" in capsys.readouterr().err
    assert not (tmp_path / "bundle").exists()
