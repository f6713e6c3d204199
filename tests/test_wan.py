"""Wan2.1 text-to-video: a tiny diffusers WanPipeline exported to the graphs MNN's Wan runtime
loads, each computing what diffusers computes from what that runtime feeds it, and converted."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from builders import load_wan_pipeline, make_tiny_wan_pipeline
from sd2mnn import families
from sd2mnn.errors import InputError
from sd2mnn.exporting.export import ExportOptions, export, video_frames
from sd2mnn.families.wan import TEXT_LENGTH, WAN, WanDims

pytest.importorskip("diffusers")

SIZE = dict(height=64, width=64, frames=5)
PROMPTS = ("", "a cat walking in the snow", "a red car on a bridge at night, detailed, cinematic")


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory) -> Path:
    return make_tiny_wan_pipeline(tmp_path_factory.mktemp("wan") / "diffusers")


@pytest.fixture(scope="module")
def wan_export(wan_dir, tmp_path_factory):
    onnx = tmp_path_factory.mktemp("wan-onnx") / "onnx"
    return export(wan_dir, onnx, ExportOptions(**SIZE))


def _ort(path: Path, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _runtime_ids(tokenizer, prompt: str) -> list[int]:
    # wan_diffusion.cpp: MtokTokenizer(kSingle) adds no EOS; cut or padded with 0 to 512.
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][:TEXT_LENGTH]
    return ids + [0] * (TEXT_LENGTH - len(ids))


def test_export_writes_the_runtime_layout_at_the_size_asked(wan_dir, wan_export):
    assert families.detect(wan_dir) is WAN and families.detect(wan_export.onnx_dir) is WAN
    assert (wan_export.width, wan_export.height, wan_export.frames) == (64, 64, 5)
    from sd2mnn.exporters import exporter_for

    expected = {n: c.shapes(WanDims(frames=5, height=64, width=64, text_hidden=32)) for n, c in WAN.components.items()}
    free = exporter_for(WAN).free_dims
    for comp in wan_export.components:
        spec = WAN.components[comp.name]
        assert list(comp.inputs) == list(spec.inputs) and list(comp.outputs) == list(spec.outputs)
        for name, (dtype, shape) in {**comp.inputs, **comp.outputs}.items():
            want_dtype, want = expected[comp.name][name]
            # One input size each is declared free (wan_diffusion_demo's early resize fix): -1 there.
            want = [-1 if axis in free[comp.name].get(name, {}) else d for axis, d in enumerate(want)]
            assert (dtype, list(shape)) == (want_dtype, want), (comp.name, name)
        assert sum(-1 in shape for _, shape in comp.inputs.values()) == 1
        assert max(comp.max_abs_error.values()) < 1e-4


def test_text_encoder_graph_gives_diffusers_prompt_embeddings_from_the_runtime_ids(wan_dir, wan_export):
    """The runtime feeds ids without EOS and no mask; the graph adds both and zeroes the padding,
    as WanPipeline._get_t5_prompt_embeds does."""
    import torch

    pipe = load_wan_pipeline(wan_dir)
    for prompt in PROMPTS:
        ids = np.array([_runtime_ids(pipe.tokenizer, ""), _runtime_ids(pipe.tokenizer, prompt)], dtype=np.int32)
        (states,) = _ort(wan_export.onnx_dir / "text_encoder" / "model.onnx", {"input_ids": ids})
        with torch.no_grad():
            want = pipe._get_t5_prompt_embeds(["", prompt], max_sequence_length=TEXT_LENGTH).numpy()
        np.testing.assert_allclose(states, want, atol=1e-5, err_msg=prompt)
        used = len(pipe.tokenizer(prompt)["input_ids"])  # with its EOS
        assert np.abs(states[1, used:]).max() == 0 and np.abs(states[1, used - 1]).max() > 0


def test_transformer_graph_keeps_diffusers_conditioning_under_the_runtime_mask(wan_dir, wan_export):
    import torch

    pipe = load_wan_pipeline(wan_dir)
    ids = np.array([_runtime_ids(pipe.tokenizer, ""), _runtime_ids(pipe.tokenizer, PROMPTS[1])], dtype=np.int32)
    with torch.no_grad():
        conditioning = pipe._get_t5_prompt_embeds(["", PROMPTS[1]], max_sequence_length=TEXT_LENGTH)
    rng = np.random.default_rng(0)
    latents = np.repeat(rng.standard_normal([1, *WanDims(**SIZE).latent[1:]]).astype(np.float32), 2, axis=0)
    feeds = {"hidden_states": latents, "timestep": np.full(2, 857.3, np.float32),
             "encoder_hidden_states": conditioning.numpy(), "encoder_attention_mask": (ids != 0).astype(np.int32)}
    (noise,) = _ort(wan_export.onnx_dir / "transformer" / "model.onnx", feeds)
    with torch.no_grad():
        want = pipe.transformer(hidden_states=torch.from_numpy(latents), timestep=torch.full((2,), 857.3),
                                encoder_hidden_states=conditioning, return_dict=False)[0].numpy()
    np.testing.assert_allclose(noise, want, atol=1e-5)


def test_vae_decoder_graph_denormalises_as_diffusers(wan_dir, wan_export):
    import torch
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(str(wan_dir / "vae"), torch_dtype=torch.float32).eval()
    latent = np.random.default_rng(1).standard_normal(WanDims(**SIZE).latent).astype(np.float32)
    (video,) = _ort(wan_export.onnx_dir / "vae_decoder" / "model.onnx", {"latent_sample": latent})
    # WanPipeline: latents / (1 / std) + mean, then decode.
    shape = (1, vae.config.z_dim, 1, 1, 1)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(shape)
    mean = torch.tensor(vae.config.latents_mean).view(shape)
    with torch.no_grad():
        want = vae.decode(torch.from_numpy(latent) / std + mean, return_dict=False)[0].numpy()
    assert video.shape == (1, 3, 5, 64, 64)
    np.testing.assert_allclose(video, want, atol=1e-4)


def test_frames_must_be_what_the_vae_decodes_and_only_for_video():
    assert video_frames(None, WAN) == 9 and video_frames(13, WAN) == 13
    with pytest.raises(InputError, match=r"--frames 8: the VAE decodes 4n \+ 1 frames; give 5 or 9"):
        video_frames(8, WAN)
    with pytest.raises(InputError, match="--frames 9: .* draws images; leave --frames out"):
        video_frames(9, families.SD15)
    assert video_frames(None, families.SD15) is None


def test_a_bad_frame_count_is_one_line_from_the_cli(wan_dir, tmp_path):
    out = tmp_path / "onnx"
    done = subprocess.run([sys.executable, "-m", "sd2mnn.cli", "export", str(wan_dir), str(out), "--frames", "6"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: --frames 6: the VAE decodes 4n + 1 frames")
    assert not out.exists()


def test_a_text_encoder_whose_weights_cannot_fit_is_refused_before_reading_them(wan_dir, tmp_path):
    """All of UMT5-XXL (22.7 GB in fp32) cannot be exported here at any size: refused from the
    files' sizes, its weights (a sparse file, nothing to read) untouched."""
    import shutil

    folder = tmp_path / "wan"
    shutil.copytree(wan_dir, folder)
    for weights in (folder / "text_encoder").glob("*.safetensors"):
        weights.unlink()
    with open(folder / "text_encoder" / "model.safetensors", "wb") as f:
        f.truncate(5_680_910_336 * 4)
    with pytest.raises(InputError) as refused:  # this machine's 24 GiB, on any machine
        export(folder, tmp_path / "onnx", ExportOptions(components=("text_encoder",), memory_budget=24 << 30, **SIZE))
    assert re.fullmatch(r"\S+/text_encoder: its weights are 21\.2 GiB and exporting them needs about [\d.]+ GiB, "
                        r"24\.0 GiB available, at any size; export on a machine with more memory", str(refused.value))
    assert not (tmp_path / "onnx").exists()


def test_a_second_transformer_is_refused(wan_dir, tmp_path):
    import shutil

    copy = tmp_path / "wan22"
    shutil.copytree(wan_dir, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index["transformer_2"] = ["diffusers", "WanTransformer3DModel"]
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="a second transformer .*export a Wan2.1 pipeline"):
        export(copy, tmp_path / "onnx", ExportOptions(**SIZE))
    assert not (tmp_path / "onnx").exists()


def test_the_graphs_avoid_what_mnn_computes_otherwise(wan_export):
    """No If (MNN cannot size an output through it) and no ReduceL2 (MNNConvert 3.6.1 reduces its
    opset-18 form over every axis) in any graph."""
    import onnx

    for comp in wan_export.components:
        ops = {n.op_type for n in onnx.load(str(comp.path), load_external_data=False).graph.node}
        assert not ops & {"If", "ReduceL2"}, comp.name


def test_converts_and_every_component_matches_onnx_runtime(wan_export, wan_bundle):
    from sd2mnn.verification.verify import verify

    bundle = wan_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["family"] == "wan" and (bundle / "tokenizer.mtok").is_file()
    assert sorted(manifest["components"]) == ["text_encoder", "transformer", "vae_decoder"]
    report = verify(wan_export.onnx_dir, bundle)
    assert [c.name for c in report.components] == ["text_encoder", "transformer", "vae_decoder"]
    for comp in report.components:
        assert min(o.psnr for o in comp.outputs) > 60, comp.name
    assert report.passed, report.failures
    # MNN's runtime ids, with the EOS the graph writes, against Hugging Face's (the umT5-like
    # tokenizer is trained on other text; what differs is trailing spaces and Viterbi ties).
    conditioning = report.conditioning
    assert conditioning.prompt_share >= 0.99 and conditioning.matching_cosine > 0.99999 and not conditioning.failures
    assert conditioning.padding_max == 0.0  # diffusers' zeroed padding, exactly


def test_verify_fails_a_text_encoder_that_attends_its_padding(wan_dir, wan_export, tmp_path):
    """MNN's Wan exporter runs UMT5 with a mask of ones: the padding is attended and its states
    kept. Converted, such a text encoder fits the runtime; verify's conditioning check says what
    it does instead of diffusers."""
    import shutil

    import torch

    from sd2mnn import convert
    from sd2mnn.verification.verify import verify

    class MaskOfOnes(torch.nn.Module):  # wan_onnx_export.py's text encoder wrapper
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            ids = input_ids.to(torch.int64)
            return self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state

    onnx = tmp_path / "onnx"
    shutil.copytree(wan_export.onnx_dir, onnx, ignore=shutil.ignore_patterns("text_encoder"))
    (onnx / "text_encoder").mkdir()
    model = load_wan_pipeline(wan_dir).text_encoder.eval()
    with torch.no_grad():
        torch.onnx.export(MaskOfOnes(model), (torch.ones(2, TEXT_LENGTH, dtype=torch.int32),),
                          str(onnx / "text_encoder" / "model.onnx"), input_names=["input_ids"],
                          output_names=["last_hidden_state"], opset_version=18, dynamo=False)
    convert(onnx, tmp_path / "mnn", components="text_encoder")
    report = verify(onnx, tmp_path / "mnn", components="text_encoder")
    conditioning = report.conditioning
    assert conditioning.matching_cosine > 0.99999 and conditioning.padding_max > 0.01
    assert conditioning.failures == [
        f"conditioning: the text encoder's states past the prompt are not zero (max |x| {conditioning.padding_max:.3g}): "
        "it attends to the padding, where diffusers masks it and zeroes them; export the text encoder with sd2mnn export"]
    assert not report.passed


def test_the_graph_eos_is_added_after_the_ids_and_taken_off_diffusers_ids():
    from sd2mnn.tokenization.prompt_ids import with_graph_eos, without_graph_eos

    runtime = np.array([[0, 0, 0, 0], [7, 8, 0, 0], [5, 6, 7, 8]], dtype=np.int32)
    seen = with_graph_eos(runtime, 1)
    assert seen.tolist() == [[1, 0, 0, 0], [7, 8, 1, 0], [5, 6, 7, 1]]  # a full row: cut, as diffusers truncates
    assert without_graph_eos(seen, 1).tolist() == [[0, 0, 0, 0], [7, 8, 0, 0], [5, 6, 7, 0]]
    assert with_graph_eos(without_graph_eos(seen, 1), 1).tolist() == seen.tolist()


def _l2_graph(path: Path, opset: int, op: str = "ReduceL2") -> Path:
    """latent_sample -> latent_sample / op(latent_sample, channels) named as the runtime's VAE."""
    import onnx
    from onnx import TensorProto, helper

    shape = WanDims(**SIZE).latent
    if opset >= 18:
        nodes = [helper.make_node(op, ["latent_sample", "axes"], ["norm"], keepdims=1)]
        initializers = [helper.make_tensor("axes", TensorProto.INT64, [1], [1])]
    else:
        nodes, initializers = [helper.make_node(op, ["latent_sample"], ["norm"], keepdims=1, axes=[1])], []
    nodes.append(helper.make_node("Div", ["latent_sample", "norm"], ["sample"]))
    graph = helper.make_graph(nodes, "l2", [helper.make_tensor_value_info("latent_sample", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("sample", TensorProto.FLOAT, shape)], initializer=initializers)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return path


@pytest.mark.parametrize("op", ["ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"])
def test_scan_counts_the_reductions_mnn_converts_over_every_axis(tmp_path, op):
    from sd2mnn.core.onnx_scan import check_mnn_computes_it, scan_onnx

    assert scan_onnx(_l2_graph(tmp_path / "17.onnx", 17, op)).reductions_with_axes_input == ()
    check_mnn_computes_it(scan_onnx(tmp_path / "17.onnx"))
    summary = scan_onnx(_l2_graph(tmp_path / "18.onnx", 18, op))
    assert summary.reductions_with_axes_input == (op,)
    with pytest.raises(InputError, match=f"1 {op} node.* reduction over every axis .*re-export at opset 17"):
        check_mnn_computes_it(summary)
    # ReduceMean and the others MNN converts through its own reducer, which takes axes as an input.
    assert scan_onnx(_l2_graph(tmp_path / "mean.onnx", 18, "ReduceMean")).reductions_with_axes_input == ()


def test_mnn_reduces_those_over_every_axis(tmp_path):
    """What the refusal is for: MNNConvert's ReduceSumSquare of [1, 16, T, h, w] over axis 1
    (opset 18) gives one number where ONNX Runtime gives [1, 1, T, h, w]."""
    import MNN.expr as F
    import MNN.nn as nn
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from sd2mnn.conversion.converter import find_converter

    shape = WanDims(**SIZE).latent
    graph = helper.make_graph([helper.make_node("ReduceSumSquare", ["x", "axes"], ["y"], keepdims=1)], "sq",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    model, converted = tmp_path / "sq.onnx", tmp_path / "sq.mnn"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(model))
    subprocess.run(find_converter().argv(["-f", "ONNX", "--modelFile", str(model), "--MNNModel", str(converted)]),
                   capture_output=True, check=True)
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    module = nn.load_module_from_file(str(converted), ["x"], ["y"])
    got = np.array(module.onForward([F.const(x, list(x.shape), F.NCHW)])[0].read())
    assert want.shape == (1, 1, *shape[2:]) and got.size == 1


def test_convert_refuses_a_graph_mnn_would_compute_otherwise(wan_export, tmp_path):
    import shutil

    onnx_dir = tmp_path / "onnx"
    shutil.copytree(wan_export.onnx_dir, onnx_dir)
    _l2_graph(onnx_dir / "vae_decoder" / "model.onnx", 18)
    done = subprocess.run([sys.executable, "-m", "sd2mnn.cli", "convert", str(onnx_dir), str(tmp_path / "mnn")],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "vae_decoder/model.onnx: 1 ReduceL2 node(s) take their axes as an input" in last
    assert not (tmp_path / "mnn").exists()


@pytest.fixture(scope="module")
def wan_bundle(wan_export, tmp_path_factory) -> Path:
    from sd2mnn import convert

    bundle = tmp_path_factory.mktemp("wan-mnn") / "mnn"
    convert(wan_export.onnx_dir, bundle)
    return bundle


def _frames(folder: Path) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(folder / f"frame_{i:04d}.png").convert("RGB")) for i in range(5)])


def test_generate_draws_the_runtime_recipe_as_diffusers_modules_compute_it(wan_dir, wan_export, tmp_path):
    """wan_diffusion.cpp's loop (its noise, float shift-3 timesteps, CFG on [uncond, cond], Euler
    by timestep differences, one VAE decode, frames rounded) run on the diffusers modules with
    diffusers' conditioning, against sd2mnn's on the exported graphs."""
    import torch

    from sd2mnn.generation.noise import initial_noise
    from sd2mnn.generation.pipeline import GenerationParams, Pipeline, decoded_to_frames
    from sd2mnn.schedulers.flow_match import wan_timesteps

    prompt, steps = "a cat walking in the snow", 3
    generation = Pipeline.from_onnx(wan_export.onnx_dir, threads=2).run(GenerationParams(prompt, steps=steps, seed=7))
    assert generation.is_video and generation.pixels.shape == (5, 64, 64, 3)

    pipe = load_wan_pipeline(wan_dir)
    latent = torch.from_numpy(initial_noise(7, tuple(WanDims(**SIZE).latent), "mnn"))
    timesteps = list(wan_timesteps(steps)) + [0.0]
    with torch.no_grad():
        conditioning = pipe._get_t5_prompt_embeds(["", prompt], max_sequence_length=TEXT_LENGTH)
        for t, following in zip(timesteps, timesteps[1:]):
            noise = pipe.transformer(hidden_states=torch.cat([latent, latent]), timestep=torch.full((2,), float(t)),
                                     encoder_hidden_states=conditioning, return_dict=False)[0]
            guided = noise[:1] + (noise[1:] - noise[:1]) * 5.0
            latent = latent + guided * ((following - float(t)) / 1000)
        shape = (1, pipe.vae.config.z_dim, 1, 1, 1)
        std = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(shape)
        video = pipe.vae.decode(latent / std + torch.tensor(pipe.vae.config.latents_mean).view(shape),
                                return_dict=False)[0].numpy()
    want = decoded_to_frames(video)
    assert np.abs(generation.pixels.astype(int) - want.astype(int)).max() <= 1


def test_diffusers_recipe_is_what_wan_pipeline_draws(wan_dir, wan_export):
    """--tokenizer hf --schedule diffusers: diffusers' ids and mask, UniPC, from the same latents,
    against diffusers' WanPipeline itself."""
    import torch

    from sd2mnn.generation.noise import initial_noise
    from sd2mnn.generation.pipeline import GenerationParams, Pipeline

    prompt, steps = "a red car on a bridge at night", 4
    latents = initial_noise(5, tuple(WanDims(**SIZE).latent), "mnn")
    params = GenerationParams(prompt, steps=steps, latents=latents, tokenizer="hf", schedule="diffusers")
    ours = Pipeline.from_onnx(wan_export.onnx_dir, threads=2).run(params)
    assert any("UniPC" in note for note in ours.notes)
    with torch.no_grad():
        video = load_wan_pipeline(wan_dir)(prompt, negative_prompt="", num_inference_steps=steps, guidance_scale=5.0,
                                            latents=torch.from_numpy(latents), output_type="np",
                                            max_sequence_length=TEXT_LENGTH, height=64, width=64,
                                            num_frames=5).frames[0]
    theirs = np.clip(np.round(video * 255), 0, 255).astype(np.uint8)
    assert theirs.shape == ours.pixels.shape == (5, 64, 64, 3)
    # The export's float error and diffusers' round-half-to-even against MNN's rounding: a level.
    assert np.abs(ours.pixels.astype(int) - theirs.astype(int)).max() <= 2


def test_unipc_steps_as_diffusers_scheduler():
    import torch
    from diffusers import UniPCMultistepScheduler

    from sd2mnn.schedulers.unipc import UniPCFlowScheduler

    for steps in (1, 2, 3, 20):
        theirs = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
        theirs.set_timesteps(steps)
        ours = UniPCFlowScheduler(steps)
        assert ours.timesteps.tolist() == theirs.timesteps.tolist() and (ours.sigmas == theirs.sigmas.numpy()).all()
        rng = np.random.default_rng(steps)
        x = rng.standard_normal((1, 16, 2, 4, 4)).astype(np.float32)
        y = torch.from_numpy(x.copy())
        for i, t in enumerate(theirs.timesteps):
            velocity = rng.standard_normal(x.shape).astype(np.float32)
            x, y = ours.step(velocity, i, x), theirs.step(torch.from_numpy(velocity), t, y).prev_sample
            assert np.abs(x - y.numpy()).max() <= 1e-5 * max(1.0, float(np.abs(x).max())), (steps, i)
    with pytest.raises(ValueError, match="step 0 is next, not 1"):
        UniPCFlowScheduler(3).step(x, 1, x)


def test_generate_on_mnn_draws_the_frames_onnx_runtime_draws(wan_export, wan_bundle, tmp_path):
    runs = {}
    for name, source in (("mnn", [str(wan_bundle)]), ("ort", ["--onnx", str(wan_export.onnx_dir)])):
        out = tmp_path / name
        done = subprocess.run([sys.executable, "-m", "sd2mnn.cli", "generate", *source, "a red car on a bridge",
                               "-o", str(out), "--steps", "3", "--seed", "3"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert sorted(p.name for p in out.iterdir()) == [f"frame_{i:04d}.png" for i in range(5)] + ["video.webp"]
        runs[name] = _frames(out)
    assert np.abs(runs["mnn"].astype(int) - runs["ort"].astype(int)).max() <= 2

    from PIL import Image

    animation = Image.open(tmp_path / "mnn" / "video.webp")
    assert animation.is_animated and animation.n_frames == 5
    for i in range(5):  # lossless: each frame as its PNG
        animation.seek(i)
        assert (np.asarray(animation.convert("RGB")) == runs["mnn"][i]).all()

    # compare, frame by frame, with one diff picture of the frames side by side
    compare = [sys.executable, "-m", "sd2mnn.cli", "compare", str(tmp_path / "mnn"), str(tmp_path / "ort")]
    done = subprocess.run([*compare, "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    from sd2mnn.core.images import psnr

    assert result["frame_psnr_db"] == [pytest.approx(psnr(x, y)) if psnr(x, y) != float("inf") else None
                                       for x, y in zip(runs["mnn"], runs["ort"])]
    assert (result["width"], result["height"]) == (64, 64) and result["max_abs_diff"] <= 2
    diff = Image.open(tmp_path / "mnn_vs_ort.diff.png")
    assert diff.size == (5 * 64, 64)
    done = subprocess.run([*compare[:-1], str(tmp_path / "ort" / "frame_0000.png"), "--no-diff"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].endswith(
        "is a video and " + str(tmp_path / "ort" / "frame_0000.png") + " an image; compare two images or two video folders")


def test_a_video_to_a_png_path_is_one_line(wan_bundle, tmp_path):
    done = subprocess.run([sys.executable, "-m", "sd2mnn.cli", "generate", str(wan_bundle), "a cat", "-o",
                           str(tmp_path / "clip.png")], capture_output=True, text=True)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "a video is a folder of frames" in done.stderr.strip().splitlines()[-1]
    assert not any(tmp_path.iterdir())


def test_bench_times_every_component_on_both_runtimes(wan_export, wan_bundle):
    from sd2mnn.measurement.bench import bench

    report = bench(wan_bundle, wan_export.onnx_dir, threads=1, runs=1)
    assert [c.name for c in report.components] == ["text_encoder", "transformer", "vae_decoder"]
    assert not report.errors
    for comp in report.components:
        assert all(comp.timings[r].median_s > 0 for r in ("mnn", "onnxruntime")), comp.name


@pytest.fixture(scope="module")
def mixed_sizes(wan_dir, wan_export, wan_bundle, tmp_path_factory) -> tuple[Path, Path]:
    """The ONNX folder and the bundle with their VAE decoder taken from an export of 9 frames
    (the others: 5), as a user copying parts of two exports together would have them."""
    import shutil

    from sd2mnn import convert

    root = tmp_path_factory.mktemp("wan-mixed")
    other = export(wan_dir, root / "onnx9", ExportOptions(components=("vae_decoder",), height=64, width=64, frames=9))
    convert(other.onnx_dir, root / "mnn9", components="vae_decoder")
    onnx, bundle = root / "onnx", root / "mnn"
    shutil.copytree(wan_export.onnx_dir, onnx, ignore=shutil.ignore_patterns("vae_decoder"))
    shutil.copytree(other.onnx_dir / "vae_decoder", onnx / "vae_decoder")
    shutil.copytree(wan_bundle, bundle)
    for name in ("vae_decoder.mnn", "vae_decoder.mnn.weight"):
        shutil.copy(root / "mnn9" / name, bundle / name)
    return onnx, bundle


def test_the_contract_refuses_parts_exported_at_different_sizes(mixed_sizes, wan_bundle):
    from sd2mnn.core.contract import check_contract

    assert check_contract(wan_bundle) == []
    issues = check_contract(mixed_sizes[1])
    assert [(i.component, i.kind) for i in issues] == [("vae_decoder", "size")]
    assert "latent channels, frames, height and width of transformer.mnn's 'hidden_states' ([16,2,8,8])" \
        in issues[0].expected
    assert issues[0].found.startswith("[16,3,8,8]: the parts were exported at different sizes")


def test_generate_refuses_parts_of_different_sizes_and_frames_not_exported(mixed_sizes, wan_bundle, tmp_path):
    cases = {"mixed": (["--onnx", str(mixed_sizes[0]), "a cat"],
                       "vae_decoder/model.onnx: takes 'latent_sample' with the latent channels, frames, height and "
                       "width of transformer/model.onnx's 'hidden_states' ([16,2,8,8]); it has [?,3,8,8]"),
             "frames": ([str(wan_bundle), "a cat", "--frames", "9"],
                        "vae_decoder.mnn draws 5 frames of 64x64 (fixed at export); --frames 9 needs a pipeline "
                        "exported at that size (sd2mnn export --frames)")}
    for name, (args, message) in cases.items():
        done = subprocess.run([sys.executable, "-m", "sd2mnn.cli", "generate", *args, "-o", str(tmp_path / name),
                               "--steps", "1"], capture_output=True, text=True)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert message in done.stderr.strip().splitlines()[-1]
    assert not any(tmp_path.iterdir())


def test_sweep_measures_wan_variants_of_every_part(wan_export, tmp_path):
    from sd2mnn.measurement.sweep import sweep

    report = sweep(wan_export.onnx_dir, tmp_path / "sweep", "fp32,w8", min_psnr=20, runs=1)
    assert [(v.name, v.status) for v in report.variants] == [("fp32", "ok"), ("w8", "ok")], \
        [v.error for v in report.variants]
    fp32, w8 = report.variants
    assert w8.size_bytes < fp32.size_bytes and fp32.fidelity > w8.fidelity > 20
    assert sorted(report.reference) == ["text_encoder", "transformer", "vae_decoder"]
    assert not report.off_contract
    assert json.loads((tmp_path / "sweep" / "w8" / "manifest.json").read_text())["family"] == "wan"
