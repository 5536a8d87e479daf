// Forward + backward of one decoder block (core/model/block_grad.h) against the forward alone,
// for bench/block_grad.sh, which times PyTorch autograd on the same block beside it.
//
//   build/bench_block_grad CHECKPOINT_DIR [block=2] [windows=4] [seq=256]
//
// Inputs are N(0,1) hidden states (timing does not depend on the values). Three timings, best
// of 20 after a warm-up: the inference forward (Transformer::block_batch, what calibration
// runs), the training forward (block_fwd, which keeps the tape), and forward + backward
// (gradients of x and the nine parameters, accumulated over the windows).
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <string>

#include "core/model/block_grad.h"
#include "core/model/checkpoint.h"
#include "core/model/transformer.h"
#include "core/parallel.h"
#include "core/rng.h"

using namespace ql;

namespace {

double best_ms(const std::function<void()>& f, int reps = 20) {
  f();
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: bench_block_grad CHECKPOINT_DIR [block] [windows] [seq]\n");
    return 2;
  }
  const int b = argc > 2 ? std::stoi(argv[2]) : 2;
  const int windows = argc > 3 ? std::stoi(argv[3]) : 4;
  const int seq = argc > 4 ? std::stoi(argv[4]) : 256;
  const ModelWeights w = load_checkpoint(argv[1]);
  const Transformer tf(w);
  const int d = w.config.hidden_size;
  Matrix xs(Index(windows) * seq, d), r(Index(windows) * seq, d);
  CounterRng rng(7, 0);
  for (Index j = 0; j < xs.size(); ++j) {
    xs.data()[j] = static_cast<float>(rng.normal(2 * j));
    r.data()[j] = static_cast<float>(rng.normal(2 * j + 1));
  }
  const BlockShape s = BlockShape::of(w.config);
  const BlockParams<float> p = BlockParams<float>::from(w.blocks[b]);

  const double infer = best_ms([&] {
    std::vector<Matrix> h;
    std::vector<Matrix*> ptr;
    for (int i = 0; i < windows; ++i) h.push_back(xs.middleRows(Index(i) * seq, seq));
    for (auto& m : h) ptr.push_back(&m);
    tf.block_batch(b, ptr, std::vector<ForwardHooks>(windows));
  });
  BlockTape<float> tape;
  RopeTables tab;
  const double fwd = best_ms([&] { block_fwd<float>(s, p, xs, seq, 0, tab, tape); });
  BlockParams<float> grads = BlockParams<float>::zeros_like(p);
  Matrix dx;
  const double fwd_bwd = best_ms([&] {
    grads = BlockParams<float>::zeros_like(p);
    block_fwd<float>(s, p, xs, seq, 0, tab, tape);
    block_bwd<float>(s, p, tape, tab, r, dx, grads);
  });
  std::printf("quantlab infer_fwd_ms=%.2f fwd_ms=%.2f fwd_bwd_ms=%.2f ratio_to_infer=%.2f ratio_to_fwd=%.2f "
              "windows=%d seq=%d threads=%d blas=%s\n",
              infer, fwd, fwd_bwd, fwd_bwd / infer, fwd_bwd / fwd, windows, seq, num_threads(),
              openblas_get_corename());
  return 0;
}
