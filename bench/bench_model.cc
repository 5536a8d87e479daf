// Evaluation throughput of the transformer forward pass (tokens/s at seq 256) and peak RSS,
// for bench/model_eval.sh, which runs a PyTorch eager forward of the same windows beside it.
//
//   build/bench_model CHECKPOINT_DIR [windows=64] [seq=256]
//
// Windows are synthetic token ids (throughput does not depend on the text): token i of window
// w is (w * 7919 + i * 104729) % vocab, the same rule as bench/torch_eval.py.
#include <cblas.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>

#include "core/model/checkpoint.h"
#include "core/model/transformer.h"
#include "core/parallel.h"

using namespace ql;

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: bench_model CHECKPOINT_DIR [windows] [seq]\n");
    return 2;
  }
  const int windows = argc > 2 ? std::stoi(argv[2]) : 64;
  const int seq = argc > 3 ? std::stoi(argv[3]) : 256;
  ModelWeights w = load_checkpoint(argv[1]);
  const int vocab = w.config.vocab_size;
  std::vector<std::vector<int32_t>> ids(windows, std::vector<int32_t>(seq));
  for (int b = 0; b < windows; ++b)
    for (int i = 0; i < seq; ++i)
      ids[b][i] = static_cast<int32_t>((static_cast<int64_t>(b) * 7919 + static_cast<int64_t>(i) * 104729) % vocab);
  Transformer model(w);
  // Batches of 8 windows, as the evaluator holds a bounded number of logit matrices at once.
  const int batch = 8;
  double best = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    for (int b = 0; b < windows; b += batch) {
      std::vector<std::vector<int32_t>> chunk(ids.begin() + b, ids.begin() + std::min(windows, b + batch));
      auto logits = model.forward_batch(chunk);
    }
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  std::printf("quantlab tokens_per_s=%.0f peak_rss_mb=%.0f windows=%d seq=%d threads=%d blas=%s\n",
              windows * seq / best, ru.ru_maxrss / 1024.0, windows, seq, num_threads(), openblas_get_corename());
  return 0;
}
