// Core throughput benchmarks (not tests: the machines are shared and noisy). Everything is
// measured side by side in one process and reported as ratios where a target is a ratio.
//
//   build/bench_core [--quick]
//
// 1. Group RTN (4-bit asym, g128, min-max) fake-quant and quantize-to-codes throughput in GB/s
//    of float32 weights, on one thread (target: >= 1 GB/s per core) and on all threads.
// 2. Hessian accumulation (HessianAccumulator::add, one SYRK) against one sgemm computing XᵀX
//    for the same X, as a rate ratio t_sgemm / t_hessian (target: >= 0.6).
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>

#include "bench/bench_util.h"
#include "core/calib_stats.h"
#include "core/parallel.h"
#include "core/quantize.h"
#include "core/rng.h"

using namespace ql;
using ql::bench::best_seconds;
using ql::bench::random_matrix;

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  const int reps = quick ? 2 : 5;
  const int all_threads = num_threads();

  // ---- 1. group RTN throughput ----
  const Index R = quick ? 1024 : 4096, C = quick ? 1024 : 4096;
  Matrix W = random_matrix(R, C, 1234, 1);
  QuantSpec spec;
  spec.bits = 4;
  spec.scheme = QuantScheme::Asym;
  spec.granularity = Granularity::PerGroup;
  spec.group_size = 128;
  const double gb = static_cast<double>(W.size()) * sizeof(float) / 1e9;
  std::printf("== group RTN (w4 asym g128 minmax, %ldx%ld float32 = %.3f GB) ==\n", (long)R, (long)C, gb);
  double rtn1 = 0;
  for (int t : {1, all_threads}) {
    set_num_threads(t);
    Matrix out;
    double tf = best_seconds(reps, [&] { out = fake_quant(W, spec); });
    QuantizedTensor q;
    double tq = best_seconds(reps, [&] { q = quantize(W, spec); });
    std::printf("threads %d: fake_quant %.2f GB/s (%.1f ms), quantize->codes %.2f GB/s (%.1f ms)\n", t,
                gb / tf, tf * 1e3, gb / tq, tq * 1e3);
    if (t == 1) rtn1 = gb / tf;
    if (t == all_threads) break;
  }
  std::printf("group RTN per core: %.2f GB/s (target >= 1.0): %s\n\n", rtn1, rtn1 >= 1.0 ? "MET" : "MISSED");

  // ---- 2. Hessian accumulation vs sgemm ----
  set_num_threads(all_threads);
  const Index n = quick ? 2048 : 4096, d = quick ? 1024 : 2048;
  Matrix X = random_matrix(n, d, 1234, 2);
  Matrix G(d, d);
  std::printf("== Hessian accumulation (X: %ld tokens x %ld, threads %d) ==\n", (long)n, (long)d, all_threads);
  double t_gemm = best_seconds(reps, [&] {
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d, d, n, 1.0f, X.data(), d, X.data(), d, 0.0f,
                G.data(), d);
  });
  double t_h = best_seconds(reps, [&] {
    HessianAccumulator H(d);
    H.add(X);
  });
  double t_h2 = best_seconds(reps, [&] {
    HessianAccumulator H(d);
    H.add(X.topRows(n / 2));
    H.add(X.bottomRows(n - n / 2));
  });
  const double flops = 2.0 * d * d * n;
  std::printf("sgemm XᵀX:                 %.1f ms (%.1f GFLOP/s)\n", t_gemm * 1e3, flops / t_gemm / 1e9);
  std::printf("HessianAccumulator (1 add):  %.1f ms  rate ratio vs sgemm %.2f\n", t_h * 1e3, t_gemm / t_h);
  std::printf("HessianAccumulator (2 adds): %.1f ms  rate ratio vs sgemm %.2f\n", t_h2 * 1e3, t_gemm / t_h2);
  const double ratio = t_gemm / std::max(t_h, t_h2);
  std::printf("Hessian accumulation rate / sgemm rate: %.2f (target >= 0.60): %s\n", ratio,
              ratio >= 0.6 ? "MET" : "MISSED");
  return 0;
}
