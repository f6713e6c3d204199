"""Prompt -> token ids as MNN's runtime makes them, and the files that make them diffusers'.

Modules, each importing only those above it:

    codes.py             the type codes of tokenizer.mtok's binary sections
    folder.py            a tokenizer folder: its files and its kind (CLIP, BERT, T5, generic)
    reader.py            tokenizer.mtok read and encoded as MNN's C++ tokenizer does (PromptTokenizer)
    diffusers_scheme.py  the "diffusers" scheme's tokenizer.json for CLIP (end-of-word) and BERT
    t5_scheme.py         the "diffusers" scheme's tokenizer.json for T5
    writer.py            tokenizer.mtok written from a tokenizer folder under a scheme
    id_rewrite.py        the CLIP text encoder's id rewrite (ONNX graph and numpy twin)
    prompt_ids.py        PromptIds: the runtime's, the text encoder's and diffusers' ids of a prompt
"""
