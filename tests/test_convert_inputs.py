"""convert and demo against hostile or careless input: damaged external data, a commit that
fails half-way, folders holding other files, converter flags the converter ignores, a full disk,
odd paths and values. Each case runs the real CLI on real files; none may end in a traceback,
and a failed run leaves the previous bundle exactly as it was."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from conftest import tree_state


def sd2mnn_cli(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sd2mnn.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(done: subprocess.CompletedProcess, *expected: str) -> str:
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    for text in expected:
        assert text in errors[0], done.stderr
    return errors[0]


def visible(bundle: Path) -> dict[str, str]:
    """The bundle as its users see it (not the run's private work area)."""
    return {k: v for k, v in tree_state(bundle).items() if not k.startswith(".sd2mnn")}


def set_external_data(onnx_dir: Path, **entries: str) -> None:
    """Rewrite every unet initializer's external-data entries (location, offset, length)."""
    path = onnx_dir / "unet" / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key in entries:
                entry.value = entries[entry.key]
    onnx.save(model, str(path))


# -- external data that does not hold the model's weights --------------------------------------


def test_truncated_external_data_is_refused_before_converting(onnx_copy, bundle_copy):
    before = tree_state(bundle_copy)
    weights = onnx_copy / "unet" / "weights.pb"
    os.truncate(weights, 1_000_000)
    done = sd2mnn_cli("convert", onnx_copy, bundle_copy)
    assert_one_line_error(done, f"{weights} is too short for tensor", "the file has 1000000")
    assert tree_state(bundle_copy) == before


def test_external_data_in_the_model_file_itself(onnx_copy, bundle_copy):
    before = tree_state(bundle_copy)
    set_external_data(onnx_copy, location="model.onnx")
    done = sd2mnn_cli("convert", onnx_copy, bundle_copy)
    assert_one_line_error(done, "names itself as its external data file")
    assert tree_state(bundle_copy) == before


@pytest.mark.parametrize("how", ["weights.pb is a folder", "location ."])
def test_external_data_that_is_a_folder(onnx_copy, bundle_copy, how):
    before = tree_state(bundle_copy)
    weights = onnx_copy / "unet" / "weights.pb"
    if how == "location .":
        set_external_data(onnx_copy, location=".")
    else:
        weights.unlink()
        weights.mkdir()
        (weights / "data").write_bytes(b"x")
    done = sd2mnn_cli("convert", onnx_copy, bundle_copy)
    assert_one_line_error(done, "as its external data file, but that is a folder")
    assert tree_state(bundle_copy) == before


def test_external_length_that_disagrees_with_the_shape(onnx_copy, tmp_path):
    path = onnx_copy / "unet" / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    init = next(i for i in model.graph.initializer if i.external_data)
    length = next(e for e in init.external_data if e.key == "length")
    length.value = str(int(length.value) // 2)
    onnx.save(model, str(path))
    done = sd2mnn_cli("convert", onnx_copy, tmp_path / "b")
    assert_one_line_error(done, f"tensor {init.name!r} says its external data is", "its dtype and shape need")
    assert not (tmp_path / "b").exists()


# -- the commit: all or nothing ----------------------------------------------------------------

# Every file a commit of the three default components writes (the tokenizer's files only when
# they differ from the bundle's, which an obstacle in their place makes them), manifest last.
COMMIT_FILES = [
    *(f"{name}{suffix}" for name in ("text_encoder", "unet", "vae_decoder") for suffix in (".mnn", ".mnn.weight")),
    *(f"logs/{name}.log" for name in ("text_encoder", "unet", "vae_decoder")),
    "vocab.json", "tokenizer.mtok", "manifest.json",
]


@pytest.fixture(scope="module")
def waiting_w8(fp32_bundle, demo_onnx, tmp_path_factory) -> Path:
    """The fp32 bundle with an 8-bit conversion of every default component finished and
    waiting in .sd2mnn/pending (its commit failed: `logs` was a file). Copy it; do not modify."""
    bundle = tmp_path_factory.mktemp("waiting") / "bundle"
    shutil.copytree(fp32_bundle, bundle)
    shutil.rmtree(bundle / "logs")
    (bundle / "logs").write_text("not a folder\n")
    done = sd2mnn_cli("convert", demo_onnx, bundle, "--weight-quant-bits", "8", "-q")
    assert done.returncode != 0
    shutil.copytree(fp32_bundle / "logs", bundle / "logs.tmp")
    (bundle / "logs").unlink()
    (bundle / "logs.tmp").rename(bundle / "logs")
    assert sorted(p.name for p in (bundle / ".sd2mnn" / "pending").iterdir()) == ["text_encoder", "unet", "vae_decoder"]
    return bundle


def immutable(path: Path, on: bool) -> None:
    done = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True)
    if done.returncode != 0 and on:
        pytest.skip(f"chattr +i is not available here: {done.stderr.decode().strip()}")


def block(bundle: Path, rel: str) -> None:
    """Make the commit fail at ``rel``: a folder where the file must go (or, for the manifest,
    which a run reads first, an immutable file)."""
    target = bundle / rel
    if rel == "manifest.json":
        immutable(target, True)
        return
    target.unlink()
    target.mkdir()
    (target / "keep").write_text("a folder in a file's place\n")


def unblock(bundle: Path, rel: str) -> None:
    target = bundle / rel
    if rel == "manifest.json":
        immutable(target, False)
    elif target.is_dir():
        shutil.rmtree(target)


@pytest.mark.parametrize("rel", COMMIT_FILES)
def test_commit_failing_at_any_file_changes_nothing(waiting_w8, demo_onnx, tmp_path, rel):
    bundle = tmp_path / "bundle"
    shutil.copytree(waiting_w8, bundle)
    block(bundle, rel)
    try:
        before = visible(bundle)
        done = sd2mnn_cli("convert", demo_onnx, bundle, "--weight-quant-bits", "8", "-q")
        assert visible(bundle) == before
        assert_one_line_error(done, "cannot put the new files into", rel, "the bundle is unchanged")
        assert json.loads((bundle / "manifest.json").read_text())["converter_flags"] == []
    finally:
        unblock(bundle, rel)
    # The finished components still wait for the next run, which commits them.
    done = sd2mnn_cli("convert", demo_onnx, bundle, "--weight-quant-bits", "8", "--json")
    assert done.returncode == 0, done.stderr
    assert {c["status"] for c in json.loads(done.stdout)["components"]} == {"resumed"}, done.stdout
    assert json.loads((bundle / "manifest.json").read_text())["converter_flags"] == ["--weightQuantBits=8"]
    assert not (bundle / ".sd2mnn").exists()


def test_logs_that_is_a_file(waiting_w8, demo_onnx, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(waiting_w8, bundle)
    shutil.rmtree(bundle / "logs")
    (bundle / "logs").write_text("someone's notes\n")
    before = visible(bundle)
    done = sd2mnn_cli("convert", demo_onnx, bundle, "--weight-quant-bits", "8", "-q")
    assert_one_line_error(done, f"{bundle / 'logs'}", "the bundle is unchanged")
    assert visible(bundle) == before


@pytest.fixture
def tmpfs(tmp_path):
    """A small filesystem of its own (needs the right to mount: root in CI containers)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.parametrize("when", ["before the converter writes", "after the converter wrote"])
def test_disk_filling_up_during_the_run(fp32_bundle, demo_onnx, tmpfs, tmp_path, when):
    """Another program fills the disk while the run goes on: one line, nothing lost. (On a full
    disk the converter itself still reports "Converted Success!".)"""
    bundle = tmpfs / "bundle"
    shutil.copytree(fp32_bundle, bundle)
    before = visible(bundle)
    fill = f'case "$*" in *--MNNModel*) dd if=/dev/zero of="{tmpfs}/filler" bs=64k 2>/dev/null;; esac\n'
    convert = f'"{sys.executable}" -m sd2mnn.conversion._mnnconvert "$@"\n'
    converter = tmp_path / "MNNConvert-filling"
    converter.write_text("#!/bin/sh\n" + (fill + convert if when.startswith("before") else convert + fill))
    converter.chmod(0o755)
    done = sd2mnn_cli("convert", demo_onnx, bundle, "--components", "vae_decoder", "--weight-quant-bits", "8",
                      "--converter", converter, "-q")
    assert_one_line_error(done, "ran out of space", str(bundle))
    assert visible(bundle) == before


# -- folders that hold someone else's files ----------------------------------------------------


def test_folder_that_is_not_a_bundle_is_not_overwritten(demo_onnx, tmp_path):
    # Files the bundle does not have are no obstacle: they stay.
    other = tmp_path / "notes-only"
    other.mkdir()
    (other / "notes.txt").write_text("kept\n")
    done = sd2mnn_cli("convert", demo_onnx, other, "--components", "vae_decoder", "-q")
    assert done.returncode == 0, done.stderr
    assert (other / "notes.txt").read_text() == "kept\n"
    # Files it would replace are.
    folder = tmp_path / "mine"
    (folder / "logs").mkdir(parents=True)
    for rel in ("vocab.json", "vae_decoder.mnn", "logs/vae_decoder.log", "notes.txt"):
        (folder / rel).write_text(f"my own {rel}\n")
    before = tree_state(folder)
    done = sd2mnn_cli("convert", demo_onnx, folder, "--components", "vae_decoder")
    assert_one_line_error(done, "not an sd2mnn bundle", "vae_decoder.mnn", "logs/vae_decoder.log", "vocab.json", "--overwrite")
    assert tree_state(folder) == before
    done = sd2mnn_cli("convert", demo_onnx, folder, "--components", "vae_decoder", "--force", "-q")
    assert done.returncode == 0, done.stderr
    assert (folder / "notes.txt").read_text() == "my own notes.txt\n"  # not the bundle's: kept
    assert (folder / "vae_decoder.mnn").stat().st_size > 1000


def test_demo_does_not_replace_another_bundle(fp32_bundle, tmp_path):
    bundle = tmp_path / "other"
    shutil.copytree(fp32_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["onnx_dir"] = str(tmp_path / "some-other-onnx")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    before = tree_state(bundle)
    done = sd2mnn_cli("demo", bundle, "-q")
    assert_one_line_error(done, f"{bundle} already holds a bundle converted from {tmp_path / 'some-other-onnx'}", "--overwrite")
    assert tree_state(bundle) == before
    done = sd2mnn_cli("demo", bundle, "-q", "--force")
    assert done.returncode == 0, done.stderr
    assert json.loads((bundle / "manifest.json").read_text())["onnx_dir"] != manifest["onnx_dir"]


# -- converter flags the converter would ignore ------------------------------------------------


def test_misspelt_extra_flag_is_refused(demo_onnx, tmp_path):
    done = sd2mnn_cli("convert", demo_onnx, tmp_path / "b", "--weightQuantBit=8")
    assert_one_line_error(done, "has no flag --weightQuantBit ", "did you mean --weightQuantBits?")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("extra", ["--weightQuantBits=99", "--weightQuantBits=1", "--weightQuantBits abc",
                                   "--weightQuantBlock=0"])
def test_extra_values_are_held_to_the_named_options_ranges(demo_onnx, tmp_path, extra):
    done = sd2mnn_cli("convert", demo_onnx, tmp_path / "b", extra)
    assert_one_line_error(done, "must be a whole number")
    assert not (tmp_path / "b").exists()


def test_extra_and_named_option_setting_one_flag_warn(demo_onnx, tmp_path):
    done = sd2mnn_cli("convert", demo_onnx, tmp_path / "b", "--weight-quant-bits", "8", "--weightQuantBits=4",
                      "--components", "vae_decoder", "-q")
    assert done.returncode == 0, done.stderr
    assert ("warning: --weightQuantBits=8 (from sd2mnn's options) and --weightQuantBits=4 (from EXTRA) both set "
            "--weightQuantBits; the converter takes EXTRA's --weightQuantBits=4") in done.stderr


def test_flag_the_converter_ignores_fails_the_run(demo_onnx, tmp_path):
    """A converter whose --help sd2mnn cannot read: its log still tells an ignored flag."""
    converter = tmp_path / "MNNConvert-no-help"
    converter.write_text(f'#!/bin/sh\ncase "$*" in *--help*) exit 0;; esac\n'
                         f'exec "{sys.executable}" -m sd2mnn.conversion._mnnconvert "$@"\n')
    converter.chmod(0o755)
    done = sd2mnn_cli("convert", demo_onnx, tmp_path / "b", "--weightQuantBit=8", "--components", "vae_decoder",
                      "--converter", converter)
    assert_one_line_error(done, "the converter ignored the flag(s) --weightQuantBit")
    assert not (tmp_path / "b").exists()


# -- checked before any converter runs ----------------------------------------------------------


def test_bad_tokenizer_fails_before_any_converter(onnx_copy, tmp_path):
    config = onnx_copy / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "tokenizer_class": "NoSuchTokenizer"}))
    calls = tmp_path / "converter-calls"
    converter = tmp_path / "MNNConvert-counting"
    converter.write_text(f'#!/bin/sh\ncase "$*" in *--MNNModel*) echo "$*" >> "{calls}";; esac\n'
                         f'exec "{sys.executable}" -m sd2mnn.conversion._mnnconvert "$@"\n')
    converter.chmod(0o755)
    done = sd2mnn_cli("convert", onnx_copy, tmp_path / "b", "--converter", converter)
    assert_one_line_error(done, "NoSuchTokenizer")
    assert not calls.exists(), calls.read_text()
    assert not (tmp_path / "b").exists()


def test_disk_space_check_counts_the_tokenizer(bundle_copy, demo_onnx, monkeypatch):
    """Everything reused: the run still writes the tokenizer files and the manifest."""
    import sd2mnn
    from sd2mnn.conversion import convert as conversion
    from sd2mnn.errors import DiskSpaceError

    before = tree_state(bundle_copy)
    real = shutil.disk_usage
    monkeypatch.setattr(conversion.shutil, "disk_usage", lambda p: real(p)._replace(free=300_000))
    with pytest.raises(DiskSpaceError, match=r"has 293.0 KiB free but the conversion needs about 2.\d MiB"):
        sd2mnn.convert(demo_onnx, bundle_copy)
    assert tree_state(bundle_copy) == before


def test_read_only_output_folder_is_named_as_such(demo_onnx, tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        immutable(folder, True)  # root ignores the mode bits
    try:
        done = sd2mnn_cli("convert", demo_onnx, folder)
        assert_one_line_error(done, f"cannot write into {folder}")
    finally:
        if os.geteuid() == 0:
            immutable(folder, False)
        folder.chmod(0o755)


# -- many bad arguments: never a traceback -------------------------------------------------------


def bad_inputs(root: Path, demo_onnx: Path) -> list[tuple[list, str]]:
    """(arguments, what the error line must say) for inputs that must fail before any work."""
    out = root / "out"
    (root / "loop").symlink_to(root / "loop")
    (root / "a-file").write_text("x\n")
    dangling = root / "dangling"
    dangling.symlink_to(root / "nowhere")
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "unet.mnn").write_text("mine\n")
    dir_model = root / "dir-model"
    shutil.copytree(demo_onnx, dir_model)
    (dir_model / "vae_decoder" / "model.onnx").unlink()
    (dir_model / "vae_decoder" / "model.onnx").mkdir()
    truncated = root / "truncated"
    shutil.copytree(demo_onnx, truncated)
    os.truncate(truncated / "unet" / "weights.pb", 1_000_000)
    dot = root / "dot"
    shutil.copytree(demo_onnx, dot)
    set_external_data(dot, location=".")
    manifest_folder = root / "manifest-folder"
    (manifest_folder / "manifest.json").mkdir(parents=True)
    work_area_file = root / "work-area-file"
    work_area_file.mkdir()
    (work_area_file / ".sd2mnn").write_text("x\n")
    d = str(demo_onnx)
    return [
        (["convert", d, ""], 'MNN_DIR is an empty string'),
        (["convert", "", out], 'ONNX_DIR is an empty string'),
        (["convert", d, manifest_folder], 'cannot read'),
        (["convert", d, work_area_file], 'cannot write into'),
        (["convert", d, out, "--timeout", "nan"], '--timeout must be a positive number'),
        (["convert", d, out, "--timeout", "inf"], '--timeout must be a positive number'),
        (["convert", d, out, "--timeout", "-1"], '--timeout must be a positive number'),
        (["convert", d, out, "--timeout", "0"], '--timeout must be a positive number'),
        (["convert", d, out, "--jobs", "0"], '--jobs must be at least 1'),
        (["convert", d, out, "--weight-quant-bits", "9"], 'between 2 and 8'),
        (["convert", d, out, "--weight-quant-block", "64"], 'need --weight-quant-bits'),
        (["convert", d, out, "--weightQuantBit=8"], 'has no flag --weightQuantBit '),
        (["convert", d, out, "--weightQuantBits=99"], 'must be a whole number between 2 and 8'),
        (["convert", d, out, "--weightQuantBits"], 'needs a value'),
        (["convert", d, out, "--fp16 stray"], 'is not a converter flag'),
        (["convert", d, out, "--MNNModel=x.mnn"], 'set by sd2mnn itself'),
        (["convert", d, out, "--components", "nope"], 'unknown component'),
        (["convert", d, out, "--converter", root], 'is not an executable MNNConvert'),
        (["convert", d, root / "loop"], 'is a symbolic link loop'),
        (["convert", d, root / "loop" / "sub"], 'is a symbolic link loop'),
        (["convert", d, dangling], 'is a link to nothing'),
        (["convert", d, root / "a-file"], 'exists and is not a folder'),
        (["convert", d, root / "a-file" / "sub"], 'has a file where a folder should be'),
        (["convert", d, d], 'is the ONNX folder itself'),
        (["convert", d, foreign], 'not an sd2mnn bundle'),
        (["convert", root / "missing", out], 'does not exist'),
        (["convert", root / "a-file", out], 'is not a folder'),
        (["convert", root / "loop", out], ''),
        (["convert", dir_model, out], 'is a folder, not an ONNX file'),
        (["convert", truncated, out], 'is too short for tensor'),
        (["convert", dot, out], 'but that is a folder'),
        (["demo", ""], 'DIR is an empty string'),
        (["demo", foreign], 'already holds'),
        (["demo", root / "a-file"], 'exists and is not a folder'),
        (["demo", root / "loop"], 'is a symbolic link loop'),
    ]


def test_bad_arguments_never_end_in_a_traceback(demo_onnx, tmp_path):
    failures = []
    for args, expected in bad_inputs(tmp_path, demo_onnx):
        done = sd2mnn_cli(*args, timeout=300)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        if done.returncode == 0 or "Traceback" in done.stderr or len(errors) != 1 or expected not in errors[0]:
            failures.append(f"{' '.join(map(str, args))}: exit {done.returncode}, wanted {expected!r}\n{done.stderr[-2000:]}")
    assert not failures, "\n\n".join(failures)
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "foreign" / "unet.mnn").read_text() == "mine\n"



def test_bad_extra_flag_fails_before_an_export(tmp_path):
    """A diffusers folder is exported first (minutes): the converter flags are checked before."""
    model = tmp_path / "diffusers-model"
    model.mkdir()
    (model / "model_index.json").write_text("{}\n")
    done = sd2mnn_cli("convert", model, tmp_path / "b", "--weightQuantBit=8")
    assert_one_line_error(done, "has no flag --weightQuantBit ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diffusers-model"]
