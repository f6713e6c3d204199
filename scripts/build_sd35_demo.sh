#!/usr/bin/env bash
# Build MNN 3.6.1's diffusion_sd35_demo with the one change it needs to run on the CPU backend.
#
#   scripts/build_sd35_demo.sh MNN_SRC_DIR MNN_BUILD_DIR OUT_DIR
#
# MNN_SRC_DIR: a checkout of MNN (tag 3.6.1); MNN_BUILD_DIR: its CMake build with
# -DMNN_BUILD_DIFFUSION=ON -DMNN_BUILD_LLM=ON -DMNN_IMGCODECS=ON (libMNN.so, libllm.so,
# express/libMNN_Express.so, tools/cv/libMNNOpenCV.so and CMakeFiles/diffusion.dir built).
# Writes OUT_DIR/diffusion_sd35_demo (and OUT_DIR/diffusion_sd35_demo_unpatched, the same sources
# unchanged, which shows the crash). Then:
#   SD2MNN_DIFFUSION_SD35_DEMO=OUT_DIR/diffusion_sd35_demo pytest tests/test_sd35_demo_match.py
#
# The change: DiffusionSD35::loadModule() calls traceOrOptimize(Session_Resize_Fix) right after
# Module::load, before the module ever ran; on the CPU backend the first onForward then segfaults
# copying its input (StaticModule::_resize -> Tensor::copyFromHostTensor), for any model.
# stable_diffusion.cpp runs Session_Resize_Check, one forward, then Session_Resize_Fix. The patch
# drops the early call: it only decides whether resize work is cached, not what is computed.
set -euo pipefail

if [ $# -ne 3 ]; then
    echo "usage: $0 MNN_SRC_DIR MNN_BUILD_DIR OUT_DIR" >&2
    exit 2
fi
mnn=$1
build=$2
out=$3
engine=$mnn/transformers/diffusion/engine
flags=$build/CMakeFiles/diffusion.dir/flags.make
for f in "$engine/src/diffusion_sd35.cpp" "$engine/diffusion_sd35_demo.cpp" "$flags" "$build/libMNN.so" \
         "$build/libllm.so" "$build/express/libMNN_Express.so" "$build/tools/cv/libMNNOpenCV.so"; do
    if [ ! -f "$f" ]; then
        echo "error: $f not found: give MNN 3.6.1's sources and a build with diffusion and LLM on" >&2
        exit 1
    fi
done
fix='        mModules[index]->traceOrOptimize(MNN::Interpreter::Session_Resize_Fix);'
if ! grep -qF "$fix" "$engine/src/diffusion_sd35.cpp"; then
    echo "error: $engine/src/diffusion_sd35.cpp has no early Session_Resize_Fix call to drop (not MNN 3.6.1?)" >&2
    exit 1
fi
mkdir -p "$out"
work=$(mktemp -d "$out/.sd35-demo.XXXXXX")
trap 'rm -rf "$work"' EXIT
# An empty statement in its place: the "if (mModules[index])" above it keeps its body.
awk -v fix="$fix" '$0 == fix { print "        ; // no Session_Resize_Fix before the first forward"; next } { print }' \
    "$engine/src/diffusion_sd35.cpp" > "$work/diffusion_sd35.cpp"
includes=$(sed -n 's/^CXX_INCLUDES = //p' "$flags")
defines=$(sed -n 's/^CXX_DEFINES = //p' "$flags" | sed 's/-Ddiffusion_EXPORTS//')
for variant in patched unpatched; do
    source=$work/diffusion_sd35.cpp
    [ "$variant" = unpatched ] && source=$engine/src/diffusion_sd35.cpp
    # shellcheck disable=SC2086  # the flags are lists
    "${CXX:-c++}" -std=gnu++11 -O3 -DNDEBUG -fno-rtti -fno-exceptions $defines $includes -I"$engine/src" \
        "$source" "$engine/src/tokenizer.cpp" "$engine/diffusion_sd35_demo.cpp" -o "$work/$variant" \
        -Wl,-rpath,"$build:$build/tools/cv:$build/express" "$build/libllm.so" "$build/tools/cv/libMNNOpenCV.so" \
        "$build/express/libMNN_Express.so" "$build/libMNN.so" -pthread -ldl
done
mv "$work/unpatched" "$out/diffusion_sd35_demo_unpatched"
mv "$work/patched" "$out/diffusion_sd35_demo"
echo "$out/diffusion_sd35_demo"
