"""Does sd2mnn quantize's sensitivity (ONNX Runtime, MNN's quantization in numpy) rank layers as
real MNN conversions do?

    python benchmarks/sensitivity_ranking.py [ONNX_DIR] [--component unet] [--bits 4] [--json out.json]

For every layer of the component (default: the demo pipeline's unet, 83 layers): the output PSNR
against ONNX Runtime when that layer alone is stored at --bits and the rest stay float,
 - measured: MNNConvert with a compression file saying so, the model run on MNN on all of sd2mnn
   verify's inputs for the component (PSNR as verify reads it: the worst output and case);
 - proxy: what sd2mnn quantize measures (sd2mnn.quantization.sensitivity.measure: ONNX Runtime
   with the layer's weights quantized in numpy, on verify's first input, its default).
Prints the Spearman rank correlation of the two, the largest difference in dB and the times.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(values):
        order = np.argsort(values, kind="stable")
        result = np.empty(len(values))
        result[order] = np.arange(len(values))
        return result

    return float(np.corrcoef(ranks(np.array(a)), ranks(np.array(b)))[0, 1])


def main(argv: list[str] | None = None) -> int:
    from sd2mnn.core.demo import demo_pipeline_dir
    from sd2mnn.core.layout import folder_family
    from sd2mnn.core.runtime import MnnModel, RuntimeConfig
    from sd2mnn.quantization.compression import FLOAT_BITS, LayerBits, quantizable_layers, write_compression_file
    from sd2mnn.quantization.sensitivity import measure, noise_psnr, output_noise
    from sd2mnn.verification.verify import component_feeds

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx_dir", nargs="?", type=Path, default=demo_pipeline_dir())
    parser.add_argument("--component", default="unet")
    parser.add_argument("--bits", default="4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    family = folder_family(args.onnx_dir)
    spec = family.components[args.component]
    model = args.onnx_dir / args.component / "model.onnx"
    layers = list(quantizable_layers(model).values())
    setting = LayerBits.parse(args.bits)
    feeds = component_feeds(args.onnx_dir, args.component, family)

    started = time.monotonic()
    costs = measure(model, layers, feeds[:1], setting, [setting], args.threads)
    proxy_s = time.monotonic() - started
    proxy = [noise_psnr(c.noise) for c in costs]

    from sd2mnn.core.runtime import OrtModel

    reference = [OrtModel(model, threads=args.threads).run(case) for case in feeds]
    measured = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for index, layer in enumerate(layers):
            choice = {other.op_name: setting if other is layer else LayerBits(FLOAT_BITS) for other in layers}
            write_compression_file(work / "one.json", choice)
            done = subprocess.run([sys.executable, "-m", "sd2mnn.conversion._mnnconvert", "-f", "ONNX", "--modelFile",
                                   str(model), "--MNNModel", str(work / "one.mnn"), "--saveExternalData=1",
                                   "--compressionParamsFile", str(work / "one.json")],
                                  capture_output=True, text=True, cwd=work)
            if "Converted Success" not in done.stdout:
                raise SystemExit(f"{layer.op_name}: the conversion failed:\n{done.stdout[-2000:]}")
            mnn = MnnModel(work / "one.mnn", list(spec.inputs), list(spec.outputs),
                           RuntimeConfig(threads=args.threads, precision="high"))
            outputs = [{k: v for k, v in mnn.run(case).items() if k in spec.outputs} for case in feeds]
            del mnn
            refs = [{k: v for k, v in r.items() if k in spec.outputs} for r in reference]
            measured.append(noise_psnr(output_noise(refs, outputs)))
            print(f"{index + 1}/{len(layers)} {layer.op_name}: measured {measured[-1]:.2f} dB, proxy {proxy[index]:.2f} dB",
                  file=sys.stderr, flush=True)
    measured_s = time.monotonic() - started

    rho = spearman(measured, proxy)
    worst = max(abs(m - p) for m, p in zip(measured, proxy))
    print(f"{args.component} of {args.onnx_dir}: {len(layers)} layers, each alone at {setting.label} bits")
    print(f"Spearman rank correlation, proxy vs measured: {rho:.4f}")
    print(f"largest |proxy - measured|: {worst:.2f} dB (proxy on verify's first input, measured on all {len(feeds)})")
    print(f"time: proxy {proxy_s:.1f} s, {len(layers)} conversions + MNN runs {measured_s:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"layers": [l.op_name for l in layers], "measured_psnr": measured,
                                         "proxy_psnr": proxy, "spearman": rho, "proxy_s": proxy_s,
                                         "measured_s": measured_s}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
