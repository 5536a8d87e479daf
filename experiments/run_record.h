// Everything one run of an experiment produces: what the result store writes to HDF5 and
// what `table` / `export-csv` read back. Plain data, no behaviour.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/slices.h"

namespace ql {

/// How a run ended. Stored as "ok" / "failed" (run_status_name).
enum class RunStatus { Ok, Failed };
const char* run_status_name(RunStatus s);
/// Parses a stored status; Error naming the value for anything else.
RunStatus parse_run_status(const std::string& s);

/// One linear layer after the whole pipeline of a run.
struct LayerRow {
  std::string layer;      ///< layer name
  std::string algorithm;  ///< pipeline, e.g. "smoothquant+gptq", or "fp"
  std::string scheme;     ///< "asym" | "sym" | "sym_offset" | "none"
  int bits = 16;
  int group_size = -1;    ///< -1 = per channel, 0 = per tensor
  double bpw = 16;        ///< storage bits per weight incl. scale/zero overhead
  double weight_mse = 0;
  double rel_err_h = 0;     ///< tr(ΔW H ΔWᵀ)/tr(W H Wᵀ), calibration H
  double rel_err_eval = 0;  ///< Σ‖ΔW x‖² / Σ‖W x‖² on evaluation inputs (activation quant incl.)
  double out_mse = 0;       ///< mean squared output error on evaluation inputs
  double sqnr_db = 0;       ///< output SQNR on evaluation inputs
  double cosine = 0;        ///< output cosine on evaluation inputs
  double max_abs = 0;       ///< max |ΔY| on evaluation inputs
  double seconds = 0;       ///< time in the pipeline's plugins for this layer
};

/// A named scalar a plugin reported for one layer and pipeline step.
struct DiagnosticRow {
  std::string layer;
  int step = 0;
  std::string algorithm;
  std::string name;
  double value = 0;
};

/// One step of a training plugin's trace (algorithms/algorithm.h TrainingPoint), with the
/// pipeline step and algorithm it belongs to; NaN where not measured.
struct TrainingRow {
  int pipeline_step = 0;
  std::string algorithm;
  int64_t step = 0, forwards = 0, backwards = 0;
  double train_loss = 0, heldout_loss = 0, grad_cosine = 0, grad_norm_ratio = 0, lr = 0, seconds = 0;
};

/// A run-level summary metric (the overall slice's values, repeated for convenience).
struct SummaryRow {
  std::string metric;
  double value = 0, ci_low = 0, ci_high = 0, delta_vs_fp = 0;
};

/// A flattened resolved-config entry: "quant.0.bits" -> "4". Used by `table` to pivot.
struct ParamRow {
  std::string key, value;
};

struct RunRecord {
  std::string run_id;         ///< 16 hex digits, stable hash of the canonical resolved config
  std::string label;          ///< human label, e.g. "rtn bits=4 granularity=group"
  std::string config_yaml;    ///< canonical resolved config (what the hash is of)
  std::string code_revision;  ///< git revision of the binary ("-dirty" if modified)
  RunStatus status = RunStatus::Failed;
  std::string message;        ///< error message when failed
  std::string started_at;     ///< ISO 8601 UTC
  uint64_t seed = 0;
  int threads = 1;
  double seconds_total = 0, seconds_calib = 0, seconds_quant = 0, seconds_eval = 0;

  std::vector<ParamRow> params;
  /// The numeric environment the run was computed in (core/numerics.h): mode, BLAS library,
  /// version and kernels, CPU and its vector extensions, libc, compiler and flags, Eigen,
  /// threads. Fast-mode results are bitwise reproducible only where these agree.
  std::vector<ParamRow> numeric_env;
  std::vector<LayerRow> layers;
  std::vector<DiagnosticRow> diagnostics;
  std::vector<TrainingRow> training;  ///< per-step traces of training steps (empty: none)
  std::vector<SummaryRow> summary;
  std::vector<SliceRow> slices;
  std::vector<DisparityRow> disparity;
  UnitTable units;  ///< per-unit sufficient statistics, so any CI can be recomputed offline
};

}  // namespace ql
