"""The runtime contract: does a bundle have what MNN's Stable Diffusion runtime loads?

Every rule below is read from MNN 3.6.1 (the tag sd2mnn's MNN package is built from) and
names the file and line it comes from; ``SD`` is
``transformers/diffusion/engine/src/stable_diffusion.cpp``, ``TOK`` its ``tokenizer.cpp``:

    text_encoder  input_ids int32 [2, L]  -> last_hidden_state [2, L, H], pooler_output
    unet          sample f32 [2,4,64,64], timestep int32 [1], encoder_hidden_states f32 [2, L, H]
                  -> out_sample f32 [2,4,64,64]
    vae_decoder   latent_sample f32 [1,4,64,64] -> sample f32 [1,3,h,w] (any size: the runtime
                  writes what the decoder gives)
    tokenizer.mtok for SD1.5 and Taiyi alike, text header ``430 <type>``; the runtime adds
    BOS/EOS (49406/49407 SD1.5, 101/102 Taiyi) and pads with 0, so the text encoder's
    vocabulary must hold those ids.

L is 77 (SD1.5) or 512 (Taiyi); H is whatever the text encoder produces. The vae_encoder is not
loaded by the 3.6.1 SD runtime: only its files and tensor names are checked (sd2mnn's layout).
``check_contract`` lists every deviation with what the runtime expects; ``check_tensors`` applies
the same rules to shapes read elsewhere (an ONNX folder, loaded models), so generate, bench and
sweep can say what the runtime would refuse.

Reading an .mnn's tensors (``MNN.expr.load_as_dict``) happens in a child process
(``python -m sd2mnn.contract REQUEST.json OUT.json``), so neither a multi-GB model nor a file that
crashes MNN can hurt the caller.
"""
from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from sd2mnn.errors import InputError
from sd2mnn.layout import COMPONENTS, MTOK_NAME
from sd2mnn.families import FAMILIES, SD15, PromptFormat

# The models the runtime loads (vae_encoder: never), and each family's text length and BOS/EOS:
# the families' facts (sd2mnn.families), by the text length a converted text encoder shows.
RUNTIME_COMPONENTS = SD15.runtime_components
FORMATS: dict[int, PromptFormat] = {f.text_length: f.prompt for f in FAMILIES.values()}
TEXT_LENGTHS = {length: f.name for length, f in FORMATS.items()}
# transformers/llm/engine/src/tokenizer/tokenizer.cpp:90, tokenizer.hpp:136: MAGIC_NUMBER = 430.
MTOK_MAGIC = b"430"
# TOK:63: rows are padded with id 0.
PAD_ID = 0

# Problems after which the component cannot be run at all (fidelity checks are skipped).
BLOCKING = frozenset({"missing file", "empty file", "unreadable", "missing tensor"})


@dataclass(frozen=True)
class ContractIssue:
    component: str  # a component name, or "tokenizer"
    file: str  # bundle-relative
    kind: str  # "missing file", "empty file", "unreadable", "missing tensor", "dtype", "shape", "vocabulary"
    expected: str  # what the runtime expects
    found: str

    @property
    def blocking(self) -> bool:
        return self.kind in BLOCKING

    @property
    def message(self) -> str:
        return f"{self.file}: {self.kind}: the runtime expects {self.expected}; found {self.found}"

    def to_dict(self) -> dict:
        return {**asdict(self), "message": self.message}


def runtime_notes(issues: list[ContractIssue]) -> list[str]:
    """One line per deviation, for warnings and reports: "MNN's runtime would refuse ..."."""
    return [f"MNN's runtime would refuse {i.message}" for i in issues]


# -- reading an .mnn's tensors (child process) --------------------------------------------------

_DTYPES = {"float": "float32", "int": "int32", "uint8": "uint8", "double": "float64", "int64": "int64"}
# Paths through these ops depend on a tensor's shape, not its values.
_SHAPE_OPS = {"Shape", "Size", "Rank"}


def _mnn_vocabulary(variables: dict) -> int | None:
    """Rows of the largest 2-D constant table a Gather indexes with values from input_ids."""
    memo: dict[int, bool] = {}

    def from_ids(var, depth=0) -> bool:
        key = id(var)
        if key not in memo:
            memo[key] = False  # cycles cannot occur, but stop a revisit all the same
            if var.name == "input_ids":
                memo[key] = True
            elif depth < 64 and var.op_type not in _SHAPE_OPS:
                memo[key] = any(from_ids(v, depth + 1) for v in var.inputs)
        return memo[key]

    sizes = []
    for var in variables.values():
        if var.op_type in ("GatherV2", "Gather") and len(var.inputs) >= 2:
            table, indices = var.inputs[0], var.inputs[1]
            if table.op_type == "Const" and len(table.shape) == 2 and from_ids(indices):
                sizes.append(int(table.shape[0]))
    return max(sizes) if sizes else None


def _describe_tensors(model: Path, names: list[str]) -> dict:
    """{"inputs": [input names], "tensors": {name: {"shape", "dtype"}}, "vocabulary": rows or None}."""
    import MNN.expr as F

    variables = F.load_as_dict(str(model))
    if not variables:  # MNN returns nothing, rather than raising, for a file it cannot parse
        raise ValueError("no tensors")
    inputs, _ = F.get_inputs_and_outputs(variables)
    tensors = {}
    for name in names:
        if name in variables:
            var = variables[name]
            dtype = str(var.dtype).rsplit(".", 1)[-1]
            tensors[name] = {"shape": [int(d) for d in var.shape], "dtype": _DTYPES.get(dtype, dtype)}
    vocabulary = _mnn_vocabulary(variables) if "input_ids" in inputs else None
    return {"inputs": sorted(inputs), "tensors": tensors, "vocabulary": vocabulary}


def _read_in_child(requests: dict[str, tuple[Path, list[str]]], timeout: float) -> dict[str, dict] | None:
    from sd2mnn.children import run_module

    with tempfile.TemporaryDirectory(prefix="sd2mnn-contract-") as tmp:
        request, out = Path(tmp) / "request.json", Path(tmp) / "tensors.json"
        request.write_text(json.dumps({k: [str(p.resolve()), names] for k, (p, names) in requests.items()}))
        done = run_module("sd2mnn.contract", [str(request), str(out)], Path(tmp), timeout=timeout)
        return json.loads(out.read_text()) if done.returncode == 0 and out.is_file() else None


# Reading a model's graph is quick (MNN maps the weights lazily); a full-size unet takes seconds.
READ_TIMEOUT_S = 600.0


def read_tensors(requests: dict[str, tuple[Path, list[str]]], timeout: float = READ_TIMEOUT_S) -> dict[str, dict | None]:
    """key -> ``_describe_tensors(path, names)``, or None where MNN cannot read the file.
    One child reads them all; if it crashes (a corrupt file can take MNN down) or runs past
    ``timeout`` seconds, one child each."""
    if not requests:
        return {}
    found = _read_in_child(requests, timeout)
    if found is None:
        found = {}
        for key, item in requests.items():
            found.update(_read_in_child({key: item}, timeout) or {key: None})
    return {key: found.get(key) for key in requests}


# -- the vocabulary ----------------------------------------------------------------------------


def onnx_vocabulary(model: Path) -> int | None:
    """Rows of the largest 2-D initializer a Gather indexes with values from ``input_ids``."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    tables = {t.name: list(t.dims) for t in graph.initializer}
    from_ids = {"input_ids"}
    sizes = []
    for node in graph.node:  # ONNX keeps nodes in topological order
        if node.op_type not in _SHAPE_OPS and any(i in from_ids for i in node.input):
            from_ids.update(node.output)
            if node.op_type == "Gather" and len(node.input) >= 2 and node.input[1] in from_ids:
                dims = tables.get(node.input[0])
                if dims is not None and len(dims) == 2:
                    sizes.append(int(dims[0]))
    return max(sizes) if sizes else None


def _runtime_ids_issue(vocabulary: int | None, length: int | None, file: str) -> ContractIssue | None:
    fmt = FORMATS.get(length)
    if vocabulary is None or fmt is None or max(fmt.bos_id, fmt.eos_id) < vocabulary:
        return None
    # SD:123/125 the BOS/EOS ids MtokTokenizer adds (TOK:49-53) index the embedding table.
    return ContractIssue("text_encoder", file, "vocabulary",
                         f"ids up to {max(fmt.bos_id, fmt.eos_id)} ({fmt.name} BOS/EOS {fmt.bos_id}/{fmt.eos_id})",
                         f"a vocabulary of {vocabulary} ids; export the text encoder with its tokenizer's vocabulary")


def check_runtime_ids(vocabulary: int | None, length: int | None, file: str | Path) -> None:
    """Raise InputError when the BOS/EOS ids MNN's runtime adds to every prompt of ``length``
    tokens do not fit the text encoder's ``vocabulary``: running it is impossible."""
    issue = _runtime_ids_issue(vocabulary, length, str(file))
    if issue is not None:
        raise InputError(f"{file}: MNN's runtime feeds {issue.expected}, but the text encoder has {issue.found}")


def check_vocabulary(ids, vocabulary: int | None, file: str | Path) -> None:
    """Raise InputError when the ids the runtime would feed do not fit the text encoder's
    vocabulary (running it is impossible: ONNX Runtime refuses, MNN reads past the table)."""
    import numpy as np

    if vocabulary is None:
        return
    top = int(np.max(ids))
    if top >= vocabulary:
        fmt = next((f for f in FORMATS.values() if top in (f.bos_id, f.eos_id)), None)
        what = f"ids up to {top}" + (f" ({fmt.name} BOS/EOS {fmt.bos_id}/{fmt.eos_id})" if fmt else " (from the tokenizer)")
        raise InputError(f"{file}: MNN's runtime feeds {what}, but the text encoder has a vocabulary of {vocabulary} "
                         "ids; export the text encoder with its tokenizer's vocabulary")


# -- the checks ------------------------------------------------------------------------------


def expected_tensors(name: str, length: int, hidden: int | None) -> dict[str, tuple[str, list[int | None]]]:
    """Tensor name -> (dtype, shape) the runtime uses; None in a shape means "any"."""
    return COMPONENTS[name].runtime_tensors(length, hidden)


def _shape_matches(found: list[int], expected: list[int | None]) -> bool:
    # A dimension MNN stores as -1 is dynamic: the runtime's fixed shape fits it.
    return len(found) == len(expected) and all(e is None or f in (e, -1) for f, e in zip(found, expected))


def _fmt_shape(shape) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def _check_files(mnn_dir: Path, name: str) -> list[ContractIssue]:
    spec = COMPONENTS[name]
    issues = []
    # SD:101 etc. load "<dir>/<name>.mnn"; express/module/Module.cpp:380 reads its weights from
    # the same path + ".weight".
    for file, what in ((spec.mnn_name, f"the {name} model"), (spec.weight_name, f"the {name} weights beside {spec.mnn_name}")):
        path = mnn_dir / file
        if not path.is_file():
            issues.append(ContractIssue(name, file, "missing file", what, "no such file; convert it (sd2mnn convert)"))
        elif path.stat().st_size == 0:
            issues.append(ContractIssue(name, file, "empty file", what, "0 bytes; reconvert it (sd2mnn convert --force)"))
    return issues


def _check_tensors(name: str, info: dict, length: int, hidden: int | None, file: str | None = None,
                   complete: bool = True) -> list[ContractIssue]:
    spec = COMPONENTS[name]
    file = file or spec.mnn_name
    issues = []
    # SD:104, SD:111, SD:118: Module::load with these input and output names.
    for tensor in (*spec.inputs, *spec.outputs) if complete else ():
        role = "input" if tensor in spec.inputs else "output"
        if tensor not in info["tensors"] or (role == "input" and tensor not in info["inputs"]):
            have = f"inputs {info['inputs']}" if role == "input" else "no tensor of that name"
            issues.append(ContractIssue(
                name, file, "missing tensor",
                f"{role} {tensor!r} (loaded with inputs {list(spec.inputs)}, outputs {list(spec.outputs)})",
                f"{have}; re-export the ONNX model with that {role} and reconvert"))
    for tensor, (dtype, shape) in expected_tensors(name, length, hidden).items():
        role = "input" if tensor in spec.inputs else "output"
        found = info["tensors"].get(tensor)
        if found is None:
            continue
        if found["dtype"] != dtype:
            issues.append(ContractIssue(name, file, "dtype", f"{role} {tensor!r} as {dtype}", found["dtype"]))
        if not _shape_matches(found["shape"], shape):
            issues.append(ContractIssue(
                name, file, "shape", f"{role} {tensor!r} of shape {_fmt_shape(shape)}", _fmt_shape(found["shape"])))
    return issues


def _dims(infos: dict, component: str, tensor: str) -> list[int] | None:
    found = infos.get(component, {}).get("tensors", {}).get(tensor)
    return found["shape"] if found else None


def check_tensors(infos: dict[str, dict], files: dict[str, str] | None = None, complete: bool = True) -> list[ContractIssue]:
    """The contract's shape, dtype and name rules over ``infos`` (component -> {"inputs": [...],
    "tensors": {name: {"shape", "dtype"}}}, as the child reads them from .mnn files or
    ``tensor_infos`` from ONNX specs); ``files`` names each component's file in the messages.
    ``complete=False``: ``infos`` holds only some tensors (a loaded model's inputs); check those."""
    files = files or {}
    issues = []
    # L and H come from the text encoder (else the unet): the runtime sizes its inputs from them.
    ids, hidden_states = _dims(infos, "text_encoder", "input_ids"), _dims(infos, "unet", "encoder_hidden_states")
    last = _dims(infos, "text_encoder", "last_hidden_state")
    length = ids[1] if ids and len(ids) == 2 else (hidden_states[1] if hidden_states and len(hidden_states) == 3 else 77)
    hidden = last[-1] if last else (hidden_states[-1] if hidden_states else None)
    if length not in FORMATS:
        source = "text_encoder" if ids else "unet"
        issues.append(ContractIssue(source, files.get(source, COMPONENTS[source].mnn_name), "shape",
                                    "prompts of 77 tokens (SD1.5) or 512 (Taiyi)", f"{length} tokens"))
        length = 77
    for name, info in infos.items():
        issues += _check_tensors(name, info, length, hidden, files.get(name), complete)
    return issues


def tensor_infos(specs: dict[str, tuple[list, list]]) -> dict[str, dict]:
    """component -> (input TensorSpecs, output TensorSpecs) -> the ``infos`` check_tensors takes
    (symbolic dimensions become -1: dynamic)."""
    def dims(shape):
        return [d if isinstance(d, int) and d > 0 else -1 for d in shape]

    return {name: {"inputs": [t.name for t in ins],
                   "tensors": {t.name: {"shape": dims(t.shape), "dtype": t.dtype} for t in (*ins, *outs)}}
            for name, (ins, outs) in specs.items()}


def _check_tokenizer(mnn_dir: Path) -> list[ContractIssue]:
    # SD:122-133 both SD1.5 and Taiyi load an MtokTokenizer from the bundle folder; TOK:15 reads
    # "<dir>/tokenizer.mtok" (no vocab.txt, no tokenizer.json).
    path = mnn_dir / MTOK_NAME
    if not path.is_file():
        return [ContractIssue("tokenizer", MTOK_NAME, "missing file", "the tokenizer in MNN's binary format",
                              "no such file; rebuild the bundle with sd2mnn convert")]
    with open(path, "rb") as stream:
        head = stream.read(16)
    if not head.startswith(MTOK_MAGIC):
        return [ContractIssue("tokenizer", MTOK_NAME, "unreadable", "a file starting with the magic number 430",
                              f"{head[:8]!r}; rebuild it with sd2mnn convert --force")]
    return []


def _check_vocabulary_fits(infos: dict[str, dict]) -> list[ContractIssue]:
    info = infos.get("text_encoder") or {}
    ids = (info.get("tensors") or {}).get("input_ids")
    length = ids["shape"][1] if ids and len(ids["shape"]) == 2 else None
    issue = _runtime_ids_issue(info.get("vocabulary"), length, COMPONENTS["text_encoder"].mnn_name)
    return [issue] if issue else []


def check_contract(mnn_dir: str | Path, components: tuple[str, ...] | list[str] | None = None) -> list[ContractIssue]:
    """Every way the bundle in ``mnn_dir`` deviates from what MNN's SD runtime loads.

    ``components=None`` checks the runtime's three models (and vae_encoder when present);
    a list checks just those. The tokenizer is always checked. An empty list means it conforms.
    """
    mnn_dir = Path(mnn_dir)
    if components is None:
        extra = [n for n in COMPONENTS if n not in RUNTIME_COMPONENTS and (mnn_dir / COMPONENTS[n].mnn_name).exists()]
        components = (*RUNTIME_COMPONENTS, *extra)
    issues: list[ContractIssue] = []
    readable = []
    for name in components:
        file_issues = _check_files(mnn_dir, name)
        issues += file_issues
        if not any(i.file == COMPONENTS[name].mnn_name for i in file_issues):
            readable.append(name)
    found = read_tensors({n: (mnn_dir / COMPONENTS[n].mnn_name, [*COMPONENTS[n].inputs, *COMPONENTS[n].outputs])
                          for n in readable})
    infos = {name: info for name, info in found.items() if info is not None}
    for name in readable:
        if name not in infos:
            issues.append(ContractIssue(name, COMPONENTS[name].mnn_name, "unreadable", "an MNN model file",
                                        "a file MNN cannot read; reconvert it (sd2mnn convert --force)"))
    issues += check_tensors(infos)
    issues += _check_vocabulary_fits(infos)
    issues += _check_tokenizer(mnn_dir)
    return issues


def _main(argv: list[str]) -> int:
    """``python -m sd2mnn.contract REQUEST.json RESULT.json``: {key: [model, names]} -> {key: info}."""
    request, out = json.loads(Path(argv[0]).read_text()), Path(argv[1])
    result = {}
    for key, (model, names) in request.items():
        try:
            result[key] = _describe_tensors(Path(model), names)
        except Exception as err:  # MNN raises plain exceptions for unreadable files
            print(f"cannot read {model}: {err}", file=sys.stderr)
            result[key] = None
    out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
