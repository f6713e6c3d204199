"""A Chinese BERT tokenizer folder in the layout of Taiyi-Stable-Diffusion-1B-Chinese's tokenizer/
(bert-base-chinese's vocab.txt: BertTokenizer, do_lower_case, [CLS]=101, [SEP]=102, [PAD]=0,
model_max_length 512).

The vocabulary follows bert-base-chinese's order: [PAD], [unused1..99], [UNK], [CLS], [SEP],
[MASK], <S>, <T>, single characters (ASCII punctuation, digits, letters, Latin-1 and other
symbols, Greek, Cyrillic, kana, CJK and fullwidth punctuation, a few emoji), every CJK Unified
Ideograph U+4E00..U+9FFF, then English words and ##continuations. The English pieces are the
letter-only tokens of CLIP's BPE vocabulary (the vendored file), so English prompts split into
realistic wordpieces, some into [UNK].
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from clip_tokenizer import BPE_PATH, N_MERGES

SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
            "mask_token": "[MASK]"}
N_ENGLISH = 12000  # CLIP's most frequent letter-only merges taken as words and as ##pieces


def _chars(first: str, last: str) -> list[str]:
    return [chr(cp) for cp in range(ord(first), ord(last) + 1)]


def _single_characters() -> list[str]:
    ascii_punct = [c for c in _chars("!", "~") if not c.isalnum()]
    latin1 = [c for c in _chars("\u00a1", "\u00bf") if c != "\u00ad"] + ["×", "÷", "ß", "æ", "ð", "ø", "þ",
                                                                        "đ", "ħ", "ı", "ł", "œ"]
    symbols = list("ˇˉˊˋ˙–—―‖‘’“”•…‰′″‹›※‼€℃№™ⅰⅱⅲⅳⅴ←↑→↓↔∈∏∑√∞∠∧∨∩∪∫∮∴∵∶∽≈≌≒≠≡≤≥⊙⊥⌒①②③④⑤⑥⑦⑧⑨⑩"
                   "─━│┃┅┆┊┌┐└┘├┤┬┴┼═║╔╗╚╝╬■□▪▲△▼▽◆◇○◎●◢◣◤◥★☆☀☁☂☃☎☞☺☼♀♂♠♡♣♥♦♩♪♫♬✈✔✕✖✦✨✪✰✿❀❤➜")
    greek = _chars("α", "ω")
    cyrillic = _chars("а", "я") + ["ё"]
    kana = _chars("ぁ", "ゖ") + _chars("ァ", "ヺ") + ["・", "ー"]
    cjk_punct = list("\u3000、。〃々〆〇〈〉《》「」『』【】〒〓〔〕〖〗〜〝〞")
    fullwidth = list("！＂＃＄％＆＇（）＊＋，－．／０１２３４５６７８９：；＜＝＞？＠［＼］＾＿｀ａｂｃｄｅｆｇｈｉｊｋｌｍｎｏｐｑｒｓｔｕｖｗｘｙｚ｛｜｝～￥")
    emoji = list("🌸🌹🌙🌟🎨🎵🐱🐶👍👀💕💖💯🔥😀😁😂😃😄😅😆😉😊😍😘😭🙂🙏🤔🤣")
    return (ascii_punct + list("0123456789") + list("abcdefghijklmnopqrstuvwxyz") + latin1 + symbols + greek
            + cyrillic + kana + cjk_punct + fullwidth + emoji)


def _english_pieces() -> list[str]:
    """CLIP's letter-only tokens, most frequent first, without their end-of-word mark."""
    lines = gzip.open(BPE_PATH).read().decode("utf-8").split("\n")[1:N_MERGES + 1]
    words: dict[str, None] = {}
    for line in lines:
        token = "".join(line.split()).removesuffix("</w>")
        if len(token) > 1 and token.isascii() and token.isalpha() and token.islower():
            words.setdefault(token)
        if len(words) == N_ENGLISH:
            break
    return list(words)


def bert_vocab() -> list[str]:
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "<S>", "<T>"]
    singles = _single_characters()
    tokens += singles
    tokens += [c for c in _chars("\u4e00", "\u9fff")]
    words = _english_pieces()
    tokens += words
    # Continuations of the non-CJK letters and digits (kana, Greek, Cyrillic, Latin-1, fullwidth, ASCII).
    tokens += ["##" + c for c in singles if c.isalnum() or c == "ー"]
    tokens += ["##" + w for w in words]
    seen: set[str] = set()
    return [t for t in tokens if not (t in seen or seen.add(t))]


def write_bert_tokenizer(folder: Path) -> Path:
    """Write the tokenizer/ folder (vocab.txt and configs, no tokenizer.json) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(bert_vocab()) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(SPECIALS, indent=2), encoding="utf-8")
    config = {**SPECIALS, "do_basic_tokenize": True, "do_lower_case": True, "model_max_length": 512,
              "never_split": None, "strip_accents": None, "tokenize_chinese_chars": True,
              "tokenizer_class": "BertTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder
