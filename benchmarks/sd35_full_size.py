"""SD3.5 Medium at full size (random weights): sd2mnn export, convert, verify and bench against
MNN's own convert_mnn_sd35.py flow, run in the same script. Prints one JSON object.

    python benchmarks/sd35_full_size.py WORK_DIR [--transformer-size 256] [--no-bench]
                                        [--min-free-gib 1.0] [--step-timeout SECONDS]

The pipeline is built by benchmarks/_sd35_model.py (SD3.5 Medium's configs: the 2.5B MMDiT
transformer, CLIP-L, CLIP-G, the 16-channel VAE; no T5, which does not fit here). Every step is a
child process (its whole process tree sampled for summed RSS, and wait4's ru_maxrss), run one
after another, the small parts first and the transformer last:

  export           sd2mnn export (each part checked against PyTorch): CLIP-L, CLIP-G and the VAE
                   decoder at the model's 1024x1024; the transformer at 1024x1024 (which export's
                   own memory estimate may refuse), then at --transformer-size
  mnn flow         what MNN's transformers/diffusion/export/convert_mnn_sd35.py does (its five
                   converter calls, each result printed and ignored, then its export_sd35_mtok
                   with llmexport's LlmTokenizer), through the converter sd2mnn uses
  convert fp32     sd2mnn convert, default flags;  verify: per component MNN vs ONNX Runtime, the
                   runtime contract, the CLIPs' conditioning on the built-in prompt corpus
  convert w8       sd2mnn convert --weight-quant-bits 8 of the text encoders and the transformer,
                   and its verify
  flow conditioning  the mnn flow bundle's CLIP tokenizers checked as verify checks sd2mnn's
  bench            sd2mnn bench --onnx on the fp32 bundle (skipped with --no-bench)
  1024             where export's estimate refused the transformer at 1024x1024 (the runtime's
                   size), the same export with the machine's whole memory as its budget, then
                   convert and bench at that size (skipped with --no-1024)

A step whose process tree leaves less than --min-free-gib of the machine's memory available is
killed (its process group) and recorded as not fitting, with the peak seen; a step over
--step-timeout likewise. Results are kept in WORK_DIR/results.json as each step ends (a rerun
skips what is there: delete the file or a step's entry to redo it) and logged in
WORK_DIR/progress.log, so an interrupted run still yields its numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _measure import tree_rss  # noqa: E402

MNN_FLOW_SCRIPT = Path("/work/mnn-src/transformers/diffusion/export/convert_mnn_sd35.py")
SMALL = ("text_encoder", "text_encoder_2", "vae_decoder")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# convert_mnn_sd35.py's model list, T5 included: it converts each name it has, whatever exists.
FLOW_MODELS = ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder")
SD2MNN = [sys.executable, "-m", "sd2mnn.cli"]
GiB = 2**30


# ---------------------------------------------------------------------------------------------
# Measuring a child process tree, with a memory guard
# ---------------------------------------------------------------------------------------------
def guarded_run(argv: list[str], log: Path, min_free: int, timeout: float, cwd: Path | None = None,
                stdout: Path | None = None, interval: float = 0.1) -> dict:
    """Run ``argv`` in its own process group; kill the group if the machine's available memory
    falls below ``min_free`` bytes or after ``timeout`` s. {returncode, wall_s, tree_peak_bytes,
    maxrss_bytes, min_available_bytes, stopped}."""
    import psutil

    started = time.monotonic()
    with open(log, "ab") as err, open(stdout or log, "ab") as out:
        proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
    tree_peak, low, stopped = 0, psutil.virtual_memory().available, None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        tree_peak = max(tree_peak, tree_rss(proc.pid))
        low = min(low, psutil.virtual_memory().available)
        if stopped is None and (low < min_free or time.monotonic() - started > timeout):
            stopped = "memory" if low < min_free else "timeout"
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(interval)
    if stopped is None:
        try:  # whatever the child left running in its group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return {"returncode": os.waitstatus_to_exitcode(status), "wall_s": round(time.monotonic() - started, 1),
            "tree_peak_gib": round(tree_peak / GiB, 2), "maxrss_gib": round(usage.ru_maxrss * 1024 / GiB, 2),
            "min_available_gib": round(low / GiB, 2), "stopped": stopped}


class Run:
    """The work folder, the results so far and the steps' shared settings."""

    def __init__(self, work: Path, args):
        self.work, self.args = work, args
        self.results_path = work / "results.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        self.log = work / "progress.log"
        self.diffusers = work / "diffusers"
        self.onnx = work / "onnx"  # every exported part, moved here from its export folder
        self.fp32, self.w8, self.flow = work / "mnn-fp32", work / "mnn-w8", work / "mnn-flow"

    def say(self, message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {message}"
        print(line, file=sys.stderr, flush=True)
        with open(self.log, "a") as f:
            f.write(line + "\n")

    def save(self, name: str, record: dict) -> dict:
        self.results[name] = record
        tmp = self.results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=2))
        os.replace(tmp, self.results_path)
        return record

    def step(self, name: str, argv: list[str], parse=None, json_out: bool = False) -> dict:
        """Run one measured step (skipped when its result is kept); ``parse(stdout_text)`` adds figures."""
        if name in self.results:
            self.say(f"{name}: kept from results.json")
            return self.results[name]
        import psutil

        available = psutil.virtual_memory().available
        self.say(f"{name}: start ({available / GiB:.1f} GiB available): {' '.join(argv[2:])}")
        out = self.work / "logs" / f"{name}.out"
        out.parent.mkdir(exist_ok=True)
        out.unlink(missing_ok=True)
        record = guarded_run(argv, self.work / "logs" / f"{name}.log", int(self.args.min_free_gib * GiB),
                             self.args.step_timeout, cwd=ROOT, stdout=out)
        record["command"] = " ".join(str(a) for a in argv[2:])
        if record["stopped"] == "memory":
            record["does_not_fit"] = (f"stopped with {record['min_available_gib']} GiB available, its process tree "
                                      f"at {record['tree_peak_gib']} GiB: does not fit in this machine's memory")
        text = out.read_text(errors="replace")
        # verify and bench print their JSON when a check fails too (exit 1): read it all the same.
        if parse and (record["returncode"] == 0 or json_out and text.strip().startswith("{")):
            try:
                record.update(parse(text))
            except Exception as err:  # a figure missing from a partial output: keep the measure
                record["parse_error"] = f"{type(err).__name__}: {err}"
        if record["returncode"] != 0:
            log = (self.work / "logs" / f"{name}.log").read_text(errors="replace").strip().splitlines()
            record["error_tail"] = log[-3:]
        self.say(f"{name}: rc {record['returncode']}, {record['wall_s']} s, tree peak {record['tree_peak_gib']} GiB"
                 + (f", stopped ({record['stopped']})" if record["stopped"] else ""))
        return self.save(name, record)


# ---------------------------------------------------------------------------------------------
# Reading the commands' JSON
# ---------------------------------------------------------------------------------------------
def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and "lock" not in p.name}


def parse_convert(text: str) -> dict:
    data = json.loads(text)
    return {"convert_wall_s": data["wall_s"], "jobs": data["jobs"],
            "components": {c["name"]: {"status": c["status"], "wall_s": c["wall_s"],
                                       "peak_rss_gib": round((c["peak_rss_bytes"] or 0) / GiB, 2),
                                       "files": {o["path"]: o["size"] for o in c["outputs"]}}
                           for c in data["components"]}}


def parse_verify(text: str) -> dict:
    data = json.loads(text)
    out = {"passed": data["passed"], "failures": data["failures"], "notes": data.get("notes"), "components": {}}
    for comp in data["components"]:
        out["components"][comp["name"]] = {
            "passed": comp["passed"], "inputs": comp["inputs"],
            "outputs": {o["name"]: {"psnr_db": o["psnr"], "max_abs": o["max_abs"], "mean_abs": o["mean_abs"],
                                    "cosine": o["cosine"]} for o in comp["outputs"]},
            "run_wall_s": {r["runtime"]: r["wall_s"] for r in comp["runs"]},
            "contract": [c["message"] for c in comp.get("contract") or []],
            "error": comp.get("error"),
        }
    out["conditioning"] = {c["component"]: _conditioning(c) for c in data.get("conditionings") or []}
    return out


def _conditioning(c: dict) -> dict:
    return {"tokenizer_scheme": c["tokenizer_scheme"], "prompts": c["prompts"], "identical_prompts": c["identical_prompts"],
            "prompt_share": round(c["prompt_share"], 4), "position_share": round(c["position_share"], 4),
            "worst_cosine": c["worst_cosine"], "matching_cosine": c["matching_cosine"], "embedded": c["embedded"]}


def parse_bench(text: str) -> dict:
    data = json.loads(text)
    out = {"threads": data["threads"], "runs": data["runs"], "errors": data["errors"], "components": {}}
    for comp in data["components"]:
        t = comp["timings"]
        out["components"][comp["name"]] = {
            "inputs": comp["inputs"],
            **{rt: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in t[rt].items()
                    if k in ("load_s", "first_s", "steady_median_s", "error")}
               | {"peak_rss_gib": round((t[rt]["peak_rss_bytes"] or 0) / GiB, 2)} for rt in t},
            "mnn_over_onnxruntime": comp.get("mnn_over_onnxruntime"),
        }
    return out


# ---------------------------------------------------------------------------------------------
# MNN's own flow (convert_mnn_sd35.py), in a child
# ---------------------------------------------------------------------------------------------
def mnn_flow(onnx_root: Path, mnn_root: Path, models: list[str], tokenizers: bool, report: Path,
             extra: dict[str, list[str]] | None = None) -> None:
    """convert_mnn_sd35.py's convert() for ``models`` (each converter call's outcome printed and
    ignored, as it does; here also recorded in ``report``), then its export_sd35_mtok, called as
    it is, with llmexport's LlmTokenizer as its ``utils.tokenizer``. ``extra``: flags a model's
    call adds (MNN's Wan script quantizes its text encoder by default)."""
    import importlib.util

    sys.path.insert(0, str(ROOT / "src"))
    from sd2mnn.conversion.converter import find_converter

    converter = find_converter()
    mnn_root.mkdir(parents=True, exist_ok=True)
    done = json.loads(report.read_text()) if report.exists() else {}
    for model in models:
        model_file = onnx_root / model / "model.onnx"
        out_file = mnn_root / f"{model}.mnn"
        cmd = converter.argv(["-f", "ONNX", "--modelFile", str(model_file), "--MNNModel", str(out_file),
                              "--saveExternalData=1", *(extra or {}).get(model, [])])
        started = time.monotonic()
        result = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        print(result.stdout[-2000:], flush=True)
        done[model] = {"converter_returncode": result.returncode, "wall_s": round(time.monotonic() - started, 1),
                       "mnn_written": out_file.is_file(),
                       "files": {p.name: p.stat().st_size for p in mnn_root.glob(f"{model}.mnn*")},
                       "converter_said": [line for line in result.stdout.splitlines()
                                          if any(w in line.lower() for w in ("error", "fail", "not exist", "can't",
                                                                             "cannot"))][-3:]}
        report.write_text(json.dumps(done, indent=2))
    if tokenizers:
        spec = importlib.util.find_spec("llmexport")
        if spec is None:
            done["tokenizers"] = {"error": "llmexport is not installed: convert_mnn_sd35.py's tokenizer export cannot run"}
        else:
            # llmexport's top-level import is broken; its tokenizer module imports as utils.tokenizer,
            # which is the name convert_mnn_sd35.py imports it by.
            sys.path.insert(0, list(spec.submodule_search_locations)[0])
            import utils.tokenizer  # noqa: F401

            module_spec = importlib.util.spec_from_file_location("convert_mnn_sd35", MNN_FLOW_SCRIPT)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            module.export_sd35_mtok(str(onnx_root), str(mnn_root))
            done["tokenizers"] = {name: (mnn_root / name / "tokenizer.mtok").is_file()
                                  for name in ("tokenizer", "tokenizer_2", "tokenizer_3")}
        report.write_text(json.dumps(done, indent=2))


def export_whole_memory(diffusers: Path, out: Path) -> None:
    """sd2mnn export of the transformer at its own size, the check's memory estimate judged
    against the machine's whole memory instead of what is available now (the guard stops it if
    it does not fit)."""
    import psutil

    sys.path.insert(0, str(ROOT / "src"))
    from sd2mnn.exporting.export import ExportOptions, export

    say = lambda component, message: print(f"[export] {component}: {message}", file=sys.stderr, flush=True)  # noqa: E731
    export(diffusers, out, ExportOptions(components=("transformer",), memory_budget=psutil.virtual_memory().total),
           progress=say)


def flow_conditioning(onnx_root: Path, mnn_root: Path, embedded: int) -> None:
    """The CLIP tokenizers of the mnn flow bundle, checked as verify checks a bundle's (ids on the
    built-in corpus; the text embeddings of ``embedded`` differing prompts through both chains)."""
    sys.path.insert(0, str(ROOT / "src"))
    from sd2mnn.verification import conditioning as verify_conditioning
    from sd2mnn.families.sd35 import SD35

    verify_conditioning.EMBEDDED_DIFFERING = embedded  # CLIP-G at full size: a few seconds per prompt and runtime
    out = {}
    for component in TEXT_ENCODERS:
        if not (mnn_root / f"{component}.mnn").is_file():
            out[component] = {"error": f"{component}.mnn missing"}
            continue
        report = verify_conditioning.check_conditioning(onnx_root, mnn_root, threads=2, isolate=True,
                                                        workdir=mnn_root.parent, family=SD35, component=component)
        out[component] = {**_conditioning(report.to_dict()), "example_differing": report.differing[:3]}
    print(json.dumps(out))


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def move_into(src: Path, dst: Path) -> None:
    """Move the folder ``src``'s entries into ``dst`` (a rename: no second copy on disk; hard
    links would not do, as onnx's checker refuses external data with several links)."""
    if not src.is_dir():
        return
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if not (dst / path.name).exists():
            path.rename(dst / path.name)


def export_figures(folder: Path, components) -> dict:
    return {c: {"files": _files(folder / c)} for c in components if (folder / c).is_dir()}


def me(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def run_all(run: Run) -> None:
    args, work = run.args, run.work
    py = sys.executable
    mb = run.step("build", [py, str(HERE / "_sd35_model.py"), str(run.diffusers)])
    if mb["returncode"] != 0:
        return

    # --- the small parts: CLIP-L, CLIP-G, the VAE decoder at 1024x1024 ---
    parts = work / "onnx-parts"
    rec = run.step("export_small", [*SD2MNN, "export", str(run.diffusers), str(parts), "--components", ",".join(SMALL)])
    if rec["returncode"] == 0:
        if "onnx" not in rec:
            rec["onnx"] = export_figures(parts, SMALL)
            run.save("export_small", rec)
        move_into(parts, run.onnx)
        flow_report = work / "mnn-flow-report.json"
        rec = run.step("flow_small", me("--mnn-flow", str(run.onnx), str(run.flow), str(flow_report),
                                        "text_encoder,text_encoder_2,text_encoder_3,vae_decoder", "--tokenizers"))
        if "flow" not in rec and flow_report.exists():
            rec["flow"] = json.loads(flow_report.read_text())
            run.save("flow_small", rec)
        run.step("convert_fp32_small", [*SD2MNN, "convert", str(run.onnx), str(run.fp32), "--components",
                                        ",".join(SMALL), "--json"], parse_convert)
        run.step("verify_fp32_small", [*SD2MNN, "verify", str(run.onnx), str(run.fp32), "--components",
                                       ",".join(SMALL), "--threads", "2", "--json"], parse_verify, json_out=True)
        run.step("convert_w8_text_encoders", [*SD2MNN, "convert", str(run.onnx), str(run.w8), "--components",
                                              ",".join(TEXT_ENCODERS), "--weight-quant-bits", "8", "--json"],
                 parse_convert)
        run.step("verify_w8_text_encoders", [*SD2MNN, "verify", str(run.onnx), str(run.w8), "--components",
                                             ",".join(TEXT_ENCODERS), "--threads", "2", "--json"],
                 parse_verify, json_out=True)
        run.step("flow_conditioning", me("--flow-conditioning", str(run.onnx), str(run.flow)),
                 lambda text: {"conditioning": json.loads(text.strip().splitlines()[-1])})
        if not args.no_bench:
            run.step("bench_small", [*SD2MNN, "bench", str(run.fp32), "--onnx", str(run.onnx), "--components",
                                     ",".join(SMALL), "--runs", "1", "--threads", "2", "--json"], parse_bench,
                     json_out=True)

    # --- the 2.5B transformer ---
    full = work / "onnx-transformer-1024"
    run.step("export_transformer_1024", [*SD2MNN, "export", str(run.diffusers), str(full), "--components", "transformer"])
    size = args.transformer_size
    tdir = work / f"onnx-transformer-{size}"
    rec = run.step(f"export_transformer_{size}", [*SD2MNN, "export", str(run.diffusers), str(tdir), "--components",
                                                  "transformer", "--height", str(size), "--width", str(size)])
    if rec["returncode"] != 0:
        return
    if "onnx" not in rec:
        rec["onnx"] = export_figures(tdir, ("transformer",))
        run.save(f"export_transformer_{size}", rec)
    move_into(tdir, run.onnx)
    flow_report = work / "mnn-flow-report.json"
    rec = run.step("flow_transformer", me("--mnn-flow", str(run.onnx), str(run.flow), str(flow_report), "transformer"))
    if "flow" not in rec and flow_report.exists():
        rec["flow"] = json.loads(flow_report.read_text()).get("transformer")
        run.save("flow_transformer", rec)
    # Its size is recorded; the disk is needed for sd2mnn's own bundles.
    for p in run.flow.glob("transformer.mnn*"):
        p.unlink()
    run.step("convert_fp32_transformer", [*SD2MNN, "convert", str(run.onnx), str(run.fp32), "--components",
                                          "transformer", "--json"], parse_convert)
    run.step("verify_fp32_transformer", [*SD2MNN, "verify", str(run.onnx), str(run.fp32), "--components",
                                         "transformer", "--threads", "2", "--json"], parse_verify, json_out=True)
    run.step("convert_w8_transformer", [*SD2MNN, "convert", str(run.onnx), str(run.w8), "--components",
                                        "transformer", "--weight-quant-bits", "8", "--json"], parse_convert)
    run.step("verify_w8_transformer", [*SD2MNN, "verify", str(run.onnx), str(run.w8), "--components",
                                       "transformer", "--threads", "2", "--json"], parse_verify, json_out=True)
    if not args.no_bench:
        run.step("bench_transformer", [*SD2MNN, "bench", str(run.fp32), "--onnx", str(run.onnx), "--components",
                                       "transformer", "--runs", "1", "--threads", "2", "--json"], parse_bench,
                 json_out=True)

    # --- the transformer at the runtime's 1024x1024, if export's estimate refused it above ---
    if args.no_1024 or run.results["export_transformer_1024"]["returncode"] == 0:
        return
    # Two more copies of the 9 GB transformer follow (ONNX, MNN): the smaller export's fp32 MNN
    # files, measured above, make room for them.
    for p in run.fp32.glob("transformer.mnn*"):
        p.unlink()
    rec = run.step("export_transformer_1024_whole_memory", me("--export-whole-memory", str(run.diffusers), str(full)))
    if rec["returncode"] != 0:
        return
    if "onnx" not in rec:
        rec["onnx"] = export_figures(full, ("transformer",))
        run.save("export_transformer_1024_whole_memory", rec)
    bundle = work / "mnn-fp32-1024"
    rec = run.step("convert_fp32_transformer_1024", [*SD2MNN, "convert", str(full), str(bundle), "--components",
                                                     "transformer", "--json"], parse_convert)
    if rec["returncode"] == 0 and not args.no_bench:
        run.step("bench_transformer_1024", [*SD2MNN, "bench", str(bundle), "--onnx", str(full), "--components",
                                            "transformer", "--runs", "1", "--threads", "2", "--json"], parse_bench,
                 json_out=True)


def add_guard_arguments(parser: argparse.ArgumentParser, timeout: float) -> None:
    """The memory guard's and the time limit's options, shared by the full-size scripts."""
    parser.add_argument("--min-free-gib", type=float, default=1.0,
                        help="stop a step when the machine's available memory falls below this (default 1.0)")
    parser.add_argument("--step-timeout", type=float, default=timeout,
                        help=f"stop a step after this long (default {timeout:g} s)")


def run_then_print(args: argparse.Namespace, body, summary) -> int:
    """The run in ``args.work`` (made if missing): ``body(run)``, then ``summary(run)`` printed as
    JSON whatever happened, so an interrupted run still yields its numbers."""
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    run = Run(work, args)
    try:
        body(run)
    finally:
        json.dump(summary(run), sys.stdout, indent=2)
        print()
    return 0


def summary(run: Run) -> dict:
    import psutil

    r = run.results
    out = {"conditions": {
        "machine": f"{os.cpu_count()} cores, {psutil.virtual_memory().total / GiB:.0f} GiB memory, no GPU",
        "model": "SD3.5 Medium's architecture, seeded random weights (benchmarks/_sd35_model.py); no T5",
        "transformer_export_size": run.args.transformer_size,
        "min_free_gib": run.args.min_free_gib,
    }, "steps": r}
    out["bundle_files"] = {name: _files(folder) for name, folder in
                           (("fp32", run.fp32), ("w8", run.w8), ("mnn_flow", run.flow),
                            ("fp32_1024_transformer", run.work / "mnn-fp32-1024")) if folder.is_dir()}
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--mnn-flow":
        onnx_root, mnn_root, report, models = sys.argv[2:6]
        mnn_flow(Path(onnx_root), Path(mnn_root), models.split(","), "--tokenizers" in sys.argv, Path(report))
        return 0  # as convert_mnn_sd35.py: whatever the converter said
    if len(sys.argv) > 1 and sys.argv[1] == "--export-whole-memory":
        export_whole_memory(Path(sys.argv[2]), Path(sys.argv[3]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--flow-conditioning":
        flow_conditioning(Path(sys.argv[2]), Path(sys.argv[3]), embedded=8)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--transformer-size", type=int, default=256,
                        help="image size the transformer is exported and checked at, when 1024 cannot be (default 256)")
    parser.add_argument("--no-bench", action="store_true", help="leave out sd2mnn bench")
    parser.add_argument("--no-1024", action="store_true",
                        help="do not retry the transformer at 1024x1024 with the whole memory as export's budget")
    add_guard_arguments(parser, 3600)
    return run_then_print(parser.parse_args(), run_all, summary)


if __name__ == "__main__":
    sys.exit(main())
