// GPTQ throughput (not a test: the machines are shared and noisy). Everything is timed in one
// process and reported as a ratio to one sgemm of the same size measured in the same run.
//
//   build/bench_gptq [--quick] [--reps N]
//
// 1. One d x d x d cblas_sgemm on all threads (d = 4096; 2048 with --quick): the unit.
// 2. Hessian accumulation: HessianAccumulator::add on N = d tokens of d inputs (one SYRK in
//    fixed tiles), as a ratio to an sgemm computing XᵀX for the same X.
// 3. GPTQ on a d x d layer with that Hessian (correlated power-law inputs x = A z, A's columns
//    decaying as (1+j)^-0.7, 4 outlier channels x10), 4-bit asym per-channel, defaults
//    (percdamp 0.01, B 128): the plugin's time as a ratio to the sgemm (target <= 2), with
//    compare_rtn off (GPTQ alone) and on (plus the RTN comparison diagnostics); also with
//    act-order and g128.
// 4. Whole-model GPTQ on the shared austen-llama-7m model (skipped when ../shared/data is
//    absent): W4 per-channel, 128 strided calibration windows of 256 tokens, block-sequential
//    with quantized propagation, as in configs/paper/gptq_table.yaml. Reported: calibration
//    (forward passes + Hessians) and quantization seconds from the run record, and the whole
//    run, against the reference's recorded PyTorch quant_seconds for the same row (measured on
//    another machine, so a rough scale, not a side-by-side ratio).
#include <cblas.h>

#include <algorithm>
#include <any>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>

#include "algorithms/algorithm.h"
#include "algorithms/gptq/gptq.h"
#include "bench/bench_util.h"
#include "core/calib_stats.h"
#include "core/linalg.h"
#include "core/parallel.h"
#include "core/rng.h"
#include "experiments/runner.h"

using namespace ql;
using ql::bench::best_seconds;
using ql::bench::correlated_inputs;
using ql::bench::layer_input;
using ql::bench::random_matrix;
using ql::bench::seconds_of;

namespace {

double diagnostic(const LayerResult& r, const char* key) {
  for (const auto& [k, v] : r.output.diagnostics)
    if (k == key) return v;
  return std::nan("");
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  int reps = 3;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0)
      quick = true;
    else if (std::strcmp(argv[i], "--reps") == 0 && i + 1 < argc)
      reps = std::atoi(argv[++i]);
  }
  const Index d = quick ? 2048 : 4096, n = d;
  std::printf("OpenBLAS kernels: %s\n", openblas_get_corename());
  std::printf("threads: %d, layer %ldx%ld, calibration tokens %ld, best of %d\n", num_threads(),
              (long)d, (long)d, (long)n, reps);

  // ---- 1. the unit: one d x d x d sgemm on all threads ----
  const Matrix A0 = random_matrix(d, d, 4321, 1), B0 = random_matrix(d, d, 4321, 2);
  Matrix C0(d, d);
  const double t_gemm = best_seconds(reps, [&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, d, d, d, 1.0f, A0.data(), d, B0.data(),
                d, 0.0f, C0.data(), d);
  });
  std::printf("sgemm %ldx%ldx%ld: %.3f s (%.1f GFLOP/s)\n", (long)d, (long)d, (long)d, t_gemm,
              2.0 * d * d * d / t_gemm / 1e9);

  // ---- 2. Hessian accumulation vs sgemm XᵀX ----
  const Matrix X = correlated_inputs(n, d, 4321);
  HessianAccumulator H(d);
  const double t_h = best_seconds(reps, [&] {
    H = HessianAccumulator(d);
    H.add(X);
  });
  Matrix G(d, d);
  const double t_xtx = best_seconds(reps, [&] {
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d, d, n, 1.0f, X.data(), d, X.data(), d,
                0.0f, G.data(), d);
  });
  std::printf("Hessian accumulation (N=%ld): %.3f s; sgemm XᵀX %.3f s; ratio hessian/sgemm %.2f\n",
              (long)n, t_h, t_xtx, t_h / t_xtx);

  // ---- 3. GPTQ ----
  const Matrix W = random_matrix(d, d, 4321, 5);
  struct Case {
    const char* label;
    Granularity gran;
    bool act_order, compare_rtn;
  };
  double t_gptq_default = 0;
  for (const Case& c : {Case{"w4 per-channel", Granularity::PerChannel, false, false},
                        Case{"w4 per-channel +compare_rtn", Granularity::PerChannel, false, true},
                        Case{"w4 per-channel act-order", Granularity::PerChannel, true, false},
                        Case{"w4 g128 act-order", Granularity::PerGroup, true, false}}) {
    QuantSpec spec;
    spec.bits = 4;
    spec.granularity = c.gran;
    spec.group_size = 128;
    GptqOptions o;
    o.act_order = c.act_order;
    o.compare_rtn = c.compare_rtn;
    const auto algo = default_registry().get("gptq").create(o);
    const auto& la = dynamic_cast<const LayerAlgorithm&>(*algo);
    const LayerInput in = layer_input(W, H, spec);
    double best = 1e30, gptq_only = 0;
    LayerResult r;
    for (int i = 0; i < reps; ++i) {
      r = la.run(in);
      if (r.metrics.seconds < best) {
        best = r.metrics.seconds;
        gptq_only = diagnostic(r, "seconds");
      }
    }
    if (!c.compare_rtn && !c.act_order) t_gptq_default = best;
    std::printf("GPTQ %-28s %.3f s = %.2fx sgemm (GPTQ proper %.3f s = %.2fx)", c.label, best,
                best / t_gemm, gptq_only, gptq_only / t_gemm);
    if (c.compare_rtn)
      std::printf("; rel err under H: RTN %.5f, GPTQ %.5f, gain %.2fx",
                  diagnostic(r, "rtn_rel_err_h"), diagnostic(r, "gptq_rel_err_h"),
                  diagnostic(r, "gain_vs_rtn"));
    std::printf("\n");
  }
  std::printf("GPTQ / sgemm: %.2f (target <= 2.0): %s\n", t_gptq_default / t_gemm,
              t_gptq_default / t_gemm <= 2.0 ? "MET" : "MISSED");
  std::printf("Hessian accumulation / sgemm XᵀX: %.2f\n", t_h / t_xtx);

  // ---- 4. whole-model GPTQ on the shared model ----
  namespace fs = std::filesystem;
  const fs::path data = QL_SHARED_DATA_DIR;
  if (!fs::exists(data / "austen-llama-7m" / "model.safetensors")) {
    std::printf("whole-model GPTQ: skipped, ../shared/data not found at %s\n", data.string().c_str());
    return 0;
  }
  const std::string dd = data.string();
  const std::string yaml =
      "workload: {kind: model, path: " + dd + "/austen-llama-7m}\n" + "calib: {text: " + dd +
      "/text/austen_train.txt, n_samples: 128, seq_len: 256, rule: strided}\n" +
      "eval: {seq_len: 256, kl: false, streams: [{name: p, path: " + dd + "/text/persuasion.txt, max_windows: 1}]}\n" +
      "slices: {n_boot: 0}\n" +
      "quant: [{algorithm: gptq, bits: 4, scheme: asym, scale_dtype: fp32, granularity: channel}]\n";
  WorkloadCache cache;
  const RunConfig rc =
      parse_run_config(ConfigNode::parse(yaml, "bench_gptq.yaml"), "gptq-w4", "bench_gptq.yaml", default_registry());
  // Warm-up run (FP): loads the checkpoint and tokenizes the texts once, which is not GPTQ's time.
  std::string fp_yaml = yaml.substr(0, yaml.find("quant:")) + "quant: [{algorithm: fp}]\n";
  execute_run(parse_run_config(ConfigNode::parse(fp_yaml, "bench_gptq.yaml"), "fp", "bench_gptq.yaml",
                               default_registry()),
              cache, default_registry());
  RunRecord rec;
  const double t_run = seconds_of([&] { rec = execute_run(rc, cache, default_registry()); });
  if (rec.status != RunStatus::Ok) {
    std::printf("whole-model GPTQ failed: %s\n", rec.message.c_str());
    return 1;
  }
  double ref_seconds = std::nan("");
  std::ifstream jf(data / "austen-llama-7m" / "golden" / "gptq_smoothquant.json");
  const nlohmann::json ref = nlohmann::json::parse(jf);
  for (const auto& r : ref["results"])
    if (r["name"] == "gptq_w4_g-1") ref_seconds = r["quant_seconds"].get<double>();
  std::printf("whole-model GPTQ W4 per-channel (6 blocks x 7 linears, 128 x 256 calibration tokens): "
              "calibration %.2f s + quantization %.2f s, whole run %.2f s (reference PyTorch, recorded: %.1f s)\n",
              rec.seconds_calib, rec.seconds_quant, t_run, ref_seconds);
  return 0;
}
