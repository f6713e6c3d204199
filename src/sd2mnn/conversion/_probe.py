"""Child-process check that a converted model loads in MNN as the runtime loads it.

``python -m sd2mnn.conversion._probe MODEL.mnn RESULT.json --inputs a,b --outputs c`` writes the inputs'
and outputs' names, shapes and dtypes to RESULT.json, or exits non-zero with the reason on
stderr. It runs apart from sd2mnn so a crash in MNN cannot take sd2mnn down.

Both MNN calls here read the graph, not the weights: a full-size UNet checks in 0.3 s and 45 MB.
(Loading it with shape_mutable=False, as the C++ runtime does, prepares every kernel: 45 s and
9.8 GB here; that belongs to `sd2mnn verify`, which runs the model for real.)
"""
import argparse
import json
import sys
from pathlib import Path

_DTYPES = {"float": "float32", "int": "int32", "uint8": "uint8", "double": "float64", "int64": "int64"}


def _spec(name, var):
    dtype = str(var.dtype).rsplit(".", 1)[-1]
    return {"name": name, "shape": [int(d) for d in var.shape], "dtype": _DTYPES.get(dtype, dtype)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("result", type=Path)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--outputs", required=True)
    parser.add_argument("--sizes", default="{}", help="JSON: input -> the runtime's shape for it (None: free)")
    args = parser.parse_args(argv)
    inputs, outputs = args.inputs.split(","), args.outputs.split(",")

    weight = args.model.with_name(args.model.name + ".weight")
    if not args.model.is_file() or args.model.stat().st_size == 0:
        print(f"probe: {args.model} was not written", file=sys.stderr)
        return 1
    if not weight.is_file() or weight.stat().st_size == 0:
        print(f"probe: {weight} was not written", file=sys.stderr)
        return 1

    import MNN.expr as F
    import MNN.nn as nn

    from sd2mnn.core.contract import size_free_inputs

    variables = F.load_as_dict(str(args.model))
    missing = [n for n in inputs + outputs if n not in variables]
    if missing:
        print(f"probe: {args.model} has no tensor named {', '.join(missing)}", file=sys.stderr)
        return 1
    try:
        module = nn.load_module_from_file(str(args.model), inputs, outputs)
    except Exception as err:
        print(f"probe: MNN cannot load {args.model}: {err}", file=sys.stderr)
        return 1
    if module is None:
        print(f"probe: MNN cannot load {args.model}", file=sys.stderr)
        return 1
    size_free_inputs(variables, json.loads(args.sizes))
    unknown = [n for n in inputs + outputs if variables[n].shape is None]
    if unknown:
        print(f"probe: MNN cannot tell the shape of {', '.join(unknown)} in {args.model} (a shape the graph "
              "computes at run time, e.g. through an If); export it with static shapes", file=sys.stderr)
        return 1
    result = {
        "inputs": [_spec(n, variables[n]) for n in inputs],
        "outputs": [_spec(n, variables[n]) for n in outputs],
    }
    args.result.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
