"""The checklist: every choice of MNN's C++ SD runtime that shapes the image, one test each,
held against the line it mirrors (MNN commit 4d40bdbd7):

  E  transformers/diffusion/engine/src/stable_diffusion.cpp
  T  transformers/diffusion/engine/src/tokenizer.cpp
  D  transformers/diffusion/engine/diffusion_demo.cpp
  C  tools/cv/source/imgcodecs/imgcodecs.cpp

Where MNN's Python package offers the very op the C++ calls (MNN.expr, MNN.cv), the test runs it
and asks for the same bits. The tokenizer, noise and PLMS arithmetic have their own exhaustive
tests (test_tokenizer.py, test_noise.py, test_scheduler.py); here they are checked in place, in a
recorded run of the pipeline on the tiny fp32 bundle.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest

from builders import record_model_calls

from sd2mnn.core.images import write_png
from sd2mnn.generation.noise import initial_noise
from sd2mnn.core.runtime import DYNAMIC_QUANT_OPTIONS
from sd2mnn.generation.pipeline import (
    GenerationParams,
    Pipeline,
    decoded_to_pixels,
    guide,
    mnn_runtime_config,
)
from sd2mnn.errors import InputError
from sd2mnn.families import SD15
from sd2mnn.schedulers.plms import PLMSScheduler, clamp_steps

PROMPT = "a photo of a cat"
SEED = 7
STEPS = 3

F = pytest.importorskip("MNN.expr")


@pytest.fixture(scope="module")
def recorded(fp32_bundle):
    """One run of the MNN pipeline with every model call's feeds and outputs recorded."""
    pipeline = Pipeline(fp32_bundle, config=mnn_runtime_config(threads=2, family=SD15))
    calls, generation = record_model_calls(pipeline, GenerationParams(PROMPT, steps=STEPS, seed=SEED))
    return pipeline, calls, generation


def mnn_var(array: np.ndarray):
    array = np.ascontiguousarray(array)
    dtype = {np.dtype(np.float32): F.float, np.dtype(np.int32): F.int, np.dtype(np.uint8): F.uint8}[array.dtype]
    return F.const(array, list(array.shape), F.NCHW, dtype)


def mnn_scalar(value: float):
    """``_Const(value)``: a float32 scalar (the double is rounded to float once, as in C++)."""
    return F.scalar(float(np.float32(value)), F.float)


# ---------------------------------------------------------------------------------------------
# Prompt -> text embeddings
# ---------------------------------------------------------------------------------------------
def test_ids_are_unconditional_empty_prompt_then_prompt(recorded):
    # E run():    auto ids = mTokenizer->encode(prompt, mMaxTextLen);
    # T encode(): auto uncond = encodeSingle("", maxlen); auto cond = encodeSingle(sentence, maxlen);
    # E load():   mPromptVar = _Input({2, mMaxTextLen}, NCHW, halide_type_of<int>());  mMaxTextLen = 77
    pipeline, calls, _ = recorded
    ids = calls["text_encoder"][0][0]["input_ids"]
    assert ids.dtype == np.int32 and ids.shape == (2, 77)
    assert ids[0].tolist() == pipeline.tokenizer.runtime.encode_single("", 77)
    assert ids[1].tolist() == pipeline.tokenizer.runtime.encode_single(PROMPT, 77)


def test_text_embeddings_are_last_hidden_state(recorded):
    # E load():         Module::load({"input_ids"}, {"last_hidden_state", "pooler_output"}, ...)
    # E text_encoder(): auto output = _Convert(outputs[0], NCHW);
    _, calls, _ = recorded
    last_hidden_state = calls["text_encoder"][0][1]["last_hidden_state"]
    for feeds, _ in calls["unet"]:
        np.testing.assert_array_equal(feeds["encoder_hidden_states"], last_hidden_state)


# ---------------------------------------------------------------------------------------------
# Noise, timesteps, UNet inputs
# ---------------------------------------------------------------------------------------------
def test_initial_latents_are_mt19937_normal_noise(recorded):
    # E unet(): std::mt19937 rng; rng.seed(seed); std::normal_distribution<float> normal(0, 1);
    #           for (int i = 0; i < 16384; i++) mInitNoise[i] = normal(rng);   -> mLatentVar [1,4,64,64]
    _, calls, _ = recorded
    first_sample = calls["unet"][0][0]["sample"]
    np.testing.assert_array_equal(first_sample[0:1], initial_noise(SEED, (1, 4, 64, 64), "mnn"))


def test_sample_is_the_latent_twice(recorded):
    # E unet(): mSampleVar = _Concat({plms, plms}, 0);
    _, calls, _ = recorded
    for feeds, _ in calls["unet"]:
        assert feeds["sample"].shape == (2, 4, 64, 64) and feeds["sample"].dtype == np.float32
        np.testing.assert_array_equal(feeds["sample"][0], feeds["sample"][1])


def test_timesteps_one_unet_call_each(recorded):
    # E run(): int step = 1000 / iterNum;  mTimeSteps[i] = 1 + (iterNum - 1 - i) * step;
    # E unet(): for (int i = 0; i < mTimeSteps.size(); i++) { ... forwardWithResizeCache(1, ...) }
    _, calls, _ = recorded
    fed = [int(feeds["timestep"][0]) for feeds, _ in calls["unet"]]
    step = 1000 // STEPS
    assert fed == [1 + (STEPS - 1 - i) * step for i in range(STEPS)] == [667, 334, 1]


def test_timestep_is_int32_of_shape_1(recorded):
    # E load(): mTimestepVar = _Input({1}, NCHW, halide_type_of<int>());
    # E unet(): ptr[0] = timestep; auto temp = _Cast(floatVar, halide_type_of<int>()); mTimestepVar->input(temp);
    _, calls, _ = recorded
    for feeds, _ in calls["unet"]:
        assert feeds["timestep"].dtype == np.int32 and feeds["timestep"].shape == (1,)
    as_mnn = F.cast(mnn_var(np.array([667.0], np.float32)), F.int).read()
    np.testing.assert_array_equal(calls["unet"][0][0]["timestep"], as_mnn)


def test_guidance_split_scale_and_formula():
    # E unet(): scaleptr[0] = 7.5;
    #           auto splitvar = _Split(noise_pred, {2}, 0); uncond = splitvar[0]; text = splitvar[1];
    #           noise_pred = scalevar * (noise_pred_text - noise_pred_uncond) + noise_pred_uncond;
    assert SD15.recipe.guidance == 7.5
    eps = np.random.default_rng(0).standard_normal((2, 4, 64, 64)).astype(np.float32)
    uncond, text = F.split(mnn_var(eps), [1, 1], 0)
    scale = mnn_var(np.array([7.5], np.float32))
    expected = (scale * (text - uncond) + uncond).read()
    np.testing.assert_array_equal(guide(eps, SD15.recipe.guidance), expected)  # bit for bit, float32


def test_plms_steps_take_the_guided_noise(recorded):
    # E unet(): plms = step_plms(plms, noise_pred, i);   (scheduler.py is step_plms)
    _, calls, generation = recorded
    scheduler = PLMSScheduler(STEPS)
    latent = calls["unet"][0][0]["sample"][0:1]
    for i, (_, out) in enumerate(calls["unet"]):
        latent = scheduler.step(guide(out["out_sample"], SD15.recipe.guidance), i, latent)
        if i + 1 < STEPS:
            np.testing.assert_array_equal(calls["unet"][i + 1][0]["sample"][0:1], latent)
    np.testing.assert_array_equal(generation.latents, latent)


def test_steps_outside_1_to_50_are_refused_quoting_mnns_clamp():
    # E run(): if(iterNum > 50) { iterNum = 50; ... }  if(iterNum < 1) { iterNum = 10; ... }
    assert clamp_steps(51) == 50 and clamp_steps(0) == 10 and clamp_steps(-3) == 10 and clamp_steps(20) == 20
    # sd2mnn refuses instead of changing the request silently, and says what MNN would do.
    with pytest.raises(InputError, match="would quietly use 50"):
        GenerationParams(PROMPT, steps=51).validate(SD15)
    with pytest.raises(InputError, match="would quietly use 10"):
        GenerationParams(PROMPT, steps=0).validate(SD15)


def test_seed_is_an_int_and_negative_means_random_in_mnn():
    # D main(): auto random_seed = atoi(argv[6]);
    # E unet(): int seed = randomSeed < 0 ? std::random_device()() : randomSeed;
    with pytest.raises(InputError, match="negative seed"):
        GenerationParams(PROMPT, seed=-1).validate(SD15)
    assert any("atoi" in d for d in GenerationParams(PROMPT, seed=2**31).divergences(SD15))
    assert GenerationParams(PROMPT, seed=2**31 - 1).divergences(SD15) == []


# ---------------------------------------------------------------------------------------------
# Latents -> pixels -> PNG
# ---------------------------------------------------------------------------------------------
def test_latents_scaled_by_a_float_multiply(recorded):
    # E vae_decoder(): latent = latent * _Const(1 / 0.18215);
    _, calls, generation = recorded
    assert np.float32(SD15.recipe.latent_scale) == np.float32(1 / 0.18215)
    fed = calls["vae_decoder"][0][0]["latent_sample"]
    np.testing.assert_array_equal(fed, generation.latents * np.float32(1 / 0.18215))
    by_mnn = (mnn_var(generation.latents) * mnn_scalar(1 / 0.18215)).read()
    np.testing.assert_array_equal(fed, by_mnn)
    # A divide is not the same thing: some values differ by an ulp.
    assert (generation.latents / np.float32(0.18215) != fed).any()


def edge_samples() -> np.ndarray:
    """VAE outputs that exercise the clamp, the rounding of halves and NaN/inf."""
    rng = np.random.default_rng(1)
    sample = rng.uniform(-1.3, 1.3, size=(1, 3, 128, 128)).astype(np.float32)
    # Values whose x*0.5+0.5 then *255 land exactly on k + 0.5 (roundf goes up, rint to even).
    ties = []
    for k in range(255):
        y = np.float32((k + 0.5) / 255)
        if y * np.float32(255) == np.float32(k + 0.5):
            x = (y - np.float32(0.5)) / np.float32(0.5)
            if x * np.float32(0.5) + np.float32(0.5) == y:
                ties.append(x)
    assert len(ties) > 20
    flat = sample.reshape(-1)
    flat[: len(ties)] = ties
    flat[len(ties): len(ties) + 6] = [np.nan, np.inf, -np.inf, -1.0, 1.0, 0.0]
    return sample


def mnn_vae_tail(sample: np.ndarray):
    """vae_decoder()'s tail in MNN's own ops (E):
    image = _Relu6(image * _Const(0.5) + _Const(0.5), 0, 1);
    image = _Squeeze(_Transpose(image, {0, 2, 3, 1}));
    image = _Cast(_Round(image * _Const(255.0)), halide_type_of<uint8_t>());"""
    half = mnn_scalar(0.5)
    image = F.relu6(mnn_var(sample) * half + half, 0.0, 1.0)
    image = F.squeeze(F.transpose(image, [0, 2, 3, 1]))
    return F.cast(F.round(image * mnn_scalar(255.0)), F.uint8)


def test_pixels_clamp_round_half_away_and_cast_like_mnn():
    sample = edge_samples()
    expected = mnn_vae_tail(sample).read()
    ours = decoded_to_pixels(sample)
    assert ours.dtype == np.uint8 and ours.shape == (128, 128, 3)
    np.testing.assert_array_equal(ours, expected)
    # The halves really are there and numpy's round-half-to-even would have got them wrong.
    scaled = np.clip(sample * np.float32(0.5) + np.float32(0.5), 0, 1).transpose(0, 2, 3, 1)[0] * np.float32(255)
    finite = np.isfinite(scaled)
    assert (np.rint(scaled[finite]).astype(np.uint8) != expected[finite]).any()


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos: pos + 4])
        chunks.append((data[pos + 4: pos + 8], data[pos: pos + 12 + length]))
        pos += 12 + length
    return chunks


def test_png_channel_order_and_bytes_are_the_cpp_runtimes(tmp_path):
    # E vae_decoder(): image = cvtColor(image, COLOR_BGR2RGB);            (swap 1)
    # E run():         bool res = imwrite(imagePath, image);
    # C imwrite():     if (channel == 3) img = cvtColor(img, COLOR_BGR2RGB);   (swap 2)
    #                  return stbi_write_png(filename.c_str(), width, height, channel, ..., 0);
    # Two swaps: the PNG's red is the VAE's channel 0, and the file is stb's 8-bit RGB.
    cv = pytest.importorskip("MNN.cv")
    from PIL import Image

    sample = edge_samples()
    sample[0, 0, :4, :4], sample[0, 1:, :4, :4] = 1.0, -1.0  # channel 0 only: red
    cpp_file = tmp_path / "cpp.png"
    assert cv.imwrite(str(cpp_file), cv.cvtColor(mnn_vae_tail(sample), cv.COLOR_BGR2RGB))
    ours = write_png(tmp_path / "ours.png", decoded_to_pixels(sample), {})
    assert ours.read_bytes() == cpp_file.read_bytes()  # byte for byte
    with Image.open(ours) as image:
        assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 0, 0)
    # With metadata, dropping the text chunks gives the same bytes again.
    tagged = write_png(tmp_path / "tagged.png", decoded_to_pixels(sample), {"prompt": "un chat", "seed": "7"})
    kept = b"".join(raw for kind, raw in png_chunks(tagged.read_bytes()) if kind not in (b"tEXt", b"iTXt"))
    assert tagged.read_bytes()[:8] + kept == cpp_file.read_bytes()


def test_generated_png_is_the_cpp_runtimes_file(recorded, tmp_path):
    # The whole tail on the recorded run's real VAE output.
    cv = pytest.importorskip("MNN.cv")
    _, calls, generation = recorded
    decoded = calls["vae_decoder"][0][1]["sample"]
    cpp_file = tmp_path / "cpp.png"
    cv.imwrite(str(cpp_file), cv.cvtColor(mnn_vae_tail(decoded), cv.COLOR_BGR2RGB))
    np.testing.assert_array_equal(generation.pixels, mnn_vae_tail(decoded).read())
    assert write_png(tmp_path / "ours.png", generation.pixels, {}).read_bytes() == cpp_file.read_bytes()


# ---------------------------------------------------------------------------------------------
# Runtime settings
# ---------------------------------------------------------------------------------------------
def test_runtime_settings_are_loads():
    # E load(): config.numThread = 4;  backendConfig.memory = BackendConfig::Memory_Low;
    #           backendConfig.precision = BackendConfig::Precision_Low;  module_config.shapeMutable = false;
    #           if(mMemoryMode == 0) setHint(WINOGRAD_MEMORY_LEVEL, 0); else if(mMemoryMode == 2) ...(, 1);
    #           if(config.type == MNN_FORWARD_CPU) setHint(Interpreter::DYNAMIC_QUANT_OPTIONS, 2);
    #           OpenCL: config.mode = MNN_GPU_MEMORY_BUFFER | MNN_GPU_TUNING_FAST;  others: numThread = 1;
    #           runtime_manager_ shared by the three Module::load calls (pipeline.py does the same).
    config = mnn_runtime_config(family=SD15)
    assert (config.backend, config.threads, config.precision, config.memory) == ("CPU", 4, "low", "low")
    assert (DYNAMIC_QUANT_OPTIONS, 2) in config.hints and config.winograd
    assert not mnn_runtime_config(memory_mode=0, family=SD15).winograd
    assert (3, 1) in mnn_runtime_config(memory_mode=2, family=SD15).hints
    assert (DYNAMIC_QUANT_OPTIONS, 2) not in mnn_runtime_config(backend="OPENCL", family=SD15).hints
    assert mnn_runtime_config(backend="opencl", family=SD15).threads == (1 << 6) | (1 << 4)
    assert mnn_runtime_config(backend="VULKAN", family=SD15).threads == 1


def test_options_beyond_the_cpp_runtime_are_flagged():
    # E unet(): scaleptr[0] = 7.5;   T encode(): encodeSingle("", maxlen)   (no other choice in C++)
    assert GenerationParams(PROMPT).divergences(SD15) == []
    assert GenerationParams(PROMPT, noise="mnn-libc++").divergences(SD15) == []
    flagged = GenerationParams(PROMPT, negative_prompt="blurry", guidance=5.0, noise="numpy").divergences(SD15)
    assert len(flagged) == 3 and "7.5" in flagged[1]
