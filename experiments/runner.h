// The runner: config file -> expanded runs -> for each run: workload (generated once and shared
// by every run with the same workload keys) -> calibration statistics -> quantization pipeline
// -> evaluation overall and per slice -> one atomic append to the HDF5 results file.
//
// A run that fails is recorded (status "failed" + message) and the sweep goes on; a run whose
// id is already stored with status "ok" is skipped (resume). Results are identical for a given
// seed and thread count, and the test suite checks they are bitwise identical for 1 and 2
// threads.
#pragma once
#include <functional>
#include <iosfwd>
#include <memory>
#include <string>
#include <vector>

#include "algorithms/algorithm.h"
#include "experiments/config.h"
#include "experiments/model_runner.h"
#include "experiments/run_record.h"

namespace ql {

/// Load, include, override, expand and parse every run of a config file. Throws ConfigError for
/// the first invalid run, before anything is computed.
std::vector<RunConfig> plan_runs(const std::string& config_path,
                                 const std::vector<std::string>& overrides,
                                 const AlgorithmRegistry& registry);

struct RunnerOptions {
  int threads = 0;         ///< 0 = keep the OpenMP default
  std::string output;      ///< if set, replaces output.path of every run
  bool quiet = false;      ///< no progress output
  std::ostream* progress = nullptr;  ///< where progress goes (default std::cerr)
};

struct SweepSummary {
  int total = 0, skipped = 0, ok = 0, failed = 0;
  std::vector<std::string> output_paths;  ///< distinct result files written, in order
};

class WorkloadCache;

/// Execute one run (no file I/O). Never throws for run-time failures: they come back as a
/// record with status "failed".
RunRecord execute_run(const RunConfig& run, WorkloadCache& cache, const AlgorithmRegistry& registry,
                      const std::function<void(const std::string&)>& on_layer = {});

/// Execute every run not already stored, appending each to its output file.
SweepSummary run_sweep(const std::vector<RunConfig>& runs, const RunnerOptions& opts,
                       const AlgorithmRegistry& registry);

/// Holds the prepared data of the most recent workload (generated inputs, FP outputs,
/// calibration statistics) so runs that differ only in their quant pipeline reuse it.
class WorkloadCache {
 public:
  WorkloadCache();
  ~WorkloadCache();
  struct Prepared;
  /// The prepared workload of `run`, generating it if the cached one has another key.
  /// `seconds` receives the time spent preparing (0 on a cache hit).
  std::shared_ptr<const Prepared> get(const RunConfig& run, double* seconds);
  /// Checkpoints, tokenized texts and windows of `kind: model` workloads.
  ModelCache& model() { return model_; }

 private:
  ModelCache model_;
  std::shared_ptr<const Prepared> current_;
  std::string key_;
};

}  // namespace ql
