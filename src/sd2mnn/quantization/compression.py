"""MNN's per-layer compression file, and the layers of an ONNX model it can name.

``MNNConvert --compressionParamsFile F.json`` reads, per layer, the bits its weights are stored
with (MNN 3.6.1, tools/converter/source/common/WeightQuantAndCoding.cpp):

    {"version": "3.6.1", "forGuide": true, "algo": [{"type": "QUANTIZE", "quantParams": {"layer": [
        {"opName": "/model/conv_in/Conv_output_0",
         "weight": [{"name": "...", "bits": 4, "asymmetric": true, "blockSize": 64}]}, ...]}}]}

``bits`` 2-8 quantize (MNN clamps anything else into 2..8), 0 keeps the layer's weights float;
``blockSize`` > 0 gives each block of that many input channels its own scale (MNN takes it only
when it is a multiple of 16 that divides the layer's input channels, else it falls back to one
scale per output channel); ``forGuide`` true says the file is weight-only (without it MNN reads
it as a full int8 calibration). A layer the file does not list gets the command line's flags.

MNN names a layer after the tensor its operator computes: a Conv's output, or for a MatMul or
Gemm with constant weights (turned into a 1x1 convolution) the output with ``__matmul_converted``
appended, the MatMul's bias Add's output when MNN folds the Add in. ``quantizable_layers`` reads
that from the ONNX graph (no weights loaded), which is how a file is checked against a model.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from sd2mnn.errors import InputError

MATMUL_SUFFIX = "__matmul_converted"
FLOAT_BITS = 0  # a layer kept float
FLOAT_LABEL = "float"
MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True, order=True)
class LayerBits:
    """How one layer's weights are stored."""

    bits: int  # 2..8, or FLOAT_BITS
    block_size: int = 0  # input channels per scale; 0: one scale per output channel
    asymmetric: bool = True  # MNNConvert's default (a min and a scale per block)

    def __post_init__(self):
        if self.bits != FLOAT_BITS and not MIN_BITS <= self.bits <= MAX_BITS:
            raise InputError(f"bits must be {FLOAT_BITS} (float) or {MIN_BITS}-{MAX_BITS}, got {self.bits}")
        if self.block_size < 0 or (self.block_size and self.block_size % 16):
            raise InputError(f"a block size must be a multiple of 16 (MNN ignores any other), got {self.block_size}")

    @classmethod
    def parse(cls, text: str) -> "LayerBits":
        """"8", "4b64" (4 bits, blocks of 64 input channels), "4s" (symmetric), "float"."""
        word = text.strip().lower()
        if word in (FLOAT_LABEL, "fp32", "0"):
            return cls(FLOAT_BITS)
        symmetric = word.endswith("s")
        bits, _, block = word.removesuffix("s").partition("b")
        if not bits.isdigit() or (block and not block.isdigit()):
            raise InputError(f"{text!r} is not a bit choice; write BITS, BITSbBLOCK or float, e.g. 8, 4b64, 4s")
        return cls(int(bits), int(block or 0), asymmetric=not symmetric)

    @property
    def label(self) -> str:
        """How it is written (``parse`` reads it back): 8, 4b64, 4b64s (symmetric), float."""
        if self.bits == FLOAT_BITS:
            return FLOAT_LABEL
        text = f"{self.bits}b{self.block_size}" if self.block_size else str(self.bits)
        return text + ("" if self.asymmetric else "s")

    def to_mnn(self, name: str) -> dict:
        return {"name": name, "bits": self.bits, "asymmetric": self.asymmetric, "blockSize": self.block_size or -1}


@dataclass(frozen=True)
class OnnxLayer:
    """A layer MNN quantizes, as the ONNX graph shows it."""

    op_name: str  # MNN's name for it (the compression file's opName)
    op_type: str  # the ONNX node holding the weight: Conv, MatMul or Gemm
    weight: str  # the ONNX initializer
    shape: tuple[int, ...]  # the initializer's
    transposed: bool  # stored [in, out] (MatMul; Gemm without transB): MNN keeps [out, in]

    @property
    def output_channels(self) -> int:
        return self.shape[1] if self.transposed else self.shape[0]

    @property
    def input_channels(self) -> int:
        """Per output channel, before the kernel's positions (MNN's icCount)."""
        return self.shape[0] if self.transposed else self.shape[1]

    @property
    def count(self) -> int:
        total = 1
        for dim in self.shape:
            total *= dim
        return total

    def takes_block(self, block_size: int) -> bool:
        return block_size == 0 or self.input_channels % block_size == 0


def _load_graph(model: Path):
    import onnx

    try:
        return onnx.load(str(model), load_external_data=False).graph
    except Exception as err:  # onnx raises DecodeError and others for a file that is not ONNX
        raise InputError(f"{model} is not an ONNX model sd2mnn can read ({type(err).__name__}); re-export it") from None


def quantizable_layers(model: Path) -> dict[str, OnnxLayer]:
    """MNN's name -> layer, for every Conv, MatMul and Gemm whose weight is a constant of the
    graph, in graph order."""
    graph = _load_graph(model)
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    producers = {name: node for node in graph.node for name in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def initializer(name: str) -> str | None:
        """The initializer ``name`` is, through Identity nodes (exporters share a tensor that way)."""
        while name not in shapes and name in producers and producers[name].op_type == "Identity":
            name = producers[name].input[0]
        return name if name in shapes else None

    def constant(name: str) -> bool:
        return initializer(name) is not None or (name in producers and producers[name].op_type == "Constant")

    layers: dict[str, OnnxLayer] = {}
    for node in graph.node:
        weight = initializer(node.input[1]) if len(node.input) >= 2 else None
        if weight is None:
            continue
        shape = shapes[weight]
        if node.op_type == "Conv" and len(shape) >= 3:
            layers[node.output[0]] = OnnxLayer(node.output[0], "Conv", weight, shape, False)
        elif node.op_type == "Gemm" and len(shape) == 2:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            name = node.output[0] + MATMUL_SUFFIX
            layers[name] = OnnxLayer(name, "Gemm", weight, shape, not trans_b)
        elif node.op_type == "MatMul" and len(shape) == 2:
            after = consumers.get(node.output[0], [])
            # MNN folds a bias Add (the other input a constant) into the converted MatMul.
            if len(after) == 1 and after[0].op_type == "Add" and any(constant(i) for i in after[0].input):
                name = after[0].output[0] + MATMUL_SUFFIX
            else:
                name = node.output[0] + MATMUL_SUFFIX
            layers[name] = OnnxLayer(name, "MatMul", weight, shape, True)
    return layers


# -- the file --------------------------------------------------------------------------------


def compression_document(layers: dict[str, LayerBits], version: str = "3.6.1") -> dict:
    """MNN's compression file for ``layers`` (op name -> storage)."""
    return {"version": version, "forGuide": True, "algo": [{"type": "QUANTIZE", "quantParams": {"layer": [
        {"opName": name, "weight": [setting.to_mnn(name)]} for name, setting in layers.items()]}}]}


def write_compression_file(path: Path, layers: dict[str, LayerBits]) -> None:
    path.write_text(json.dumps(compression_document(layers), indent=1) + "\n")


def layer_labels(layers: dict[str, LayerBits]) -> dict[str, str]:
    """Op name -> label, as the manifest records a per-layer choice."""
    return {name: setting.label for name, setting in layers.items()}


def layers_digest(layers: dict[str, LayerBits]) -> str:
    """A short digest of a per-layer choice: equal choices, equal digests."""
    return hashlib.sha256(json.dumps(sorted(layer_labels(layers).items())).encode()).hexdigest()[:16]


def read_compression_file(path: str | os.PathLike) -> dict[str, LayerBits]:
    """Op name -> storage, from an MNN compression file; a one-line InputError for anything
    MNN would misread or silently ignore."""
    path = Path(path)
    fix = "give a file MNNConvert wrote with --compressionParamsFile, or one sd2mnn quantize wrote"
    if path.suffix != ".json":
        raise InputError(f"{path}: MNN reads a compression file as JSON only when its name ends in .json; rename it")
    try:
        document = json.loads(path.read_text())
    except OSError as err:
        raise InputError(f"cannot read {path} ({err.strerror}); {fix}") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise InputError(f"{path} is not JSON ({err}); {fix}") from None
    if not isinstance(document, dict) or not isinstance(document.get("algo"), list):
        raise InputError(f"{path} has no \"algo\" list, so it is not an MNN compression file; {fix}")
    if document.get("forGuide") is not True:
        raise InputError(f"{path} lacks \"forGuide\": true, so MNN would read it as a full int8 calibration, not "
                         "per-layer weight bits; add \"forGuide\": true if it holds weight bits only")
    quantize = [a for a in document["algo"] if isinstance(a, dict) and a.get("type") == "QUANTIZE"]
    if len(quantize) != 1 or not isinstance(quantize[0].get("quantParams", {}).get("layer"), list):
        raise InputError(f"{path} must hold one QUANTIZE entry with a quantParams.layer list; {fix}")
    layers: dict[str, LayerBits] = {}
    for index, entry in enumerate(quantize[0]["quantParams"]["layer"]):
        where = f"{path}: layer {index}"
        if not isinstance(entry, dict) or not isinstance(entry.get("opName"), str):
            raise InputError(f"{where} has no opName; {fix}")
        if entry.get("subgraphName"):
            raise InputError(f"{where} ({entry['opName']}) names a subgraph; the pipeline's models have none")
        weights = entry.get("weight")
        if not isinstance(weights, list) or not weights or not isinstance(weights[0], dict):
            raise InputError(f"{where} ({entry['opName']}) has no weight entry; {fix}")
        weight = weights[0]
        try:
            bits, block = int(weight.get("bits", -1)), int(weight.get("blockSize", -1))
            setting = LayerBits(bits, max(block, 0), bool(weight.get("asymmetric", True)))
        except (TypeError, ValueError):
            raise InputError(f"{where} ({entry['opName']}): bits and blockSize must be whole numbers") from None
        except InputError as err:
            raise InputError(f"{where} ({entry['opName']}): {err.message}") from None
        if entry["opName"] in layers:
            raise InputError(f"{where} names {entry['opName']} a second time; give each layer once")
        layers[entry["opName"]] = setting
    if not layers:
        raise InputError(f"{path} lists no layer; {fix}")
    return layers


def check_against_model(path: Path, layers: dict[str, LayerBits], model: Path) -> None:
    """Refuse a choice MNN would silently drop: a layer the model lacks, a tensor that no
    weight-carrying operator computes, a block size the layer's input channels cannot take."""
    known = quantizable_layers(model)
    graph = _load_graph(model)
    tensors = {name for node in graph.node for name in node.output}
    for name, setting in layers.items():
        layer = known.get(name)
        if layer is None:
            base = name[:-len(MATMUL_SUFFIX)] if name.endswith(MATMUL_SUFFIX) else name
            if base not in tensors:
                raise InputError(f"{path}: layer {name} is not in {model}; the file was written for another "
                                 "model: write it again for this one (sd2mnn quantize), or remove the layer")
            raise InputError(f"{path}: {name} is not computed by a Conv, MatMul or Gemm with constant weights in "
                             f"{model}, so MNN cannot quantize it; remove it from the file")
        if setting.bits != FLOAT_BITS and not layer.takes_block(setting.block_size):
            raise InputError(f"{path}: layer {name} has {layer.input_channels} input channels, which blocks of "
                             f"{setting.block_size} do not divide, so MNN would quantize it per channel instead; "
                             "give it a block size that divides them, or -1")
