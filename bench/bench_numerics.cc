// What `numerics: portable` costs (not a test: the machines are shared and noisy). Each workload
// runs in fast mode (OpenBLAS, whatever kernels it picked) and in portable mode (quantlab's own
// kernels, core/portable_blas.h) in the same process, alternating, best of N; reported as times
// and the ratio portable / fast.
//
//   build/bench_numerics [--reps N] [--quick]
//
// 1. gemm tiles: one 1024^3 sgemm computed as 256-row tile calls (core/linalg.h matmul_nt), the
//    shape of every product on a result path; GFLOP/s of each mode.
// 2. GPTQ on a 2048 x 2048 layer (1024 with --quick) with a correlated Hessian, W4
//    per-channel: the plugin's time; and the Hessian accumulation of 2048 tokens.
// 3. The quickstart sweep (configs/quickstart.yaml, 21 runs), whole sweep time.
// 4. Model evaluation on the shared austen-llama-7m: tokens/s of the forward pass at seq 256
//    (skipped without ../shared/data).
// 5. Whole-model GPTQ W4 (128 x 256 calibration tokens, block-sequential), calibration +
//    quantization time (skipped without ../shared/data).
#include <algorithm>
#include <any>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <string>

#include "algorithms/algorithm.h"
#include "algorithms/gptq/gptq.h"
#include "bench/bench_util.h"
#include "core/calib_stats.h"
#include "core/linalg.h"
#include "core/model/checkpoint.h"
#include "core/model/transformer.h"
#include "core/numerics.h"
#include "core/parallel.h"
#include "experiments/runner.h"

using namespace ql;
using ql::bench::random_matrix;
using ql::bench::seconds_of;

namespace {

/// Best-of-reps seconds of f in each mode, alternating fast and portable so that a load change
/// on the machine hits both.
std::pair<double, double> both_modes(int reps, const std::function<void()>& f) {
  double fast = 1e30, port = 1e30;
  for (int r = 0; r < reps; ++r) {
    fast = std::min(fast, seconds_of(f));
    NumericsScope p(Numerics::Portable);
    port = std::min(port, seconds_of(f));
  }
  return {fast, port};
}

void report(const char* what, std::pair<double, double> t, const char* unit = "s") {
  std::printf("%-58s fast %8.3f %s   portable %8.3f %s   portable/fast %.2fx\n", what, t.first, unit,
              t.second, unit, t.second / t.first);
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 3;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--reps") == 0 && i + 1 < argc) reps = std::atoi(argv[++i]);
    else if (std::strcmp(argv[i], "--quick") == 0) quick = true;
  }
  const NumericEnvironment env = numeric_environment(Numerics::Portable, num_threads());
  std::printf("threads %d, OpenBLAS kernels %s, portable kernels %s, best of %d\n", num_threads(),
              env.get("blas_kernels").c_str(), env.get("portable_kernels").c_str(), reps);

  // ---- 1. gemm tiles ----
  {
    const Index d = 1024;
    const Matrix A = random_matrix(d, d, 11, 1), B = random_matrix(d, d, 11, 2);
    const auto t = both_modes(reps, [&] { Matrix C = matmul_nt(A, B); });
    const double flop = 2.0 * d * d * d;
    std::printf("%-58s fast %8.1f GFLOP/s   portable %8.1f GFLOP/s   portable/fast %.2fx time\n",
                "sgemm 1024^3 in 256-row tiles (matmul_nt)", flop / t.first / 1e9, flop / t.second / 1e9,
                t.second / t.first);
  }

  // ---- 2. GPTQ on one layer ----
  {
    const Index d = quick ? 1024 : 2048;
    const Matrix X = ql::bench::correlated_inputs(d, d, 4321);
    HessianAccumulator H(d);
    H.add(X);
    const Matrix W = random_matrix(d, d, 4321, 5);
    auto algo = default_registry().get("gptq").create();
    const auto& la = dynamic_cast<const LayerAlgorithm&>(*algo);
    QuantSpec spec;
    spec.bits = 4;
    spec.granularity = Granularity::PerChannel;
    const LayerInput in = ql::bench::layer_input(W, H, spec);
    const std::string what = "GPTQ W4 per-channel, " + std::to_string(d) + "x" + std::to_string(d) + " layer";
    report(what.c_str(), both_modes(reps, [&] { la.run(in); }));
    const std::string hw = "Hessian accumulation, " + std::to_string(d) + " tokens x " + std::to_string(d);
    report(hw.c_str(), both_modes(reps, [&] {
             HessianAccumulator h(d);
             h.add(X);
           }));
  }

  // ---- 3. the quickstart sweep ----
  namespace fs = std::filesystem;
  const fs::path tmp = fs::temp_directory_path() / "quantlab_bench_numerics";
  fs::create_directories(tmp);
  {
    const std::string cfg = std::string(QL_SOURCE_DIR) + "/configs/quickstart.yaml";
    auto sweep = [&](const char* mode) {
      const fs::path out = tmp / (std::string("quickstart_") + mode + ".h5");
      fs::remove(out);
      RunnerOptions o;
      o.output = out.string();
      o.quiet = true;
      const auto runs = plan_runs(cfg, {std::string("numerics=") + mode}, default_registry());
      return seconds_of([&] { run_sweep(runs, o, default_registry()); });
    };
    double fast = 1e30, port = 1e30;
    for (int r = 0; r < std::max(1, reps - 1); ++r) {
      fast = std::min(fast, sweep("fast"));
      port = std::min(port, sweep("portable"));
    }
    report("quickstart sweep (21 synthetic runs)", {fast, port});
  }

  // ---- 4./5. the shared model ----
  const fs::path data = QL_SHARED_DATA_DIR;
  if (!fs::exists(data / "austen-llama-7m" / "model.safetensors")) {
    std::printf("model benchmarks: skipped, ../shared/data not found at %s\n", data.string().c_str());
    return 0;
  }
  {
    ModelWeights w = load_checkpoint((data / "austen-llama-7m").string());
    const int windows = quick ? 16 : 64, seq = 256, vocab = w.config.vocab_size;
    std::vector<std::vector<int32_t>> ids(windows, std::vector<int32_t>(seq));
    for (int b = 0; b < windows; ++b)
      for (int i = 0; i < seq; ++i)
        ids[b][i] = static_cast<int32_t>((static_cast<int64_t>(b) * 7919 + static_cast<int64_t>(i) * 104729) % vocab);
    Transformer model(w);
    const auto t = both_modes(reps, [&] {
      for (int b = 0; b < windows; b += 8) {
        std::vector<std::vector<int32_t>> chunk(ids.begin() + b, ids.begin() + std::min(windows, b + 8));
        auto logits = model.forward_batch(chunk);
      }
    });
    const double tokens = static_cast<double>(windows) * seq;
    std::printf("%-58s fast %8.0f tok/s   portable %8.0f tok/s   portable/fast %.2fx time\n",
                "model forward, austen-llama-7m, seq 256", tokens / t.first, tokens / t.second,
                t.second / t.first);
  }
  {
    const std::string dd = data.string();
    const std::string yaml =
        "workload: {kind: model, path: " + dd + "/austen-llama-7m}\n" + "calib: {text: " + dd +
        "/text/austen_train.txt, n_samples: " + (quick ? "32" : "128") + ", seq_len: 256, rule: strided}\n" +
        "eval: {seq_len: 256, kl: false, streams: [{name: p, path: " + dd + "/text/persuasion.txt, max_windows: 1}]}\n" +
        "slices: {n_boot: 0}\nquant: [{algorithm: gptq, bits: 4, scheme: asym, scale_dtype: fp32, granularity: channel}]\n";
    WorkloadCache cache;
    auto run_mode = [&](const char* mode) {
      const RunConfig rc = parse_run_config(ConfigNode::parse(yaml + "numerics: " + mode + "\n", "bench.yaml"),
                                            mode, "bench.yaml", default_registry());
      const RunRecord r = execute_run(rc, cache, default_registry());
      if (r.status != RunStatus::Ok) std::printf("whole-model GPTQ (%s) failed: %s\n", mode, r.message.c_str());
      return r.seconds_calib + r.seconds_quant;
    };
    run_mode("fast");  // warm-up: checkpoint load and tokenization are not what is measured
    double fast = 1e30, port = 1e30;
    for (int r = 0; r < std::max(1, reps - 1); ++r) {
      fast = std::min(fast, run_mode("fast"));
      port = std::min(port, run_mode("portable"));
    }
    report(quick ? "whole-model GPTQ W4 (32 x 256 calibration tokens)"
                 : "whole-model GPTQ W4 (128 x 256 calibration tokens)",
           {fast, port});
  }
  return 0;
}
