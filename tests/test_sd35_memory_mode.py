"""When SD3.5's models are loaded and freed: diffusion_sd35.cpp's rule per memory_mode (MNN
3.6.1, SD35:n its lines), observed through the pipeline's own record of loads, calls and
releases (Pipeline.model_events) on the tiny SD3 bundle, and the image the same in every mode.

The rule: ``load()`` loads no model (SD35:52-111); ``loadModule(i)`` loads each just before its
first use (CLIP-L 181, CLIP-G 196, T5 212, the transformer 342, the VAE decoder 369); with a
memory_mode other than 1 each is freed once used (``run_encoder`` 172-176 for the text
encoders, ``unload_module`` 367 and 376); mode 1 keeps each loaded.
"""
from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

from sd2mnn.cli import build_parser  # noqa: E402
from sd2mnn.cli.generate import _generate  # noqa: E402
from sd2mnn.families import SD15  # noqa: E402
from sd2mnn.core.images import read_image  # noqa: E402
from sd2mnn.generation.pipeline import GenerationParams, Pipeline, mnn_runtime_config  # noqa: E402

PROMPT = "a photo of a cat"
STEPS = 2
ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
ALL_FIVE = (*ENCODERS, "transformer", "vae_decoder")


def diffusion_sd35_events(memory_mode: int, steps: int) -> list[tuple[str, str]]:
    """(action, model) for what DiffusionSD35::run() does to its modules for one prompt, from
    nothing loaded."""
    frees = memory_mode != 1
    events = []
    for name in ENCODERS:  # encode_prompt(): loadModule, forward, reset unless mode 1
        events += [("load", name), ("run", name)] + [("release", name)] * frees
    events += [("load", "transformer")] + [("run", "transformer")] * steps + [("release", "transformer")] * frees
    return events + [("load", "vae_decoder"), ("run", "vae_decoder")] + [("release", "vae_decoder")] * frees


def recorded(pipeline) -> list[tuple[str, str]]:
    return [(event.action, event.model) for event in pipeline.model_events]


def held_at_each_call(events: list[tuple[str, str]]) -> list[tuple[str, set[str]]]:
    """(model called, the models loaded at that call), from a record of events."""
    held, calls = set(), []
    for action, model in events:
        if action == "load":
            held.add(model)
        elif action == "release":
            held.discard(model)
        else:
            calls.append((model, set(held)))
    return calls


@pytest.fixture(scope="module")
def config(tiny_sd3_bundle):
    from sd2mnn import families

    return mnn_runtime_config(threads=2, family=families.detect(tiny_sd3_bundle))


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_models_are_loaded_at_first_use_and_freed_after_it_unless_mode_1(tiny_sd3_bundle, config, mode):
    pipeline = Pipeline(tiny_sd3_bundle, config=config, memory_mode=mode)
    assert pipeline.held == () and pipeline.model_events == []  # load(): tokenizers only
    first = pipeline.run(GenerationParams(PROMPT, steps=STEPS, seed=7))
    assert recorded(pipeline) == diffusion_sd35_events(mode, STEPS)
    calls = held_at_each_call(recorded(pipeline))
    if mode == 1:
        assert pipeline.held == ALL_FIVE
        assert calls[-1] == ("vae_decoder", set(ALL_FIVE))
    else:  # one model in memory at a time
        assert pipeline.held == ()
        assert all(held == {model} for model, held in calls), calls
    # A second prompt: mode 1 loads nothing more; 0 and 2 load each model again.
    del pipeline.model_events[:]
    second = pipeline.run(GenerationParams(PROMPT, steps=STEPS, seed=7))
    again = diffusion_sd35_events(mode, STEPS)
    assert recorded(pipeline) == ([e for e in again if e[0] == "run"] if mode == 1 else again)
    assert (first.pixels == second.pixels).all()


def test_every_memory_mode_draws_the_same_image_from_the_cli(tiny_sd3_bundle, tmp_path):
    """generate --memory-mode N: the C++'s loads and releases for N, the same pixels in all."""
    images = {}
    for mode in (0, 1, 2):
        out = tmp_path / f"mode{mode}.png"
        args = build_parser().parse_args(["generate", str(tiny_sd3_bundle), PROMPT, "-o", str(out), "--steps",
                                          str(STEPS), "--seed", "5", "--threads", "2", "--memory-mode", str(mode)])
        pipeline, _ = _generate(args, tiny_sd3_bundle, PROMPT, out, None)
        assert recorded(pipeline) == diffusion_sd35_events(mode, STEPS)
        images[mode], _ = read_image(out)
    assert images[0].std() > 5  # a picture, not a flat field
    assert (images[0] == images[1]).all() and (images[2] == images[1]).all()


def test_a_model_mnn_cannot_read_is_refused_before_any_model_loads(tiny_sd3_bundle, config, tmp_path):
    """Loaded only when first used, a damaged VAE decoder would fail after every step: it is
    refused when the pipeline is made, in one line."""
    import shutil

    from sd2mnn.errors import InputError

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sd3_bundle, bundle)
    (bundle / "manifest.json").unlink()  # else its recorded sizes refuse the file first
    (bundle / "vae_decoder.mnn").write_bytes(b"not a model" * 100)
    with pytest.raises(InputError) as raised:
        Pipeline(bundle, config=config, memory_mode=0)
    assert str(raised.value) == (f"MNN cannot read {bundle / 'vae_decoder.mnn'}; reconvert it (sd2mnn convert "
                                 "--overwrite), or check it with sd2mnn verify")


def test_sd15_keeps_its_three_models_loaded_in_every_mode(fp32_bundle):
    for mode in (0, 2):
        pipeline = Pipeline(fp32_bundle, config=mnn_runtime_config(threads=2, memory_mode=mode, family=SD15), memory_mode=mode)
        assert pipeline.held == ("text_encoder", "unet", "vae_decoder")
        pipeline.run(GenerationParams(PROMPT, steps=1, seed=1))
        assert pipeline.held == ("text_encoder", "unet", "vae_decoder")
        assert not any(e.action == "release" for e in pipeline.model_events)
