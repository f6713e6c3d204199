// The ids MNN's diffusion runtimes feed their text encoders, one line per prompt.
//
//   mnn_tokenizer MODEL_DIR PROMPTS_FILE [OUT_FILE] [--single BOS EOS MAXLEN]
//
// MODEL_DIR holds tokenizer.mtok. Each line of PROMPTS_FILE is one prompt, used as is (no
// trimming; a trailing "\r" is kept too). By default each prompt gets SD1.5's call
// (stable_diffusion.cpp: MtokTokenizer(kPair, 49406, 49407), load(MODEL_DIR),
// encode(prompt, 77)) and its second row, the prompt's 77 ids, is written space separated to
// OUT_FILE (stdout when omitted). With --single the call is MtokTokenizer(kSingle, BOS, EOS)
// and encode(prompt, MAXLEN), SD3.5's T5 (diffusion_sd35.cpp: kSingle, -1, 1, 256), and its
// MAXLEN ids are written. MNN's own messages go to stdout, so give OUT_FILE to keep the ids
// apart from them.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "tokenizer.hpp"  // the diffusion one: build_mnn_tokenizer.sh puts its folder first

int main(int argc, char** argv) {
    using MNN::DIFFUSION::MtokTokenizer;
    int positional = argc;
    MtokTokenizer::Style style = MtokTokenizer::Style::kPair;
    int bos = 49406, eos = 49407, maxlen = 77;  // stable_diffusion.cpp's ids and mMaxTextLen
    for (int i = 1; i < argc; ++i) {
        if (std::strcmp(argv[i], "--single") == 0 && i + 4 == argc) {
            positional = i;
            style = MtokTokenizer::Style::kSingle;
            bos = std::atoi(argv[i + 1]);
            eos = std::atoi(argv[i + 2]);
            maxlen = std::atoi(argv[i + 3]);
            break;
        }
    }
    if (positional < 3 || positional > 4 || maxlen <= 0) {
        std::fprintf(stderr, "usage: %s MODEL_DIR PROMPTS_FILE [OUT_FILE] [--single BOS EOS MAXLEN]\n", argv[0]);
        return 2;
    }
    MtokTokenizer tokenizer(style, bos, eos);
    if (!tokenizer.load(argv[1])) {
        std::fprintf(stderr, "error: cannot load %s/tokenizer.mtok\n", argv[1]);
        return 1;
    }
    std::ifstream prompts(argv[2], std::ios::binary);
    if (!prompts) {
        std::fprintf(stderr, "error: cannot read %s\n", argv[2]);
        return 1;
    }
    FILE* out = positional == 4 ? std::fopen(argv[3], "w") : stdout;
    if (out == nullptr) {
        std::fprintf(stderr, "error: cannot write %s\n", argv[3]);
        return 1;
    }
    const int rows = style == MtokTokenizer::Style::kPair ? 2 : 1;
    std::string prompt;
    while (std::getline(prompts, prompt)) {
        std::vector<int> ids = tokenizer.encode(prompt, maxlen);
        if ((int)ids.size() != rows * maxlen) {
            std::fprintf(stderr, "error: encode returned %zu ids, not %d\n", ids.size(), rows * maxlen);
            return 1;
        }
        for (int i = (rows - 1) * maxlen; i < rows * maxlen; ++i) {
            std::fprintf(out, i == (rows - 1) * maxlen ? "%d" : " %d", ids[i]);
        }
        std::fputc('\n', out);
    }
    return std::fclose(out) == 0 ? 0 : 1;
}
