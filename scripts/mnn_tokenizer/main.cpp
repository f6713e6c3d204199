// The ids MNN's SD1.5 diffusion runtime feeds its text encoder, one line per prompt.
//
//   mnn_tokenizer MODEL_DIR PROMPTS_FILE [OUT_FILE]
//
// MODEL_DIR holds tokenizer.mtok. Each line of PROMPTS_FILE is one prompt, used as is (no
// trimming; a trailing "\r" is kept too). For each, the runtime's call is made
// (stable_diffusion.cpp: MtokTokenizer(kPair, 49406, 49407), load(MODEL_DIR),
// encode(prompt, 77)) and its second row, the prompt's 77 ids, is written space separated to
// OUT_FILE (stdout when omitted). MNN's own messages go to stdout, so give OUT_FILE to keep
// the ids apart from them.
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "tokenizer.hpp"  // the diffusion one: build_mnn_tokenizer.sh puts its folder first

int main(int argc, char** argv) {
    if (argc < 3 || argc > 4) {
        std::fprintf(stderr, "usage: %s MODEL_DIR PROMPTS_FILE [OUT_FILE]\n", argv[0]);
        return 2;
    }
    const int maxlen = 77;  // stable_diffusion.cpp's mMaxTextLen
    MNN::DIFFUSION::MtokTokenizer tokenizer(MNN::DIFFUSION::MtokTokenizer::Style::kPair, 49406, 49407);
    if (!tokenizer.load(argv[1])) {
        std::fprintf(stderr, "error: cannot load %s/tokenizer.mtok\n", argv[1]);
        return 1;
    }
    std::ifstream prompts(argv[2], std::ios::binary);
    if (!prompts) {
        std::fprintf(stderr, "error: cannot read %s\n", argv[2]);
        return 1;
    }
    FILE* out = argc == 4 ? std::fopen(argv[3], "w") : stdout;
    if (out == nullptr) {
        std::fprintf(stderr, "error: cannot write %s\n", argv[3]);
        return 1;
    }
    std::string prompt;
    while (std::getline(prompts, prompt)) {
        std::vector<int> ids = tokenizer.encode(prompt, maxlen);
        if ((int)ids.size() != 2 * maxlen) {
            std::fprintf(stderr, "error: encode returned %zu ids, not %d\n", ids.size(), 2 * maxlen);
            return 1;
        }
        for (int i = maxlen; i < 2 * maxlen; ++i) {
            std::fprintf(out, i == maxlen ? "%d" : " %d", ids[i]);
        }
        std::fputc('\n', out);
    }
    return std::fclose(out) == 0 ? 0 : 1;
}
