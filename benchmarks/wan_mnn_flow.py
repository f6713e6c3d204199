"""What each of MNN's own Wan export choices costs in the video, against diffusers' modules.

    python benchmarks/wan_mnn_flow.py WORK [--steps 4,20] [--seeds 0,1] [--threads 2]
                                      [--mnn-src /work/mnn-src] [--skip-mnn-export] [--json out.json]

A tiny diffusers Wan2.1 pipeline (tests/builders.py, random weights, 64x64, 5 frames; built in
WORK/diffusers or reused) draws every video with MNN's runtime recipe (wan_diffusion.cpp runVideo:
std::mt19937 noise, float timesteps 1000 * shift(t) with shift 3, CFG 5 on [uncond "", prompt],
Euler by the timesteps' difference over 1000, frames rounded as saveFrame does) from the same
latents, so only the graphs differ. The reference runs that loop in torch on diffusers' modules
with diffusers' conditioning (WanPipeline._get_t5_prompt_embeds) and WanPipeline's VAE
de-normalisation; each variant swaps in MNN's choice for a part, run by MNN's own wrapper classes
(MNN_SRC/transformers/diffusion/export/wan/wan_onnx_export.py) on the same modules in eager torch,
or T5's weights as MNNConvert stores them under wan_convert_mnn.py's default 8 bits
(sd2mnn.quantization.fake_quant); a last row runs sd2mnn's own export (WORK/onnx) on ONNX Runtime.
Reported per steps and variant: PSNR per frame against the reference, 8-bit RGB, mean and worst
over prompts x seeds x frames, and the largest level difference. Unless --skip-mnn-export, MNN's
exporter is run on the same modules (its loader, which needs accelerate, swapped for the tests')
to say per part whether torch's TorchScript ONNX exporter writes it at MNN's opset 17.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sd2mnn.core.images import psnr
from sd2mnn.exporting.export import ExportOptions, export
from sd2mnn.families.wan import TEXT_LENGTH, WAN, WanDims
from sd2mnn.generation.noise import initial_noise
from sd2mnn.generation.pipeline import GenerationParams, Pipeline, decoded_to_frames
from sd2mnn.quantization.compression import LayerBits
from sd2mnn.quantization.fake_quant import quantize_rows
from sd2mnn.schedulers.flow_match import wan_timesteps

PROMPTS = ("a cat walking in the snow", "a red car on a bridge at night, cinematic",
           "waves crashing on rocks at sunset")
SIZE = dict(height=64, width=64, frames=5)
# name -> (text encoder, transformer, VAE): "diffusers", or "mnn" for MNN's wrapper; "+8bit": T5 at 8 bits.
# MNN's text encoder reaches the transformer only through that wrapper's mask, so its row takes both.
VARIANTS = {
    "text encoder as MNN's (mask of ones, no EOS)": ("mnn", "mnn", "diffusers"),
    "transformer's mask as MNN's (drops the EOS state)": ("diffusers", "mnn", "diffusers"),
    "VAE de-normalisation as MNN's": ("diffusers", "diffusers", "mnn"),
    "T5 weights 8-bit (MNN's converter default)": ("diffusers+8bit", "diffusers", "diffusers"),
    "MNN's three graphs together": ("mnn", "mnn", "mnn"),
    "MNN's flow (three graphs, T5 8-bit)": ("mnn+8bit", "mnn", "mnn"),
}
OURS = "sd2mnn's export (ONNX Runtime)"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def quantized_t5(text_encoder):
    """A copy with every linear weight as MNNConvert 3.6.1 stores it under wan_convert_mnn.py's
    ``--weightQuantBits=8 --weightQuantBlock=128`` (asymmetric, its config default); a layer whose
    input width 128 does not divide gets one scale per row (WeightQuantAndCoding.cpp)."""
    model = copy.deepcopy(text_encoder)
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            block = 128 if layer.in_features % 128 == 0 else 0
            rows = quantize_rows(layer.weight.detach().numpy(), 1, LayerBits(8, block, asymmetric=True))
            layer.weight.data = torch.from_numpy(rows)
    return model


class Draw:
    """MNN's runtime loop on diffusers' modules, each part as diffusers or MNN's wrapper runs it."""

    def __init__(self, pipe, mnn):
        self.pipe, self.mnn, self.guidance = pipe, mnn, WAN.recipe.guidance
        self.encoders = {"diffusers": pipe.text_encoder, "diffusers+8bit": quantized_t5(pipe.text_encoder)}
        shape = (1, pipe.vae.config.z_dim, 1, 1, 1)
        self.inverse_std = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(shape)
        self.mean = torch.tensor(pipe.vae.config.latents_mean).view(shape)

    def runtime_ids(self, prompt: str):
        # wan_diffusion.cpp encodePrompt: the tokenizer's ids, no EOS, cut or padded with 0 to 512.
        rows = [self.pipe.tokenizer(p, add_special_tokens=False)["input_ids"][:TEXT_LENGTH] for p in ("", prompt)]
        return torch.tensor([r + [0] * (TEXT_LENGTH - len(r)) for r in rows], dtype=torch.int32)

    def conditioning(self, kind: str, prompt: str):
        encoder = self.encoders[kind.replace("mnn", "diffusers")]
        if kind.startswith("mnn"):
            return self.mnn.TextEncoderWrapper(torch, encoder)(self.runtime_ids(prompt))
        original, self.pipe.text_encoder = self.pipe.text_encoder, encoder
        try:
            return self.pipe._get_t5_prompt_embeds(["", prompt], max_sequence_length=TEXT_LENGTH)
        finally:
            self.pipe.text_encoder = original

    def latents(self, text: str, transformer: str, prompt: str, start, steps: int):
        conditioning = self.conditioning(text, prompt)
        mask = (self.runtime_ids(prompt) != 0).to(torch.int32)  # encodePrompt's mask, as the runtime feeds it
        wrapper = self.mnn.TransformerWrapper(torch, self.pipe.transformer)
        latent, timesteps = start, [float(t) for t in wan_timesteps(steps)] + [0.0]
        for t, following in zip(timesteps, timesteps[1:]):
            pair, timestep = torch.cat([latent, latent]), torch.full((2,), t)
            if transformer == "mnn":
                noise = wrapper(pair, timestep, conditioning, mask)
            else:
                noise = self.pipe.transformer(hidden_states=pair, timestep=timestep,
                                              encoder_hidden_states=conditioning, return_dict=False)[0]
            guided = noise[:1] + (noise[1:] - noise[:1]) * self.guidance
            latent = latent + guided * ((following - t) / 1000)
        return latent

    def frames(self, vae: str, latent):
        if vae == "mnn":
            video = self.mnn.VaeDecoderWrapper(self.pipe.vae)(latent)
        else:  # WanPipeline: latents / (1 / std) + mean
            video = self.pipe.vae.decode(latent / self.inverse_std + self.mean, return_dict=False)[0]
        return decoded_to_frames(video.numpy())


@contextlib.contextmanager
def silenced():
    """Descriptors 1 and 2 to /dev/null: torch prints a failed export's whole graph from C++."""
    sys.stdout.flush(), sys.stderr.flush()
    saved, null = (os.dup(1), os.dup(2)), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1), os.dup2(null, 2)
    try:
        yield
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd), os.close(old)
        os.close(null)


def try_mnn_export(mnn, pipe, folder: Path, out: Path) -> dict[str, str]:
    """MNN's export_models per part on the same modules: "exported", or the error's first line.
    Its own loader (WanPipeline.from_pretrained) needs accelerate for WanTransformer3DModel."""
    mnn.load_wan_components = lambda *_: mnn.WanComponents(pipe.text_encoder, pipe.transformer, pipe.vae,
                                                           pipe.tokenizer, "load_wan_pipeline")
    results = {}
    for part in ("text_encoder", "transformer", "vae_decoder"):
        args = argparse.Namespace(model_path=str(folder), output_path=str(out), opset=17, dtype="fp32", fp16=False,
                                  width=SIZE["width"], height=SIZE["height"], frames=SIZE["frames"],
                                  text_len=TEXT_LENGTH, device=None, module=[part], align_manifest=None)
        try:
            with silenced():
                mnn.export_models(args)
            results[part] = "exported"
        except Exception as err:  # noqa: BLE001 - whatever the exporter raised is the finding
            results[part] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return results


def summary(scores: list[tuple[float, int]]) -> dict:
    finite = [p for p, _ in scores if math.isfinite(p)]
    return {"frames": len(scores), "mean_psnr_db": statistics.mean(finite) if finite else math.inf,
            "worst_psnr_db": min(p for p, _ in scores), "max_level_diff": max(d for _, d in scores)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path, help="folder of the tiny pipeline (diffusers/) and its export (onnx/)")
    parser.add_argument("--steps", type=_ints, default=[4, 20])
    parser.add_argument("--seeds", type=_ints, default=[0, 1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mnn-src", type=Path, default=Path("/work/mnn-src"), help="MNN 3.6.1's source tree")
    parser.add_argument("--skip-mnn-export", action="store_true", help="do not try MNN's exporter")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    exporter = args.mnn_src / "transformers/diffusion/export/wan/wan_onnx_export.py"
    if not exporter.exists():
        parser.error(f"--mnn-src: no {exporter}")
    spec = importlib.util.spec_from_file_location("wan_onnx_export", exporter)
    mnn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mnn)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from builders import load_wan_pipeline, make_tiny_wan_pipeline

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    folder, onnx_dir = args.work / "diffusers", args.work / "onnx"
    if not (folder / "model_index.json").exists():
        make_tiny_wan_pipeline(folder)
    if not (onnx_dir / "transformer" / "model.onnx").exists():
        export(folder, onnx_dir, ExportOptions(**SIZE))
    pipe = load_wan_pipeline(folder)
    draw, ours = Draw(pipe, mnn), Pipeline.from_onnx(onnx_dir, threads=args.threads)
    # The loops each variant needs: the reference's and one per (text encoder, transformer) pair.
    loops = {("diffusers", "diffusers"), *((text, transformer) for text, transformer, _ in VARIANTS.values())}
    rows = []
    with torch.no_grad():
        for steps in args.steps:
            scores = {name: [] for name in [*VARIANTS, OURS]}
            for prompt in PROMPTS:
                for seed in args.seeds:
                    noise = initial_noise(seed, tuple(WanDims(**SIZE).latent), "mnn")
                    finals = {key: draw.latents(*key, prompt, torch.from_numpy(noise), steps) for key in loops}
                    reference = draw.frames("diffusers", finals["diffusers", "diffusers"])
                    videos = {name: draw.frames(vae, finals[text, transformer])
                              for name, (text, transformer, vae) in VARIANTS.items()}
                    videos[OURS] = ours.run(GenerationParams(prompt, steps=steps, latents=noise)).pixels
                    for name, video in videos.items():
                        scores[name] += [(psnr(f, r), int(np.abs(f.astype(int) - r.astype(int)).max()))
                                         for f, r in zip(video, reference)]
            rows += [{"steps": steps, "variant": name, **summary(values)} for name, values in scores.items()]

    export_try = {} if args.skip_mnn_export else try_mnn_export(mnn, pipe, folder, args.work / "mnn-export")
    elapsed = time.perf_counter() - started
    print(f"Wan: MNN's export choices against diffusers' modules; tiny Wan (64x64, 5 frames, random weights), "
          f"{len(PROMPTS)} prompts x seeds {args.seeds}, MNN's runtime recipe (flow-match Euler, shift 3, CFG "
          f"{draw.guidance:g}), PSNR per frame ({len(PROMPTS) * len(args.seeds) * SIZE['frames']} a row), 8-bit RGB; "
          f"torch {torch.__version__}, {args.threads} threads\n")
    print("| steps | variant | PSNR vs reference, mean | worst | max level diff |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['steps']} | {r['variant']} | {r['mean_psnr_db']:.1f} dB | {r['worst_psnr_db']:.1f} dB | "
              f"{r['max_level_diff']} |")
    if export_try:
        print("\n" + "\n".join(f"MNN's wan_onnx_export.py, {part} (opset 17): {out}"
                                for part, out in export_try.items()))
    print(f"\n{elapsed:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"size": SIZE, "prompts": PROMPTS, "seeds": args.seeds, "rows": rows,
                                         "mnn_export": export_try, "torch": torch.__version__,
                                         "seconds": round(elapsed)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
