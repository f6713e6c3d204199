"""A small T5 tokenizer folder in the layout of SD3's tokenizer_3/ (T5TokenizerFast), built offline.

T5's tokenizer is a SentencePiece Unigram model (spiece.model) and its Hugging Face conversion
(tokenizer.json). Here SentencePiece trains a Unigram model the way T5's was made (nmt_nfkc
normalization, <pad>=0, </s>=1, <unk>=2, no BOS, no byte fallback) on the prompt corpus, with a fixed
vocabulary size, single-threaded and seeded so the same bytes come out every time. tokenizer.json is
built from that model as transformers' T5 conversion builds it: the precompiled NFKC charsmap and a
collapse of repeated spaces, a Metaspace pre-tokenizer (replacement "▁", prepended always), the
Unigram vocabulary with its scores then <extra_id_99>..<extra_id_0>, and "$A </s>" as the template.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

PROMPTS = Path(__file__).parents[1] / "src" / "sd2mnn" / "data" / "prompts.txt"
VOCAB_SIZE = 1000
EXTRA_IDS = 100
SPECIALS = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def train_spiece(vocab_size: int = VOCAB_SIZE, corpus: Path = PROMPTS) -> bytes:
    """A serialized SentencePiece Unigram model (spiece.model) trained on ``corpus``."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, normalization_rule_name="nmt_nfkc",
        character_coverage=1.0, num_threads=1, minloglevel=2)
    return buf.getvalue()


def _tokenizer_json(model: bytes, legacy_pre_tokenizer: bool) -> str:
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, decoders, processors
    from tokenizers.models import Unigram

    proto = pb.ModelProto()
    proto.ParseFromString(model)
    vocab = [(p.piece, p.score) for p in proto.pieces]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(EXTRA_IDS - 1, -1, -1)]
    tok = Tokenizer(Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=False))
    charsmap = proto.normalizer_spec.precompiled_charsmap
    if legacy_pre_tokenizer:
        # The first conversions of T5 (t5-base's tokenizer.json): charsmap only, whitespace split.
        tok.normalizer = normalizers.Precompiled(charsmap)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Precompiled(charsmap),
                                               normalizers.Replace(Regex(" {2,}"), " ")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
    specials = ["<pad>", "</s>", "<unk>"] + [f"<extra_id_{i}>" for i in range(EXTRA_IDS - 1, -1, -1)]
    tok.add_special_tokens(specials)
    return tok.to_str(pretty=True)


def write_t5_tokenizer(folder: Path, vocab_size: int = VOCAB_SIZE, with_spiece: bool = True,
                       legacy_pre_tokenizer: bool = False) -> Path:
    """Write a T5TokenizerFast folder (tokenizer.json, the configs, spiece.model unless
    ``with_spiece`` is false) into ``folder`` and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = train_spiece(vocab_size)
    (folder / "tokenizer.json").write_text(_tokenizer_json(model, legacy_pre_tokenizer), encoding="utf-8")
    if with_spiece:
        (folder / "spiece.model").write_bytes(model)
    extra = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    special_map = {**SPECIALS, "additional_special_tokens": extra}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2), encoding="utf-8")
    config = {**SPECIALS, "additional_special_tokens": extra, "extra_ids": EXTRA_IDS, "legacy": True,
              "add_prefix_space": True, "clean_up_tokenization_spaces": True, "model_max_length": 512,
              "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder
