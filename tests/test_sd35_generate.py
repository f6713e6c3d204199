"""sd2mnn generate on SD3.5: a tiny StableDiffusion3Pipeline (two CLIPs with projections, T5, an
MMDiT, a 16-channel VAE; seeded weights) exported by sd2mnn export and converted by sd2mnn
convert, drawn on MNN and on ONNX Runtime with MNN's SD3.5 recipe (diffusion_sd35.cpp), and with
diffusers' recipe against diffusers' own StableDiffusion3Pipeline on the same models.

Each recipe check names the diffusion_sd35.cpp expression it holds the pipeline to (SD35:n lines
of MNN 3.6.1)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from builders import record_model_calls

pytest.importorskip("diffusers")

from sd2mnn.cli import main  # noqa: E402
from sd2mnn.errors import InputError  # noqa: E402
from sd2mnn.core.images import compare, psnr, read_image  # noqa: E402
from sd2mnn.generation.noise import initial_noise  # noqa: E402
from sd2mnn.generation.pipeline import GenerationParams, Pipeline, mnn_runtime_config  # noqa: E402
from sd2mnn.schedulers.flow_match import diffusers_sigmas, sd35_timesteps  # noqa: E402

PROMPT = "a photo of a cat"
STEPS = 3
MIN_PSNR_MNN_ORT = 35.0


@pytest.fixture(scope="module")
def sd3_onnx(tiny_sd3_onnx) -> Path:
    return tiny_sd3_onnx


@pytest.fixture(scope="module")
def sd3_dir(tiny_sd3_onnx) -> Path:
    """The diffusers folder tiny_sd3_onnx was exported from."""
    return tiny_sd3_onnx.parent / "diffusers"


@pytest.fixture(scope="module")
def sd3_bundle(tiny_sd3_bundle) -> Path:
    return tiny_sd3_bundle


@pytest.fixture(scope="module")
def ort_pipe(sd3_onnx):
    return Pipeline.from_onnx(sd3_onnx, threads=2)


@pytest.fixture(scope="module")
def recorded(sd3_bundle):
    """One MNN run with every model call's feeds and outputs recorded."""
    pipeline = Pipeline(sd3_bundle, config=mnn_runtime_config(threads=2, family=_family(sd3_bundle)))
    calls, generation = record_model_calls(pipeline, GenerationParams(PROMPT, steps=STEPS, seed=11))
    return pipeline, calls, generation


def _family(path):
    from sd2mnn import families

    return families.detect(path)


def generate_cli(*args) -> int:
    return main(["generate", *map(str, args), "--threads", "2", "--quiet"])


# ---------------------------------------------------------------------------------------------
# The two runtimes
# ---------------------------------------------------------------------------------------------
def test_mnn_and_onnxruntime_draw_the_same_image(sd3_bundle, sd3_onnx, tmp_path):
    assert generate_cli(sd3_bundle, PROMPT, "-o", tmp_path / "mnn.png", "--steps", STEPS, "--seed", 3) == 0
    assert generate_cli("--onnx", sd3_onnx, PROMPT, "-o", tmp_path / "ort.png", "--steps", STEPS, "--seed", 3) == 0
    result = compare(tmp_path / "mnn.png", tmp_path / "ort.png")
    assert result.psnr_db >= MIN_PSNR_MNN_ORT, result
    pixels, meta = read_image(tmp_path / "mnn.png")
    assert pixels.shape == (128, 128, 3) and pixels.std() > 5  # a picture, not a flat field
    assert (meta["family"], meta["guidance"], meta["steps"], meta["seed"]) == ("sd35", "5", str(STEPS), "3")
    # The tiny models are off the C++ contract: the PNG says so, and what.
    assert meta["matches_mnn_runtime"].startswith("no: MNN's runtime would refuse")
    assert "latent_height 16 (MNN's runtime: 128)" in meta["mnn_runtime_contract"]


# ---------------------------------------------------------------------------------------------
# MNN's recipe, step by step (diffusion_sd35.cpp)
# ---------------------------------------------------------------------------------------------
def test_three_tokenizers_feed_uncond_then_prompt(recorded):
    # SD35:182-188 (CLIP-L), SD35:197-203 (CLIP-G): encode(prompt, 77), kPair: ["", prompt];
    # SD35:214-222 (T5): encode("", 256) then encode(prompt, 256), kSingle: no BOS, EOS 1, pad 0.
    pipeline, calls, _ = recorded
    for name, folder in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3")):
        ids = calls[name][0][0]["input_ids"]
        tok = pipeline.tokenizers[name].runtime
        length = 256 if folder == "tokenizer_3" else 77
        assert ids.dtype == np.int32 and ids.shape == (2, length)
        assert ids.tolist() == [tok.encode_single("", length), tok.encode_single(PROMPT, length)]
    t5 = calls["text_encoder_3"][0][0]["input_ids"]
    assert t5[0, 0] == 1 and t5[0, 1:].max() == 0  # "" is just EOS
    clip = calls["text_encoder"][0][0]["input_ids"]
    assert clip[0, 0] == 49406 and clip[0, 1] == 49407


def test_conditioning_is_clip_concat_zero_padded_then_t5(recorded):
    # SD35:231-243: concat(clip_l, clip_g, -1), zeros to the joint width, T5 after on axis 1;
    # pooled = concat(text_embeds_l, text_embeds_g).
    _, calls, _ = recorded
    l_out, g_out = calls["text_encoder"][0][1], calls["text_encoder_2"][0][1]
    t5 = calls["text_encoder_3"][0][1]["last_hidden_state"]
    wl, wg = l_out["last_hidden_state"].shape[-1], g_out["last_hidden_state"].shape[-1]
    for feeds, _ in calls["transformer"]:
        states = feeds["encoder_hidden_states"]
        assert states.shape == (2, 77 + t5.shape[1], t5.shape[-1])
        np.testing.assert_array_equal(states[:, :77, :wl], l_out["last_hidden_state"])
        np.testing.assert_array_equal(states[:, :77, wl:wl + wg], g_out["last_hidden_state"])
        assert not states[:, :77, wl + wg:].any()
        np.testing.assert_array_equal(states[:, 77:], t5)
        np.testing.assert_array_equal(feeds["pooled_projections"],
                                      np.concatenate([l_out["text_embeds"], g_out["text_embeds"]], -1))


def test_noise_timesteps_and_euler_steps(recorded):
    # SD35:323-334 mt19937 noise [1,16,H,W] in NCHW order; SD35:348-349 [x, x] and _Const(t, {2}),
    # t the truncated integer (SD35:308); SD35:358 CFG 5.0; SD35:255-259 x + v * (sigma_next - sigma).
    pipeline, calls, generation = recorded
    latent = initial_noise(11, pipeline.latent_shape, "mnn")
    assert pipeline.latent_shape == (1, 16, 16, 16)
    # The same std::mt19937 stream as SD1.5's, drawn one value after another in NCHW order.
    np.testing.assert_array_equal(latent.reshape(-1), initial_noise(11, (1, 4, 64, 64), "mnn").reshape(-1)[:latent.size])
    steps = sd35_timesteps(STEPS)
    sigmas = np.append(steps / np.float32(1000), np.float32(0)).astype(np.float32)
    for i, (feeds, out) in enumerate(calls["transformer"]):
        np.testing.assert_array_equal(feeds["hidden_states"], np.concatenate([latent, latent]))
        assert feeds["timestep"].dtype == np.float32 and feeds["timestep"].tolist() == [float(steps[i])] * 2
        v = out["out_hidden_states"]
        guided = v[0:1] + (v[1:2] - v[0:1]) * np.float32(5.0)
        latent = latent + guided * (sigmas[i + 1] - sigmas[i])
    np.testing.assert_array_equal(generation.latents, latent)


def test_decoder_input_is_a_float_scale_then_shift(recorded):
    # SD35:270-273 latent * _Const(1.0f / 1.5305f) + _Const(0.0609f), each in float.
    _, calls, generation = recorded
    fed = calls["vae_decoder"][0][0]["latent_sample"]
    np.testing.assert_array_equal(fed, generation.latents * (np.float32(1) / np.float32(1.5305)) + np.float32(0.0609))


# ---------------------------------------------------------------------------------------------
# Against diffusers' StableDiffusion3Pipeline
# ---------------------------------------------------------------------------------------------
def _diffusers_image(sd3_dir, latents, steps, size, **kwargs) -> np.ndarray:
    import torch
    from diffusers import StableDiffusion3Pipeline

    torch.set_num_threads(2)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir), **kwargs)
    image = pipe(PROMPT, num_inference_steps=steps, guidance_scale=5.0, latents=torch.from_numpy(latents),
                 height=size[0], width=size[1], output_type="np").images[0]
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def test_diffusers_recipe_on_onnxruntime_is_diffusers_image(sd3_dir, ort_pipe):
    """The same models, latents and options: the ONNX Runtime pipeline with diffusers' ids and
    timesteps draws the image diffusers does (its export's float error and a rounding apart);
    with MNN's recipe it does not (the timestep rule, the CLIP-L padding)."""
    latents = initial_noise(5, ort_pipe.latent_shape, "mnn")
    reference = _diffusers_image(sd3_dir, latents, 4, ort_pipe.image_size)
    faithful = ort_pipe.run(GenerationParams(PROMPT, steps=4, latents=latents, tokenizer="hf", schedule="diffusers"))
    assert psnr(faithful.pixels, reference) >= 60
    assert np.abs(faithful.pixels.astype(int) - reference).max() <= 1
    runtime = ort_pipe.run(GenerationParams(PROMPT, steps=4, latents=latents))
    assert psnr(runtime.pixels, reference) < 60


def _without_t5(bundle: Path, target: Path) -> Path:
    """A copy of ``bundle`` as a conversion without text_encoder_3 writes it (its manifest does not
    list T5: one that does is refused when its T5 is gone)."""
    shutil.copytree(bundle, target)
    for name in ("text_encoder_3.mnn", "text_encoder_3.mnn.weight"):
        (target / name).unlink()
    manifest = json.loads((target / "manifest.json").read_text())
    del manifest["components"]["text_encoder_3"]
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_without_t5_zeros_stand_in_as_in_diffusers(sd3_dir, sd3_onnx, sd3_bundle, tmp_path, capsys):
    """A pipeline without text_encoder_3: MNN's runtime and diffusers both use zeros."""
    onnx = tmp_path / "onnx"
    shutil.copytree(sd3_onnx, onnx)
    shutil.rmtree(onnx / "text_encoder_3")
    pipe = Pipeline.from_onnx(onnx, threads=2)
    assert "text_encoder_3" not in pipe.components
    latents = initial_noise(5, pipe.latent_shape, "mnn")
    reference = _diffusers_image(sd3_dir, latents, 2, pipe.image_size, text_encoder_3=None, tokenizer_3=None)
    ours = pipe.run(GenerationParams(PROMPT, steps=2, latents=latents, tokenizer="hf", schedule="diffusers"))
    assert np.abs(ours.pixels.astype(int) - reference).max() <= 1
    assert any("conditioned on zeros" in note for note in ours.notes)
    # The bundle without T5 on MNN draws what ONNX Runtime does.
    bundle = _without_t5(sd3_bundle, tmp_path / "bundle")
    assert generate_cli(bundle, PROMPT, "-o", tmp_path / "mnn.png", "--steps", 2, "--seed", 4) == 0
    assert generate_cli("--onnx", onnx, PROMPT, "-o", tmp_path / "ort.png", "--steps", 2, "--seed", 4) == 0
    assert compare(tmp_path / "mnn.png", tmp_path / "ort.png").psnr_db >= MIN_PSNR_MNN_ORT
    _, meta = read_image(tmp_path / "mnn.png")
    assert "text_encoder_3.mnn: conditioned on zeros" in meta["notes"]


def test_without_t5_or_its_tokenizer_draws_and_says_the_runtime_would_refuse(sd3_bundle, tmp_path):
    # DiffusionSD35::load() fails without tokenizer_3/tokenizer.mtok, T5 or not (SD35:96-107).
    bundle = _without_t5(sd3_bundle, tmp_path / "bundle")
    shutil.rmtree(bundle / "tokenizer_3")
    assert generate_cli(bundle, PROMPT, "-o", tmp_path / "x.png", "--steps", 1) == 0
    _, meta = read_image(tmp_path / "x.png")
    assert "tokenizer_3/tokenizer.mtok is missing (it loads every tokenizer" in meta["mnn_runtime_contract"]


def test_diffusers_schedule_is_diffusers_scheduler_bit_for_bit():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for n in (1, 2, 4, 28, 50):
        reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
        reference.set_timesteps(n)
        timesteps, sigmas = diffusers_sigmas(n)
        np.testing.assert_array_equal(timesteps, reference.timesteps.numpy())
        np.testing.assert_array_equal(sigmas, reference.sigmas.numpy())


def test_latents_saved_and_given_at_the_models_shape(sd3_bundle, tmp_path):
    # --save-latents writes the [1,16,H,W] noise drawn; a .txt of its numbers (MNN_DUMP_DATA's
    # format) is read at the transformer's latent shape and draws the same image.
    assert generate_cli(sd3_bundle, PROMPT, "-o", tmp_path / "a.png", "--steps", 1, "--seed", 9,
                        "--save-latents", tmp_path / "noise.npy") == 0
    saved = np.load(tmp_path / "noise.npy")
    np.testing.assert_array_equal(saved, initial_noise(9, (1, 16, 16, 16), "mnn"))
    np.savetxt(tmp_path / "random.txt", saved.reshape(-1), fmt="%.9g")
    assert generate_cli(sd3_bundle, PROMPT, "-o", tmp_path / "b.png", "--steps", 1, "--latents", tmp_path / "random.txt") == 0
    assert compare(tmp_path / "a.png", tmp_path / "b.png").identical


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--height", "1024"], "vae_decoder.mnn draws 128x128 images (fixed at export); --height 1024 needs a "
                           "pipeline exported at that size (sd2mnn export --height/--width); MNN's runtime draws "
                           "1024x1024 only"),
    (["--width", "512"], "--width 512 needs a pipeline exported at that size"),
    (["--height", "0"], "height must be a whole number of pixels above 0, got 0"),
])
def test_size_flags_other_than_the_models_are_refused(sd3_bundle, tmp_path, capsys, flags, message):
    assert generate_cli(sd3_bundle, PROMPT, "-o", tmp_path / "x.png", "--steps", 1, *flags) != 0
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("runtime, remove, message", [
    ("mnn", "tokenizer_2/tokenizer.mtok", "tokenizer_2/tokenizer.mtok is missing (MNN's runtime reads only this tokenizer "
                                          "file); reconvert the bundle with sd2mnn convert"),
    ("mnn", "text_encoder_3.mnn.weight", "text_encoder_3.mnn.weight is missing; reconvert text_encoder_3.mnn"),
    ("onnx", "tokenizer_3", "tokenizer_3 is missing: text_encoder_3 is fed its ids; export the pipeline with its tokenizers"),
    ("onnx", "transformer", "transformer/model.onnx is missing; export the pipeline with sd2mnn export"),
])
def test_a_missing_part_is_one_line(sd3_bundle, sd3_onnx, tmp_path, capsys, runtime, remove, message):
    source = tmp_path / "source"
    shutil.copytree(sd3_bundle if runtime == "mnn" else sd3_onnx, source)
    target = source / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    args = [source] if runtime == "mnn" else ["--onnx", source]
    assert generate_cli(*args, PROMPT, "-o", tmp_path / "x.png", "--steps", 1) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()


def test_size_flags_equal_to_the_models_are_taken(sd3_bundle, tmp_path):
    assert generate_cli(sd3_bundle, PROMPT, "-o", tmp_path / "x.png", "--steps", 1, "--height", 128, "--width", 128) == 0


def test_diffusers_schedule_is_refused_for_sd15(fp32_bundle, tmp_path, capsys):
    assert generate_cli(fp32_bundle, PROMPT, "-o", tmp_path / "x.png", "--schedule", "diffusers") != 0
    assert "schedule 'diffusers' is SD3.5's and Wan's; sd15 runs its runtime's schedule only (plms)" in capsys.readouterr().err


def test_mismatched_text_widths_are_one_line(sd3_onnx, tmp_path):
    """A transformer from another model than the text encoders: one line, before any step."""
    from sd2mnn.recipes.sd35 import STEPS as SD35

    outputs = {"text_encoder": {"last_hidden_state": np.zeros((2, 77, 40), np.float32), "text_embeds": np.zeros((2, 4))},
               "text_encoder_2": {"last_hidden_state": np.zeros((2, 77, 40), np.float32), "text_embeds": np.zeros((2, 4))}}
    shapes = {"transformer": {"encoder_hidden_states": [2, 333, 64]}}
    with pytest.raises(InputError, match="takes text states 64 wide, but CLIP-L and CLIP-G give 80"):
        SD35.condition(outputs, shapes, {"transformer": "transformer.mnn"})
