"""Read what sd2mnn needs from an ONNX file without loading its weights.

An SD1.5 text encoder is a 470 MB ONNX file with its weights inline, and a UNet's graph refers to
3.4 GB of external data. We need only the graph's inputs and outputs and the external-data
locations, so this walks the protobuf wire format and seeks past everything else: memory stays
flat whatever the file's size. The small messages we do want (ValueInfoProto) are parsed with
the onnx package.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path

from sd2mnn.errors import InputError

# Field numbers from onnx.proto.
_MODEL_IR_VERSION = 1
_MODEL_GRAPH = 7
_MODEL_FUNCTIONS = 25
_FUNCTION_NODE = 7
_GRAPH_NODE = 1
_GRAPH_INITIALIZER = 5
_GRAPH_INPUT = 11
_GRAPH_OUTPUT = 12
_GRAPH_SPARSE_INITIALIZER = 15
_NODE_INPUT = 1
_NODE_OP_TYPE = 4
_NODE_ATTRIBUTE = 5
_ATTRIBUTE_TENSOR, _ATTRIBUTE_GRAPH, _ATTRIBUTE_TENSORS, _ATTRIBUTE_GRAPHS = 5, 6, 10, 11
_ATTRIBUTE_SPARSE_TENSOR, _ATTRIBUTE_SPARSE_TENSORS = 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_DIMS = 1
_TENSOR_DATA_TYPE = 2
_TENSOR_NAME = 8
_TENSOR_EXTERNAL_DATA = 13
_ENTRY_KEY = 1
_ENTRY_VALUE = 2

_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5

# Bits per element of TensorProto.DataType (onnx.proto); STRING (8) is never external data.
_DTYPE_BITS = {
    1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64,
    14: 64, 15: 128, 16: 16, 17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4,
}


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: its name, static shape (symbolic dims as strings) and dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str  # numpy name: "float32", "int32", ...

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict) -> "TensorSpec":
        return cls(data["name"], tuple(data["shape"]), data["dtype"])


@dataclass(frozen=True)
class ExternalTensor:
    """Where a tensor's bytes live outside the model file, as the file states it (an initializer,
    a sparse initializer's parts, or a node attribute's tensor, in any graph of the model)."""

    name: str
    location: str
    offset: str  # as written: validated by check_external_data
    length: str | None
    nbytes: int | None  # what its dtype and shape need; None for a dtype we do not size


@dataclass(frozen=True)
class OnnxSummary:
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Every distinct external-data location, as written in the file (relative to its folder).
    external_locations: tuple[str, ...]
    external_tensors: tuple[ExternalTensor, ...] = ()
    # The op type of each node MNNConvert reduces over every axis: a reduction of
    # AXES_IGNORED given its axes as an input (opset 18's form), in any graph of the model.
    reductions_with_axes_input: tuple[str, ...] = ()


# MNNConvert 3.6.1's onnxextra/OnnxReduceL2.cpp rewrites these five and reads their axes from
# the attribute only (ReduceMean, ReduceSum... go through onnx/ReduceOnnx.cpp, which takes them
# as an input too).
AXES_IGNORED = frozenset({"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"})


class _NotOnnx(Exception):
    pass


def _read_varint(stream: io.BufferedReader) -> int:
    result, shift = 0, 0
    while True:
        byte = stream.read(1)
        if not byte:
            raise _NotOnnx("truncated varint")
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise _NotOnnx("varint too long")


def _fields(stream: io.BufferedReader, end: int):
    """Yield (field_number, wire_type, length_or_value) until ``end``; LEN payloads are left
    unread at the current position, and skipped unless the caller reads them."""
    while stream.tell() < end:
        key = _read_varint(stream)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _NotOnnx("field number 0")
        if wire == _WIRE_VARINT:
            yield number, wire, _read_varint(stream)
        elif wire == _WIRE_I64:
            stream.seek(8, io.SEEK_CUR)
        elif wire == _WIRE_I32:
            stream.seek(4, io.SEEK_CUR)
        elif wire == _WIRE_LEN:
            length = _read_varint(stream)
            start = stream.tell()
            if start + length > end:
                raise _NotOnnx("field runs past its message")
            yield number, wire, length
            stream.seek(start + length)
        else:
            raise _NotOnnx(f"wire type {wire}")


def _read_text(stream: io.BufferedReader, length: int) -> str:
    return stream.read(length).decode("utf-8", "replace")


def _packed_varints(stream: io.BufferedReader, length: int) -> list[int]:
    end = stream.tell() + length
    values = []
    while stream.tell() < end:
        values.append(_read_varint(stream))
    return values


def _initializer_header(stream: io.BufferedReader, end: int) -> tuple[str, ExternalTensor | None]:
    """A TensorProto's name and, for external data, where its bytes are (None for inline
    tensors). raw_data and the other payload fields are skipped by seeking."""
    name, data_type, dims, external = "", None, [], {}
    for number, wire, value in _fields(stream, end):
        if number == _TENSOR_DATA_TYPE and wire == _WIRE_VARINT:
            data_type = value
        elif number == _TENSOR_DIMS and wire == _WIRE_VARINT:
            dims.append(value)
        elif number == _TENSOR_DIMS and wire == _WIRE_LEN:
            dims += _packed_varints(stream, value)  # proto2 writes them one by one; packed is legal too
        elif wire != _WIRE_LEN:
            continue
        elif number == _TENSOR_NAME:
            name = _read_text(stream, value)
        elif number == _TENSOR_EXTERNAL_DATA:
            entry = {}
            for entry_number, entry_wire, entry_length in _fields(stream, stream.tell() + value):
                if entry_wire == _WIRE_LEN:
                    entry[entry_number] = _read_text(stream, entry_length)
            if _ENTRY_KEY in entry:
                external[entry[_ENTRY_KEY]] = entry.get(_ENTRY_VALUE, "")
    if "location" not in external:
        return name, None
    nbytes = None
    if data_type in _DTYPE_BITS:
        count = 1
        for dim in dims:
            count *= dim
        nbytes = (count * _DTYPE_BITS[data_type] + 7) // 8
    return name, ExternalTensor(name, external["location"], external.get("offset", "0"), external.get("length"), nbytes)


def _tensor_spec(raw: bytes) -> TensorSpec:
    import onnx
    from onnx import helper

    info = onnx.ValueInfoProto.FromString(raw)
    tensor_type = info.type.tensor_type
    dims = tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim
    )
    dtype = str(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)) if tensor_type.elem_type else "?"
    return TensorSpec(info.name, dims, dtype)


class _Found:
    """What a walk of a model's graphs collects."""

    def __init__(self):
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self.initializer_names: set[str] = set()
        self.locations: dict[str, None] = {}
        self.external: list[ExternalTensor] = []
        self.reductions_with_axes_input: list[str] = []

    def tensor(self, stream: io.BufferedReader, end: int, what: str) -> str:
        """Read a TensorProto's header; keep it if its data is external. Returns its name."""
        name, tensor = _initializer_header(stream, end)
        if tensor is not None:
            self.locations[tensor.location] = None
            self.external.append(tensor if tensor.name else replace(tensor, name=what))
        return name


def _walk_sparse(stream: io.BufferedReader, end: int, found: _Found, what: str) -> None:
    for number, wire, length in _fields(stream, end):
        if wire == _WIRE_LEN and number in (_SPARSE_VALUES, _SPARSE_INDICES):
            found.tensor(stream, stream.tell() + length, what)


def _walk_node(stream: io.BufferedReader, end: int, found: _Found) -> None:
    """A NodeProto's op type and inputs, and its attributes: tensors, sparse tensors and subgraphs
    (If, Loop, Scan bodies)."""
    op_type, inputs = "", 0
    for number, wire, length in _fields(stream, end):
        if number == _NODE_OP_TYPE and wire == _WIRE_LEN:
            op_type = _read_text(stream, length)
            continue
        if number == _NODE_INPUT and wire == _WIRE_LEN:
            inputs += bool(_read_text(stream, length))  # "" is an omitted optional input
            continue
        if number != _NODE_ATTRIBUTE or wire != _WIRE_LEN:
            continue
        for a_number, a_wire, a_length in _fields(stream, stream.tell() + length):
            a_end = stream.tell() + a_length
            if a_wire != _WIRE_LEN:
                continue
            if a_number in (_ATTRIBUTE_TENSOR, _ATTRIBUTE_TENSORS):
                found.tensor(stream, a_end, "a node attribute's tensor")
            elif a_number in (_ATTRIBUTE_SPARSE_TENSOR, _ATTRIBUTE_SPARSE_TENSORS):
                _walk_sparse(stream, a_end, found, "a node attribute's sparse tensor")
            elif a_number in (_ATTRIBUTE_GRAPH, _ATTRIBUTE_GRAPHS):
                _walk_graph(stream, a_end, found, top=False)
    if op_type in AXES_IGNORED and inputs > 1:
        found.reductions_with_axes_input.append(op_type)


def _walk_graph(stream: io.BufferedReader, end: int, found: _Found, top: bool) -> None:
    """A GraphProto: the top graph's inputs and outputs, and every tensor with external data in
    it or its subgraphs. Payloads are skipped by seeking: memory stays flat."""
    for number, wire, length in _fields(stream, end):
        if wire != _WIRE_LEN:
            continue
        field_end = stream.tell() + length
        if top and number in (_GRAPH_INPUT, _GRAPH_OUTPUT):
            spec = _tensor_spec(stream.read(length))
            (found.inputs if number == _GRAPH_INPUT else found.outputs).append(spec)
        elif number == _GRAPH_INITIALIZER:
            name = found.tensor(stream, field_end, "an initializer")
            if top:
                found.initializer_names.add(name)
        elif number == _GRAPH_SPARSE_INITIALIZER:
            _walk_sparse(stream, field_end, found, "a sparse initializer")
        elif number == _GRAPH_NODE:
            _walk_node(stream, field_end, found)


def scan_onnx(path: Path) -> OnnxSummary:
    """Summarize an ONNX file; raise InputError if it is not one."""
    path = Path(path)
    found = _Found()
    saw_graph = saw_ir_version = False
    try:
        with open(path, "rb") as stream:
            size = stream.seek(0, io.SEEK_END)
            stream.seek(0)
            for number, wire, value in _fields(stream, size):
                if number == _MODEL_IR_VERSION and wire == _WIRE_VARINT:
                    saw_ir_version = True
                if wire != _WIRE_LEN:
                    continue
                if number == _MODEL_GRAPH:
                    saw_graph = True
                    _walk_graph(stream, stream.tell() + value, found, top=True)
                elif number == _MODEL_FUNCTIONS:  # a function's nodes carry attributes too
                    for f_number, f_wire, f_length in _fields(stream, stream.tell() + value):
                        if f_number == _FUNCTION_NODE and f_wire == _WIRE_LEN:
                            _walk_node(stream, stream.tell() + f_length, found)
    except (_NotOnnx, UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: protobuf DecodeError
        raise InputError(
            f"{path} is not an ONNX model ({err}); point sd2mnn at the folder a diffusers -> ONNX export wrote"
        ) from None
    if not (saw_graph and saw_ir_version):
        raise InputError(
            f"{path} is not an ONNX model (no graph found); point sd2mnn at the folder a diffusers -> ONNX export wrote"
        )
    # Old exporters list initializers among the inputs; they are not inputs a runtime feeds.
    inputs = [spec for spec in found.inputs if spec.name not in found.initializer_names]
    return OnnxSummary(path, tuple(inputs), tuple(found.outputs), tuple(found.locations), tuple(found.external),
                       tuple(found.reductions_with_axes_input))


def check_mnn_computes_it(summary: OnnxSummary) -> None:
    """Refuse a graph MNNConvert 3.6.1 converts into another computation without a word: a
    ReduceL1, ReduceL2, ReduceLogSum, ReduceLogSumExp or ReduceSumSquare whose axes are an input
    (AXES_IGNORED: reduced over every axis; PyTorch's F.normalize exports a ReduceL2 so at opset 18)."""
    found = summary.reductions_with_axes_input
    if found:
        kinds = ", ".join(f"{found.count(op)} {op}" for op in sorted(set(found)))
        raise InputError(f"{summary.path}: {kinds} node(s) take their axes as an input, which MNNConvert 3.6.1 "
                         "turns into a reduction over every axis (a wrong model); re-export at opset 17, "
                         "or compute them with ReduceSum (a norm: ReduceSum and Sqrt)")


def check_external_data(summary: OnnxSummary) -> None:
    """Check that every external tensor's bytes lie inside its data file, and that each data
    file is a plain file other than the model, before a converter reads them. The converter
    itself reads past a short file without a word and writes a model of garbage. Only sizes are
    read: nothing is loaded."""
    model = summary.path
    folder = model.parent
    sizes: dict[str, int] = {}
    for location in summary.external_locations:
        target = folder / location
        refit = "re-export the model, or copy its data file again"
        if target.resolve() == model.resolve():
            raise InputError(f"{model} names itself as its external data file ({location!r}); {refit}")
        if not target.is_file():
            what = "a folder" if target.is_dir() else "not a regular file"
            raise InputError(f"{model} names {target} as its external data file, but that is {what}; {refit}")
        sizes[location] = target.stat().st_size
    for tensor in summary.external_tensors:
        target = folder / tensor.location
        try:
            offset = int(tensor.offset)
            length = None if tensor.length is None else int(tensor.length)
        except ValueError:
            offset = length = -1
        if offset < 0 or (length is not None and length < 0):
            raise InputError(
                f"{model}: tensor {tensor.name!r} has external-data offset {tensor.offset!r} and length "
                f"{tensor.length!r}, which are not byte counts; re-export the model"
            )
        if length is not None and tensor.nbytes is not None and length != tensor.nbytes:
            raise InputError(
                f"{model}: tensor {tensor.name!r} says its external data is {length} bytes, but its dtype "
                f"and shape need {tensor.nbytes}; re-export the model"
            )
        need = length if length is not None else (tensor.nbytes or 0)
        if offset + need > sizes[tensor.location]:
            raise InputError(
                f"{target} is too short for tensor {tensor.name!r} of {model}: it needs bytes "
                f"{offset}..{offset + need}, the file has {sizes[tensor.location]}; the file is truncated "
                "or not this model's: copy it again or re-export"
            )
