// Tokenization speed: tokenizer.json (core/model/hf_tokenizer.h: PCRE2 split + byte-level BPE)
// on the WikiText-2 test file with the Llama 3 and Qwen3 tokenizers, beside sentencepiece on
// the shared austen-llama-7m tokenizer.model on the same text, in one run (issue 14: encoding
// must be fast enough not to matter).
//
//   build/bench_tokenizer [text=../shared/data/text/wikitext2_test.txt]
//
// Each tokenizer encodes the whole file line by line (as the evaluation path feeds documents),
// best of 3 after a warm-up; tokens/s and MB/s per tokenizer, and the ratio to sentencepiece.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "core/model/tokenizer.h"

using namespace ql;

namespace {

double best_s(const std::function<void()>& f, int reps = 3) {
  f();
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string data = QL_SHARED_DATA_DIR;
  const std::string path = argc > 1 ? argv[1] : data + "/text/wikitext2_test.txt";
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "cannot read %s\n", path.c_str());
    return 1;
  }
  std::vector<std::string> lines;
  std::size_t bytes = 0;
  for (std::string l; std::getline(in, l);) {
    bytes += l.size() + 1;
    lines.push_back(l + "\n");
  }
  struct Case {
    const char* name;
    std::string dir;
  };
  const Case cases[] = {{"sentencepiece (austen-llama-7m tokenizer.model)", data + "/austen-llama-7m"},
                        {"tokenizer.json (llama3-tiny, Llama 3)", data + "/arch/llama3-tiny"},
                        {"tokenizer.json (qwen3-tiny, Qwen3)", data + "/arch/qwen3-tiny"}};
  std::printf("%s: %zu lines, %.2f MB\n", path.c_str(), lines.size(), bytes / 1e6);
  double sp_tok_s = 0;
  for (const Case& c : cases) {
    const Tokenizer tok = Tokenizer::load(c.dir);
    std::size_t n = 0;
    const double s = best_s([&] {
      n = 0;
      for (const std::string& l : lines) n += tok.encode(l).size();
    });
    const double tps = static_cast<double>(n) / s;
    if (sp_tok_s == 0) sp_tok_s = tps;
    std::printf("%-50s %9zu tokens  %.3f s  %10.0f tokens/s  %6.2f MB/s  %.2fx sentencepiece\n", c.name, n, s, tps,
                bytes / 1e6 / s, tps / sp_tok_s);
  }
  return 0;
}
