#!/usr/bin/env bash
# Build MNN's diffusion tokenizer (the code diffusion_demo runs to turn a prompt into ids) as a
# standalone program, from MNN's sources alone: no MNN library or CMake build is needed.
#
#   scripts/build_mnn_tokenizer.sh MNN_SRC_DIR OUT_DIR
#
# MNN_SRC_DIR: a checkout of MNN (tag 3.6.1). Writes OUT_DIR/mnn_tokenizer; run it as
#   OUT_DIR/mnn_tokenizer MODEL_DIR PROMPTS_FILE [OUT_FILE] [--single BOS EOS MAXLEN]
# (see mnn_tokenizer/main.cpp; --single -1 1 256 is SD3.5's T5). Then:
#   SD2MNN_MNN_TOKENIZER=OUT_DIR/mnn_tokenizer pytest tests/test_mnn_tokenizer_match.py tests/test_t5_tokenizer.py
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 MNN_SRC_DIR OUT_DIR" >&2
    exit 2
fi
mnn=$1
out=$2
here=$(cd "$(dirname "$0")" && pwd)
diffusion=$mnn/transformers/diffusion/engine/src
tok=$mnn/transformers/llm/engine/src/tokenizer
for f in "$diffusion/tokenizer.cpp" "$tok/tokenizer.cpp" "$tok/unicode.cpp" "$tok/unicode_data.cpp" \
         "$mnn/include/MNN/AutoTime.hpp" "$mnn/source/core/Macro.h"; do
    if [ ! -f "$f" ]; then
        echo "error: $f not found: MNN_SRC_DIR must be a checkout of MNN's sources (tag 3.6.1)" >&2
        exit 1
    fi
done
mkdir -p "$out"
# Compile to a temporary name and rename, so a failed build leaves no half-written binary.
tmp=$(mktemp "$out/.mnn_tokenizer.XXXXXX")
trap 'rm -f "$tmp"' EXIT
"${CXX:-g++}" -std=c++17 -O2 -DMNN_DIFFUSION_WITH_LLM_TOKENIZER \
    -I"$diffusion" -I"$mnn/include" -I"$mnn/source" -I"$tok" \
    "$here/mnn_tokenizer/main.cpp" "$here/mnn_tokenizer/autotime_stub.cpp" \
    "$diffusion/tokenizer.cpp" "$tok/tokenizer.cpp" "$tok/unicode.cpp" "$tok/unicode_data.cpp" \
    -o "$tmp"
chmod 755 "$tmp"
mv "$tmp" "$out/mnn_tokenizer"
trap - EXIT
echo "$out/mnn_tokenizer"
