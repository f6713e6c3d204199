"""The real thing: MNN's own C++ tokenizer gives, for every prompt of the corpus, exactly the ids
sd2mnn's PromptTokenizer says the runtime feeds the text encoder, for the .mtok of each scheme,
on SD1.5's real CLIP tokenizer.

Opt-in: it needs MNN's tokenizer built from MNN's source (scripts/build_mnn_tokenizer.sh, about
a minute: it compiles the runtime's tokenizer sources alone), so CI does not build one. Point
SD2MNN_MNN_TOKENIZER at the binary to run it:

    scripts/build_mnn_tokenizer.sh ~/MNN build/
    SD2MNN_MNN_TOKENIZER=build/mnn_tokenizer pytest tests/test_mnn_tokenizer_match.py
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from clip_tokenizer import write_sd15_tokenizer

from sd2mnn.families import SD15
from sd2mnn.tokenization.diffusers_scheme import SCHEMES
from sd2mnn.tokenization.reader import PromptTokenizer
from sd2mnn.tokenization.writer import write_mtok

MNN_TOKENIZER = os.environ.get("SD2MNN_MNN_TOKENIZER")
pytestmark = pytest.mark.skipif(
    not MNN_TOKENIZER,
    reason="set SD2MNN_MNN_TOKENIZER to a tokenizer built by scripts/build_mnn_tokenizer.sh to compare against it",
)

CORPUS = Path(__file__).parents[1] / "src" / "sd2mnn" / "data" / "prompts.txt"
SHOWN = 5  # mismatching prompts shown in full


def read_corpus() -> list[str]:
    # Split on "\n" only, as the C++ reads lines: prompts keep their trailing spaces.
    text = CORPUS.read_bytes().decode("utf-8")
    return text[:-1].split("\n") if text.endswith("\n") else text.split("\n")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    return write_sd15_tokenizer(tmp_path_factory.mktemp("clip") / "tokenizer")


def run_mnn_tokenizer(model_dir: Path, prompts: list[str], work: Path, args: tuple[str, ...] = ()) -> list[list[int]]:
    """The binary's ids for ``prompts``; ``args`` as main.cpp takes them (e.g. --single -1 1 256)."""
    binary = Path(MNN_TOKENIZER).expanduser()
    assert binary.is_file(), f"SD2MNN_MNN_TOKENIZER={MNN_TOKENIZER} is not a file"
    prompts_file, ids_file = work / "prompts.txt", work / "ids.txt"
    prompts_file.write_bytes("".join(p + "\n" for p in prompts).encode("utf-8"))
    done = subprocess.run([str(binary), str(model_dir), str(prompts_file), str(ids_file), *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # MNN prints its own complaints to stdout (MNN_ERROR is printf); none are expected.
    assert not done.stdout.strip(), done.stdout[-2000:]
    return [[int(i) for i in line.split()] for line in ids_file.read_text().splitlines()]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_mnn_tokenizer_gives_the_python_ids_for_every_prompt(clip_folder, tmp_path, scheme):
    prompts = read_corpus()
    assert len(prompts) >= 600
    model_dir = tmp_path / "bundle"
    model_dir.mkdir()
    mtok = write_mtok(clip_folder, model_dir / "tokenizer.mtok", tokenizer_scheme=scheme)
    cpp = run_mnn_tokenizer(model_dir, prompts, tmp_path)
    assert len(cpp) == len(prompts)

    tokenizer = PromptTokenizer.from_dir(mtok, SD15.prompt)
    python = [tokenizer.encode_pair(p)[1].tolist() for p in prompts]
    differ = [i for i, (c, p) in enumerate(zip(cpp, python)) if c != p]
    shown = "\n".join(f"{prompts[i]!r}\n  C++    {cpp[i]}\n  Python {python[i]}" for i in differ[:SHOWN])
    assert not differ, f"{scheme}: {len(differ)} of {len(prompts)} prompts differ, e.g.\n{shown}"
