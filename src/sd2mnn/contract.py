"""The runtime contract: does a bundle have what MNN's Stable Diffusion runtime loads?

MNN's ``stable_diffusion.cpp`` loads ``<dir>/text_encoder.mnn``, ``unet.mnn`` and
``vae_decoder.mnn`` with fixed input/output names (layout.COMPONENTS), reads each one's weights
from ``<model>.mnn.weight`` beside it, and feeds fixed shapes:

    text_encoder  input_ids int32 [2, L]  -> last_hidden_state [2, L, H], pooler_output [2, H]
    unet          sample f32 [2,4,64,64], timestep int32 [1], encoder_hidden_states f32 [2, L, H]
                  -> out_sample f32 [2,4,64,64]
    vae_decoder   latent_sample f32 [1,4,64,64] -> sample f32 [1,3,512,512]

L is 77 for SD1.5 and 512 for Taiyi; H is whatever the text encoder produces. The SD1.5 (CLIP)
tokenizer reads ``tokenizer.mtok`` (header ``430 <type>``); Taiyi's BERT tokenizer reads
``vocab.txt``. ``check_contract`` lists every deviation with what the runtime expects.

Reading an .mnn's tensors (``MNN.expr.load_as_dict``) happens in a child process
(``python -m sd2mnn.contract REQUEST.json OUT.json``), so neither a multi-GB model nor a file that
crashes MNN can hurt the caller.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from sd2mnn.layout import COMPONENTS, MTOK_NAME

# The components MNN's SD runtime loads; vae_encoder (img2img) is checked only when present.
RUNTIME_COMPONENTS = ("text_encoder", "unet", "vae_decoder")
TEXT_LENGTHS = {77: "SD1.5", 512: "Taiyi"}
MTOK_MAGIC = b"430"
LATENT = [1, 4, 64, 64]

# Problems after which the component cannot be run at all (fidelity checks are skipped).
BLOCKING = frozenset({"missing file", "empty file", "unreadable", "missing tensor"})


@dataclass(frozen=True)
class ContractIssue:
    component: str  # a component name, or "tokenizer"
    file: str  # bundle-relative
    kind: str  # "missing file", "empty file", "unreadable", "missing tensor", "dtype", "shape"
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


# -- reading an .mnn's tensors (child process) --------------------------------------------------

_DTYPES = {"float": "float32", "int": "int32", "uint8": "uint8", "double": "float64", "int64": "int64"}


def _describe_tensors(model: Path, names: list[str]) -> dict:
    """{"inputs": [input names], "tensors": {name: {"shape", "dtype"}}} for the named tensors."""
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
    return {"inputs": sorted(inputs), "tensors": tensors}


def child_env() -> dict[str, str]:
    """The environment for sd2mnn's child processes: they must import sd2mnn even when it runs
    from a source checkout that is not installed."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def _read_in_child(requests: dict[str, tuple[Path, list[str]]]) -> dict[str, dict] | None:
    with tempfile.TemporaryDirectory(prefix="sd2mnn-contract-") as tmp:
        request, out = Path(tmp) / "request.json", Path(tmp) / "tensors.json"
        request.write_text(json.dumps({k: [str(p.resolve()), names] for k, (p, names) in requests.items()}))
        done = subprocess.run([sys.executable, "-m", "sd2mnn.contract", str(request), str(out)],
                              stdin=subprocess.DEVNULL, capture_output=True, cwd=tmp, env=child_env())
        return json.loads(out.read_text()) if done.returncode == 0 and out.is_file() else None


def read_tensors(requests: dict[str, tuple[Path, list[str]]]) -> dict[str, dict | None]:
    """key -> ``_describe_tensors(path, names)``, or None where MNN cannot read the file.
    One child reads them all; if it crashes (a corrupt file can take MNN down), one child each."""
    if not requests:
        return {}
    found = _read_in_child(requests)
    if found is None:
        found = {}
        for key, item in requests.items():
            found.update(_read_in_child({key: item}) or {key: None})
    return {key: found.get(key) for key in requests}


# -- the checks ------------------------------------------------------------------------------


def expected_tensors(name: str, length: int, hidden: int | None) -> dict[str, tuple[str, list[int | None]]]:
    """Tensor name -> (dtype, shape) the runtime uses; None in a shape means "any"."""
    if name == "text_encoder":
        return {"input_ids": ("int32", [2, length]), "last_hidden_state": ("float32", [2, length, hidden]),
                "pooler_output": ("float32", [2, hidden])}
    if name == "unet":
        return {"sample": ("float32", [2, 4, 64, 64]), "timestep": ("int32", [1]),
                "encoder_hidden_states": ("float32", [2, length, hidden]), "out_sample": ("float32", [2, 4, 64, 64])}
    if name == "vae_decoder":
        return {"latent_sample": ("float32", LATENT), "sample": ("float32", [1, 3, 512, 512])}
    return {"sample": ("float32", [1, 3, 512, 512]), "latent_sample": ("float32", LATENT)}  # vae_encoder


def _shape_matches(found: list[int], expected: list[int | None]) -> bool:
    # A dimension MNN stores as -1 is dynamic: the runtime's fixed shape fits it.
    return len(found) == len(expected) and all(e is None or f in (e, -1) for f, e in zip(found, expected))


def _fmt_shape(shape: list[int | None]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def _check_files(mnn_dir: Path, name: str) -> list[ContractIssue]:
    spec = COMPONENTS[name]
    issues = []
    for file, what in ((spec.mnn_name, f"the {name} model"), (spec.weight_name, f"the {name} weights beside {spec.mnn_name}")):
        path = mnn_dir / file
        if not path.is_file():
            issues.append(ContractIssue(name, file, "missing file", what, "no such file; convert it (sd2mnn convert)"))
        elif path.stat().st_size == 0:
            issues.append(ContractIssue(name, file, "empty file", what, "0 bytes; reconvert it (sd2mnn convert --force)"))
    return issues


def _check_tensors(name: str, info: dict, length: int, hidden: int | None) -> list[ContractIssue]:
    spec = COMPONENTS[name]
    issues = []
    for tensor, (dtype, shape) in expected_tensors(name, length, hidden).items():
        role = "input" if tensor in spec.inputs else "output"
        found = info["tensors"].get(tensor)
        if found is None or (role == "input" and tensor not in info["inputs"]):
            have = f"inputs {info['inputs']}" if role == "input" else "no tensor of that name"
            issues.append(ContractIssue(
                name, spec.mnn_name, "missing tensor",
                f"{role} {tensor!r} (loaded with inputs {list(spec.inputs)}, outputs {list(spec.outputs)})",
                f"{have}; re-export the ONNX model with that {role} and reconvert"))
            continue
        if found["dtype"] != dtype:
            issues.append(ContractIssue(name, spec.mnn_name, "dtype", f"{role} {tensor!r} as {dtype}", found["dtype"]))
        if not _shape_matches(found["shape"], shape):
            issues.append(ContractIssue(
                name, spec.mnn_name, "shape", f"{role} {tensor!r} of shape {_fmt_shape(shape)}", _fmt_shape(found["shape"])))
    return issues


def _check_tokenizer(mnn_dir: Path, length: int) -> list[ContractIssue]:
    if length == 512:  # Taiyi: MNN's BertTokenizer reads vocab.txt from the bundle folder
        if not (mnn_dir / "vocab.txt").is_file():
            return [ContractIssue("tokenizer", "vocab.txt", "missing file", "the Taiyi BERT vocabulary",
                                  "no such file; copy the pipeline's tokenizer/vocab.txt into the bundle")]
        return []
    path = mnn_dir / MTOK_NAME
    if not path.is_file():
        return [ContractIssue("tokenizer", MTOK_NAME, "missing file", "the CLIP tokenizer in MNN's binary format",
                              "no such file; rebuild the bundle with sd2mnn convert")]
    with open(path, "rb") as stream:
        head = stream.read(16)
    if not head.startswith(MTOK_MAGIC):
        return [ContractIssue("tokenizer", MTOK_NAME, "unreadable", "a file starting with the magic number 430",
                              f"{head[:8]!r}; rebuild it with sd2mnn convert --force")]
    return []


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

    # L and H come from the text encoder (else the unet): the runtime sizes its inputs from them.
    length, hidden = 77, None
    source = infos.get("text_encoder", {}).get("tensors", {})
    if "input_ids" in source and len(source["input_ids"]["shape"]) == 2:
        length = source["input_ids"]["shape"][1]
    elif "encoder_hidden_states" in infos.get("unet", {}).get("tensors", {}):
        length = infos["unet"]["tensors"]["encoder_hidden_states"]["shape"][1]
    if "last_hidden_state" in source:
        hidden = source["last_hidden_state"]["shape"][-1]
    elif "encoder_hidden_states" in infos.get("unet", {}).get("tensors", {}):
        hidden = infos["unet"]["tensors"]["encoder_hidden_states"]["shape"][-1]
    if length not in TEXT_LENGTHS:
        issues.append(ContractIssue("text_encoder", COMPONENTS["text_encoder"].mnn_name, "shape",
                                    "prompts of 77 tokens (SD1.5) or 512 (Taiyi)", f"{length} tokens"))
        length = 77
    for name, info in infos.items():
        issues += _check_tensors(name, info, length, hidden)
    issues += _check_tokenizer(mnn_dir, length)
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
