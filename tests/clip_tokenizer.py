"""The real CLIP ViT-L/14 tokenizer folder (SD1.x's), built from the vendored BPE file.

OpenAI's CLIP builds its vocabulary from the BPE file: the 256 byte characters, the same with
"</w>", one token per merge (the first 48894 lines after the header), then BOS/EOS: 49408 ids.
The folder written here is what diffusers ships as ``tokenizer/`` for SD1.5 (vocab.json,
merges.txt, the configs), so Hugging Face's CLIPTokenizer loads it.
"""
from __future__ import annotations

import gzip
import shutil
import json
from pathlib import Path

BPE_PATH = Path(__file__).parent / "data" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def write_sd15_tokenizer(folder: Path) -> Path:
    """Write SD1.5's tokenizer folder into ``folder`` and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(BPE_PATH).read().decode("utf-8").split("\n")[1:N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    base = list(_bytes_to_unicode().values())
    vocab = base + [c + "</w>" for c in base] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "errors": "replace", **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def with_sd15_tokenizer(onnx_dir: Path, target: Path) -> Path:
    """A copy of the ONNX pipeline ``onnx_dir`` (whose text encoder takes CLIP's 49408 ids, as the
    demo pipeline's does) with SD1.5's real tokenizer in place of its own."""
    shutil.copytree(onnx_dir, target, ignore=shutil.ignore_patterns("tokenizer"))
    return write_sd15_tokenizer(target / "tokenizer").parent
