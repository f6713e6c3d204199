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

SD3.5 (``SD35`` is ``diffusion_sd35.cpp``) fixes every width: its family's ``runtime_tensors``
give them (sd2mnn.families.sd35 cites the lines). Its runtime loads ``tokenizer/``,
``tokenizer_2/`` and ``tokenizer_3/`` ``tokenizer.mtok`` (SD35:98-108: all three, or nothing
loads) and goes on with zeros where ``text_encoder_3.mnn`` does not load (SD35:150-151, 228): a
bundle without T5 conforms, and ``contract_notes`` says what it means.
``check_contract`` lists every deviation with what the runtime expects; ``check_tensors`` applies
the same rules to shapes read elsewhere (an ONNX folder, loaded models), so generate, bench and
sweep can say what the runtime would refuse.

Reading an .mnn's tensors (``MNN.expr.load_as_dict``) happens in a child process
(``python -m sd2mnn.core.contract REQUEST.json OUT.json``), so neither a multi-GB model nor a file that
crashes MNN can hurt the caller.
"""
from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from sd2mnn.core.layout import bundle_mtoks, folder_family
from sd2mnn.errors import InputError
from sd2mnn.families import FAMILIES, Family, PromptFormat

# Each SD1.x family's text length and BOS/EOS: the families' facts (sd2mnn.families), by the text
# length a converted text encoder shows.
FORMATS: dict[int, PromptFormat] = {f.text_length: f.prompt for f in FAMILIES.values() if not f.fixed_widths}
# transformers/llm/engine/src/tokenizer/tokenizer.cpp:90, tokenizer.hpp:136: MAGIC_NUMBER = 430.
MTOK_MAGIC = b"430"

# Problems after which the component cannot be run at all (fidelity checks are skipped).
BLOCKING = frozenset({"missing file", "empty file", "unreadable", "missing tensor"})


@dataclass(frozen=True)
class ContractIssue:
    component: str  # a component name, or "tokenizer"
    file: str  # bundle-relative
    # "missing file", "empty file", "unreadable", "missing tensor", "dtype", "shape", "size" (two
    # components disagree), "vocabulary"
    kind: str
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


def runtime_input_shapes(name: str, family: Family) -> dict[str, list[int | None]]:
    """The shapes a runtime of fixed widths feeds ``name``'s inputs (None: a size it takes from
    its arguments); empty for the SD1.x runtime, which sizes its inputs from the models."""
    if not family.fixed_widths:
        return {}
    spec = family.components[name]
    return {t: shape for t, (_, shape) in expected_tensors(name, 0, None, family).items() if t in spec.inputs}


def size_free_inputs(variables: dict, shapes: dict[str, list[int | None]]) -> None:
    """Give each input MNN holds with free dimensions (-1, declared symbolic) the size ``shapes``
    has for them, and zeros: MNN then works out its outputs' shapes (some only once the input
    holds data). An input whose free dimensions ``shapes`` leaves open stays as it is."""
    import numpy as np

    for name, expected in shapes.items():
        var = variables.get(name)
        if var is None or var.shape is None or -1 not in var.shape or len(expected) != len(var.shape):
            continue
        shape = [e if d == -1 else d for d, e in zip(var.shape, expected)]
        if None in shape:
            continue
        var.resize(shape)
        var.write(np.zeros(int(np.prod(shape)), dtype=np.int32 if "int" in str(var.dtype) else np.float32))


def _describe_tensors(model: Path, names: list[str], shapes: dict | None = None) -> dict:
    """{"inputs": [input names], "tensors": {name: {"shape", "dtype"}}, "vocabulary": rows or None};
    ``shapes``: what the runtime feeds its inputs (``size_free_inputs``)."""
    import MNN.expr as F

    variables = F.load_as_dict(str(model))
    if not variables:  # MNN returns nothing, rather than raising, for a file it cannot parse
        raise ValueError("no tensors")
    size_free_inputs(variables, shapes or {})
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
    from sd2mnn.core.children import run_module

    with tempfile.TemporaryDirectory(prefix="sd2mnn-contract-") as tmp:
        request, out = Path(tmp) / "request.json", Path(tmp) / "tensors.json"
        request.write_text(json.dumps({k: [str(p.resolve()), *rest] for k, (p, *rest) in requests.items()}))
        done = run_module("sd2mnn.core.contract", [str(request), str(out)], Path(tmp), timeout=timeout)
        return json.loads(out.read_text()) if done.returncode == 0 and out.is_file() else None


# Reading a model's graph is quick (MNN maps the weights lazily); a full-size unet takes seconds.
READ_TIMEOUT_S = 600.0


def read_tensors(requests: dict[str, tuple], timeout: float = READ_TIMEOUT_S) -> dict[str, dict | None]:
    """key -> ``_describe_tensors(path, names[, input shapes])``, or None where MNN cannot read the file.
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


def _runtime_format(length: int | None, family: Family, component: str | None = None) -> PromptFormat | None:
    """The format MNN's runtime feeds ``component`` with: by its text length for the SD1.x
    families (the runtime's model type sets it), else its tokenizer's in the family."""
    if not family.fixed_widths:
        return FORMATS.get(length)
    return family.prompt_formats.get(family.components[component or family.text_encoder].tokenizer)


def _runtime_ids_issue(vocabulary: int | None, length: int | None, file: str, family: Family,
                       component: str | None = None) -> ContractIssue | None:
    component = component or family.text_encoder
    fmt = _runtime_format(length, family, component)
    if vocabulary is None or fmt is None or max(fmt.bos_id, fmt.eos_id) < vocabulary:
        return None
    # SD:123/125 (SD35:42-44) the BOS/EOS ids MtokTokenizer adds (TOK:49-53) index the embedding table.
    return ContractIssue(component, file, "vocabulary",
                         f"ids up to {max(fmt.bos_id, fmt.eos_id)} ({fmt.name} BOS/EOS {fmt.bos_id}/{fmt.eos_id})",
                         f"a vocabulary of {vocabulary} ids; export the text encoder with its tokenizer's vocabulary")


def check_runtime_ids(vocabulary: int | None, length: int | None, file: str | Path, family: Family,
                      component: str | None = None) -> None:
    """Raise InputError when the BOS/EOS ids MNN's runtime adds to every prompt of ``length``
    tokens do not fit the text encoder's ``vocabulary``: running it is impossible."""
    issue = _runtime_ids_issue(vocabulary, length, str(file), family, component)
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


def expected_tensors(name: str, length: int, hidden: int | None, family: Family) -> dict[str, tuple[str, list[int | None]]]:
    """Tensor name -> (dtype, shape) the runtime uses; None in a shape means "any"."""
    return family.components[name].runtime_tensors(length, hidden)


def _shape_matches(found: list[int], expected: list[int | None]) -> bool:
    # A dimension MNN stores as -1 is dynamic: the runtime's fixed shape fits it.
    return len(found) == len(expected) and all(e is None or f in (e, -1) for f, e in zip(found, expected))


def _fmt_shape(shape) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def _check_files(mnn_dir: Path, name: str, family: Family) -> list[ContractIssue]:
    spec = family.components[name]
    issues = []
    # SD:101 etc. load "<dir>/<name>.mnn"; express/module/Module.cpp:380 reads its weights from
    # the same path + ".weight".
    for file, what in ((spec.mnn_name, f"the {name} model"), (spec.weight_name, f"the {name} weights beside {spec.mnn_name}")):
        path = mnn_dir / file
        if not path.is_file():
            issues.append(ContractIssue(name, file, "missing file", what, "no such file; convert it (sd2mnn convert)"))
        elif path.stat().st_size == 0:
            issues.append(ContractIssue(name, file, "empty file", what, "0 bytes; reconvert it (sd2mnn convert --overwrite)"))
    return issues


def _check_tensors(name: str, info: dict, length: int, hidden: int | None, family: Family, file: str | None = None,
                   complete: bool = True) -> list[ContractIssue]:
    spec = family.components[name]
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
    for tensor, (dtype, shape) in expected_tensors(name, length, hidden, family).items():
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


def check_tensors(infos: dict[str, dict], family: Family, files: dict[str, str] | None = None,
                  complete: bool = True) -> list[ContractIssue]:
    """The contract's shape, dtype and name rules over ``infos`` (component -> {"inputs": [...],
    "tensors": {name: {"shape", "dtype"}}}, as the child reads them from .mnn files or
    ``tensor_infos`` from ONNX specs) of ``family``'s components; ``files`` names each component's
    file in the messages. ``complete=False``: ``infos`` holds only some tensors (a loaded model's
    inputs); check those."""
    files = files or {}
    if family.fixed_widths:  # SD3.5, Wan: the family's tensors say them all
        return [i for name, info in infos.items()
                for i in _check_tensors(name, info, 0, None, family, files.get(name), complete)] + \
            check_same_sizes(infos, family, files)
    issues = []
    # L and H come from the text encoder (else the unet): the runtime sizes its inputs from them.
    encoder, denoiser = family.text_encoder, family.denoiser
    ids, hidden_states = _dims(infos, encoder, "input_ids"), _dims(infos, denoiser, "encoder_hidden_states")
    last = _dims(infos, encoder, "last_hidden_state")
    length = ids[1] if ids and len(ids) == 2 else (hidden_states[1] if hidden_states and len(hidden_states) == 3 else 77)
    hidden = last[-1] if last else (hidden_states[-1] if hidden_states else None)
    if length not in FORMATS:
        source = encoder if ids else denoiser
        issues.append(ContractIssue(source, files.get(source, family.components[source].mnn_name), "shape",
                                    "prompts of 77 tokens (SD1.5) or 512 (Taiyi)", f"{length} tokens"))
        length = 77
    for name, info in infos.items():
        issues += _check_tensors(name, info, length, hidden, family, files.get(name), complete)
    return issues


def check_same_sizes(infos: dict[str, dict], family: Family, files: dict[str, str] | None = None) -> list[ContractIssue]:
    """The free dimensions two components must share (``Family.same_sizes``) and do not: parts of
    pipelines exported at different sizes. A tensor ``infos`` lacks, or a dynamic dimension, is
    not compared."""
    files = files or {}
    issues = []
    for rule in family.same_sizes:
        (first, first_tensor), (second, second_tensor) = rule.first, rule.second
        one, other = _dims(infos, first, first_tensor), _dims(infos, second, second_tensor)
        if not one or not other or max(rule.axes) >= min(len(one), len(other)):
            continue
        one, other = [one[a] for a in rule.axes], [other[a] for a in rule.axes]
        if all(a == b or -1 in (a, b) for a, b in zip(one, other)):
            continue
        one, other = ([None if d == -1 else d for d in dims] for dims in (one, other))  # "?" in the message
        first_file = files.get(first, family.components[first].mnn_name)
        issues.append(ContractIssue(
            second, files.get(second, family.components[second].mnn_name), "size",
            f"{second_tensor!r} with the {rule.what} of {first_file}'s {first_tensor!r} ({_fmt_shape(one)})",
            f"{_fmt_shape(other)}: the parts were exported at different sizes; export the pipeline once at the "
            "size wanted and convert every part from that folder"))
    return issues


def tensor_infos(specs: dict[str, tuple[list, list]]) -> dict[str, dict]:
    """component -> (input TensorSpecs, output TensorSpecs) -> the ``infos`` check_tensors takes
    (symbolic dimensions become -1: dynamic)."""
    def dims(shape):
        return [d if isinstance(d, int) and d > 0 else -1 for d in shape]

    return {name: {"inputs": [t.name for t in ins],
                   "tensors": {t.name: {"shape": dims(t.shape), "dtype": t.dtype} for t in (*ins, *outs)}}
            for name, (ins, outs) in specs.items()}


def _check_tokenizer(mnn_dir: Path, family: Family) -> list[ContractIssue]:
    # SD:122-133 both SD1.5 and Taiyi load an MtokTokenizer from the bundle folder; TOK:15 reads
    # "<dir>/tokenizer.mtok" (no vocab.txt, no tokenizer.json). SD35:98-108 loads one from each of
    # tokenizer/, tokenizer_2/ and tokenizer_3/, T5's too when text_encoder_3.mnn is absent.
    issues = []
    for rel in bundle_mtoks(family):
        path = mnn_dir / rel
        if not path.is_file():
            issues.append(ContractIssue("tokenizer", rel, "missing file", "the tokenizer in MNN's binary format",
                                        "no such file; rebuild the bundle with sd2mnn convert"))
            continue
        with open(path, "rb") as stream:
            head = stream.read(16)
        if not head.startswith(MTOK_MAGIC):
            issues.append(ContractIssue("tokenizer", rel, "unreadable", "a file starting with the magic number 430",
                                        f"{head[:8]!r}; rebuild it with sd2mnn convert --overwrite"))
    return issues


def _check_vocabulary_fits(infos: dict[str, dict], family: Family) -> list[ContractIssue]:
    issues = []
    for name, spec in family.components.items():
        info = infos.get(name) or {}
        if not spec.prompt_ids or not info:
            continue
        ids = (info.get("tensors") or {}).get("input_ids")
        length = ids["shape"][1] if ids and len(ids["shape"]) == 2 else None
        issue = _runtime_ids_issue(info.get("vocabulary"), length, spec.mnn_name, family, name)
        issues += [issue] if issue else []
    return issues


def contract_components(mnn_dir: Path, family: Family) -> tuple[str, ...]:
    """What ``check_contract`` checks by default: the models the runtime loads, but for one it
    runs without (SD3.5's T5) when the bundle leaves it out, and any other the bundle has."""
    present = [n for n, s in family.components.items() if (mnn_dir / s.mnn_name).exists()]
    needed = [n for n in family.runtime_components if not family.components[n].runtime_optional]
    return tuple(n for n in family.components if n in needed or n in present)


def contract_notes(mnn_dir: str | Path, family: Family | None = None) -> list[str]:
    """What the bundle means to the runtime beyond pass or fail: the models it runs without."""
    mnn_dir = Path(mnn_dir)
    family = family or folder_family(mnn_dir)
    return [f"{spec.mnn_name} is absent: MNN's runtime goes on without {name} (for SD3.5's T5: zeros in place "
            f"of its states), a supported configuration; convert {name} to condition on it"
            for name, spec in family.components.items()
            if spec.runtime_optional and name in family.runtime_components and not (mnn_dir / spec.mnn_name).exists()]


def check_contract(mnn_dir: str | Path, components: tuple[str, ...] | list[str] | None = None,
                   family: Family | None = None) -> list[ContractIssue]:
    """Every way the bundle in ``mnn_dir`` deviates from what MNN's runtime for its family loads.

    ``components=None`` checks the runtime's models (and any other the bundle has; one the
    runtime runs without only when present); a list checks just those. The tokenizers are
    always checked. An empty list means it conforms. ``family``: the bundle's (default: detected).
    """
    mnn_dir = Path(mnn_dir)
    family = family or folder_family(mnn_dir)
    specs = family.components
    if components is None:
        components = contract_components(mnn_dir, family)
    issues: list[ContractIssue] = []
    readable = []
    for name in components:
        file_issues = _check_files(mnn_dir, name, family)
        issues += file_issues
        if not any(i.file == specs[name].mnn_name for i in file_issues):
            readable.append(name)
    found = read_tensors({n: (mnn_dir / specs[n].mnn_name, [*specs[n].inputs, *specs[n].outputs],
                              runtime_input_shapes(n, family)) for n in readable})
    infos = {name: info for name, info in found.items() if info is not None}
    for name in readable:
        if name not in infos:
            issues.append(ContractIssue(name, specs[name].mnn_name, "unreadable", "an MNN model file",
                                        "a file MNN cannot read; reconvert it (sd2mnn convert --overwrite)"))
    issues += check_tensors(infos, family)
    issues += _check_vocabulary_fits(infos, family)
    issues += _check_tokenizer(mnn_dir, family)
    return issues


def _main(argv: list[str]) -> int:
    """``python -m sd2mnn.core.contract REQUEST.json RESULT.json``: {key: [model, names[, shapes]]} -> {key: info}."""
    request, out = json.loads(Path(argv[0]).read_text()), Path(argv[1])
    result = {}
    for key, (model, names, *shapes) in request.items():
        try:
            result[key] = _describe_tensors(Path(model), names, *shapes)
        except Exception as err:  # MNN raises plain exceptions for unreadable files
            print(f"cannot read {model}: {err}", file=sys.stderr)
            result[key] = None
    out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
