"""SD3.5: the steps of MNN's ``DiffusionSD35`` runtime between the text encoders and the VAE
decoder, read line by line from transformers/diffusion/engine/src/diffusion_sd35.cpp (MNN 3.6.1;
``SD35:n`` cites its lines).

``encode_prompt()`` (SD35:162-246)
    CLIP-L (``text_encoder``) and CLIP-G (``text_encoder_2``) each take ``[uncond "", prompt]``
    ids, int32 [2, 77] (MtokTokenizer kPair, BOS/EOS 49406/49407, padded with 0), and give
    ``last_hidden_state`` and ``text_embeds``. T5 (``text_encoder_3``) takes ``encode("")`` and
    ``encode(prompt)`` (kSingle: no BOS, EOS 1, padded with 0 to 256); when its model does not
    load, zeros [2, 256, 4096] stand in for its output (SD35:146-151, 228).
    ``encoder_hidden_states = concat(concat(clip_l, clip_g, -1) zero-padded to 4096, t5, axis 1)``
    ([2, 77+256, 4096]); ``pooled_projections = concat(text_embeds_l, text_embeds_g, -1)``.
``run()`` (SD35:286-379)
    noise [1,16,128,128] from std::mt19937 (sd2mnn.generation.noise), ``mTimeSteps`` int-truncated
    (sd2mnn.schedulers.flow_match), per step ``hidden_states = [x, x]``, ``timestep`` float
    [2] both the step's integer, CFG ``uncond + (text - uncond) * 5.0``, Euler step.
``vae_decoder()`` (SD35:269-285)
    ``latent * (1 / 1.5305f) + 0.0609f``, then the SD1.5 image arithmetic (clamp by
    Maximum/Minimum instead of Relu6: the same for finite values), cvtColor, imwrite.
Model lifetime (``memory_mode``, SD35:52-159, 165-176, 286-378)
    ``load()`` loads the tokenizers only, in every mode; ``loadModule(i)`` loads a model just
    before its first use (CLIP-L 181, CLIP-G 196, T5 212, the transformer 342 before the first
    step, the VAE decoder 369), after a full garbage collection. With ``memory_mode`` other than
    1 each is freed once used: each text encoder right after its forward (``run_encoder``, 172),
    the transformer after the last step (367), the VAE decoder after ``imwrite`` (376); mode 1
    keeps each to the end. (diffusion_sd35_demo says mode 1 initializes every model at start;
    the code does not.) Only when models live changes: the pixels are the same in every mode.

What the C++ hard-codes and sd2mnn takes from the models instead (so small test models run;
each departure from the runtime's shapes is reported as off-contract): 77 and 256 tokens (the
text encoders' ``input_ids``), the 2048-wide zero padding (``4096 - 2048`` at SD35:236, whatever
the CLIPs' widths: here the transformer's width minus theirs), the T5 zeros' [256, 4096] (the
transformer's sequence minus the CLIPs' length, its width), the 16x128x128 latents and the
1024x1024 image (the transformer's ``hidden_states``).

Where the runtime's recipe departs from diffusers' ``StableDiffusion3Pipeline`` (diffusers 0.3x,
``pipeline_stable_diffusion_3.py``), so what ``benchmarks/sd35_recipe_fidelity.py`` measures:

* Timesteps (SD35:296-310): MNN stores ``1000 * shift(t)`` in an ``int`` vector, so the
  transformer sees truncated integers and the Euler steps use sigmas rounded down to 1/1000, and
  its schedule ends at ``shift(1/1000)``; diffusers feeds float ``1000 * sigma`` and ends its
  linspace at the already shifted ``sigma_min``, shifting it twice (flow_match.py).
* Padding (tokenizer.cpp ``encodeSingle``): MNN pads every CLIP row with id 0; diffusers pads
  CLIP-L with its pad token ``<|endoftext|>`` (49407; CLIP-G's is "!", id 0). The CLIPs are
  causal, so only the states after the prompt change, but all 77 condition the transformer. A
  bundle converted with sd2mnn's default ``--tokenizer-scheme diffusers`` feeds CLIP-L diffusers' ids
  (its text encoder rewrites the padding); ``--tokenizer-scheme mnn`` keeps MNN's.
* Size (SD35:317-321): 1024x1024 whatever the models; diffusers draws any multiple of 16
  (here: the size the transformer was exported at).
* The VAE's scaling and shift are constants (SD35:270-273), not the VAE's config (the same
  numbers for SD3.5 Medium); the image is rounded half away from zero (``_Round``), diffusers'
  numpy postprocess rounds half to even (one level, on pixels that land exactly on .5).
* Guidance 5.0 fixed (diffusers: ``guidance_scale``, default 7.0); the unconditional prompt is
  always "" (diffusers: ``negative_prompt``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sd2mnn.core.runtime import MNN_GPU_MEMORY_BUFFER, RuntimeConfig
from sd2mnn.errors import InputError
from sd2mnn.families.sd35 import RUNTIME_DIMS, SD35Dims
from sd2mnn.recipes.lifetime import ModelLifetime

CLIP_L, CLIP_G, T5 = "text_encoder", "text_encoder_2", "text_encoder_3"


def join_text_states(clip_l: np.ndarray, clip_g: np.ndarray, t5: np.ndarray | None, width: int,
                     t5_length: int) -> np.ndarray:
    """``encoder_hidden_states``: CLIP-L and CLIP-G side by side, zeros up to ``width``, then T5's
    states (zeros [2, t5_length, width] without T5) after them on the sequence axis."""
    clip = np.concatenate([clip_l, clip_g], axis=-1)
    padding = np.zeros((*clip.shape[:2], width - clip.shape[-1]), dtype=np.float32)
    if t5 is None:
        t5 = np.zeros((clip.shape[0], t5_length, width), dtype=np.float32)
    return np.concatenate([np.concatenate([clip, padding], axis=-1), t5], axis=1).astype(np.float32)


def transformer_feeds(latent: np.ndarray, timestep, text: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """SD35:345-349: ``_Concat({sample, sample}, 0)``, ``_Const(t, {2})`` with ``float t =
    mTimeSteps[i]`` (an integer there; a fraction in the diffusers recipe)."""
    return {
        "hidden_states": np.concatenate([latent, latent], axis=0),
        "encoder_hidden_states": text["encoder_hidden_states"],
        "pooled_projections": text["pooled_projections"],
        "timestep": np.full(2, timestep, dtype=np.float32),
    }


def model_dims(shapes: dict[str, dict[str, list[int]]]) -> SD35Dims:
    """The models' widths and sizes from their tensors' shapes; what none says is the runtime's."""
    return SD35Dims.from_tensors({c: {t: ("", list(d)) for t, d in s.items()} for c, s in shapes.items()})


@dataclass(frozen=True)
class SD35Steps:
    latent_input: str = "hidden_states"

    def condition(self, outputs: dict[str, dict[str, np.ndarray]], shapes,
                  files: dict[str, str] | None = None) -> dict[str, np.ndarray]:
        """The transformer's text inputs from the text encoders' outputs (T5 absent: zeros)."""
        files = files or {}
        dims = model_dims(shapes)
        clip_l, clip_g = outputs[CLIP_L]["last_hidden_state"], outputs[CLIP_G]["last_hidden_state"]
        t5 = outputs[T5]["last_hidden_state"] if T5 in outputs else None
        clip_width = clip_l.shape[-1] + clip_g.shape[-1]
        if clip_width > dims.joint:
            raise InputError(f"{files.get('transformer', 'transformer')} takes text states {dims.joint} wide, but CLIP-L "
                             f"and CLIP-G give {clip_width}; export the text encoders and the transformer of one model")
        if t5 is not None and t5.shape[-1] != dims.joint:
            raise InputError(f"{files.get(T5, T5)} gives states {t5.shape[-1]} wide, the transformer takes {dims.joint}; "
                             "export the text encoders and the transformer of one model")
        # Without T5: its length is what the transformer's sequence leaves after the CLIPs'.
        sequence = (shapes.get("transformer", {}).get("encoder_hidden_states") or [0, 0])[1]
        t5_length = sequence - dims.clip_length if sequence > dims.clip_length else RUNTIME_DIMS.t5_length
        states = join_text_states(clip_l, clip_g, t5, dims.joint, t5_length)
        pooled = np.concatenate([outputs[CLIP_L]["text_embeds"], outputs[CLIP_G]["text_embeds"]], axis=-1)
        return {"encoder_hidden_states": states, "pooled_projections": pooled.astype(np.float32)}

    def denoiser_feeds(self, latent: np.ndarray, timestep, text: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return transformer_feeds(latent, timestep, text)

    def contract_notes(self, inputs: dict[str, dict[str, list[int]]], outputs: dict[str, dict[str, list[int]]],
                       files: dict[str, str], family) -> list[str]:
        """The models' sizes against those diffusion_sd35.cpp fixes (SD35Dims.off_contract)."""
        shapes = {c: {**outputs.get(c, {}), **inputs.get(c, {})} for c in {*inputs, *outputs}}
        issues = model_dims(shapes).off_contract()
        return [f"MNN's runtime would refuse these models' sizes: {', '.join(issues)}"] if issues else []

    def model_lifetime(self, memory_mode: int) -> ModelLifetime:
        """Each model loaded before its first use; freed after it unless ``memory_mode`` is 1."""
        return ModelLifetime(at_start=False, release_after_use=memory_mode != 1)

    def runtime_config(self, backend: str, threads: int, precision: str, memory_mode: int,
                       cache_file: str | None) -> RuntimeConfig:
        """``DiffusionSD35::load()``: the CPU settings without any hint; OpenCL with buffer memory,
        no tuning flag, Winograd off. ``memory_mode`` changes no setting (only the model lifetime)."""
        backend = backend.upper()
        if backend == "CPU":
            return RuntimeConfig(backend=backend, threads=threads, precision=precision, memory="low", cache_file=cache_file)
        threads = MNN_GPU_MEMORY_BUFFER if backend == "OPENCL" else 1
        return RuntimeConfig(backend=backend, threads=threads, precision=precision, memory="low", cache_file=cache_file,
                             winograd=backend != "OPENCL")


STEPS = SD35Steps()
