// The typed experiment config: one expanded run of a YAML file (after include:, overrides and
// sweep expansion) parsed into structs with defaults. Every run of a sweep is parsed and
// validated before any compute, so a typo in run 31 fails in a second, not after an hour.
//
// Top-level keys: seed, workload, calib, eval, slices, quant, output (+ include and sweep, which
// experiments/sweep.h consumes before this parser sees the tree).
#pragma once
#include "core/model/text_data.h"
#include <any>
#include <cstdint>
#include <string>
#include <vector>

#include "algorithms/algorithm.h"
#include "core/config_node.h"
#include "core/numerics.h"
#include "core/quant_spec.h"
#include "core/slices.h"
#include "core/synthetic.h"
#include "experiments/run_record.h"

namespace ql {

/// One step of the quantization pipeline, e.g. `{algorithm: rtn, bits: 4, granularity: group}`.
struct QuantStep {
  std::string algorithm;
  QuantSpec weight;                       ///< bits 16 for algorithms without a weight grid
  ActQuantSpec act;                       ///< `act:` map; bits 16 = activations stay float
  std::vector<std::string> targets{".*"}; ///< regexes (full match) of layer names to quantize
  std::vector<std::string> ignore;        ///< regexes of layer names to leave alone
  std::any options;                       ///< the plugin's typed options struct
  SourceLoc loc;                          ///< where the step was written, for run-time errors
};

/// LayerRow::group_size encoding of a weight grid: -1 per channel, 0 per tensor, else g.
int layer_group_size(const QuantSpec& spec);

/// `workload: {kind: model, ...}` — a Hugging Face checkpoint directory as users have it on
/// disk. Relative paths in a config resolve against the directory of the file that wrote them.
struct ModelWorkload {
  std::string path;          ///< checkpoint directory (config.json + safetensors + tokenizer)
  std::string architecture;  ///< if set, the checkpoint's architecture must equal it
};

enum class WorkloadKind { Synthetic, Model };
const char* workload_kind_name(WorkloadKind k);  ///< "synthetic" | "model"

/// `workload:` — what is quantized: `kind: synthetic` (a layer suite) or `kind: model`.
struct WorkloadConfig {
  WorkloadKind kind = WorkloadKind::Synthetic;
  SyntheticSpec synthetic;
  ModelWorkload model;
  bool is_model() const { return kind == WorkloadKind::Model; }
};

/// model: what feeds block b+1 during block-sequential calibration.
enum class Propagate { Quantized, Fp };

/// `calib:` — calibration data. Synthetic suites use tokens/populations; models use the rest.
/// One source of a calibration mixture: a text (stream protocol) or a token-id file, and its
/// share of the windows.
struct CalibSource {
  std::string name, text, ids;
  double share = 0;
};

struct CalibConfig {
  long long tokens = 1024;               ///< synthetic: calibration tokens per layer
  std::vector<std::string> populations;  ///< synthetic: populations drawn from (empty = all)
  std::string text;             ///< model: calibration text (stream protocol)
  std::string ids;              ///< model: or a token-id file (one document per line), instead of text
  /// model: or a mixture: n_samples windows split over the sources by their shares
  /// (mixture_counts), each source's windows drawn by `rule` from its own text, interleaved
  /// (mixture_order); every window is tagged with its source.
  std::vector<CalibSource> sources;
  int n_samples = 128;          ///< model: calibration windows
  int seq_len = 256;            ///< model: tokens per calibration window
  long long seed = 0;           ///< model: seed of the random window rule
  CalibRule rule = CalibRule::Random;  ///< model: random | strided (the GPTQ reference's rule)
  /// model: calibration draw `draw` of `draws` (CalibDraw): strided windows shifted by
  /// draw * (stride / draws), or an independent random set. Sweep `calib.draw` to compare
  /// results as distributions over calibration sets.
  int draw = 0;
  int draws = 1;
  /// model: what feeds block b+1 during block-sequential calibration: the outputs of the
  /// already quantized blocks (GPTQ) or of the FP blocks (FlatQuant).
  Propagate propagate = Propagate::Quantized;
  /// model: quantize q/k/v, then o, then gate/up, then down, re-collecting each stage's input
  /// statistics from the partly quantized block (GPTQ's true-sequential order).
  bool true_sequential = false;
};

/// One evaluation text: a stream (perplexity protocol) or a JSONL file of slice-labelled
/// documents.
enum class EvalSetKind { Stream, Jsonl, Ids };
const char* eval_set_kind_name(EvalSetKind k);  ///< "stream" | "jsonl" | "ids"

struct EvalSet {
  std::string name;
  std::string path;
  /// stream (perplexity protocol) | jsonl (slice-labelled documents) | ids (token-id file,
  /// one document per line)
  EvalSetKind kind = EvalSetKind::Stream;
  long long max_windows = 0;    ///< 0 = all windows; otherwise the first max_windows
};

/// `eval:` — evaluation data. Synthetic suites: `units` document-like groups of
/// `unit_tokens` tokens. Models: texts, window length, token-slice definition. The bootstrap
/// resamples units (documents; the windows of a stream), never tokens.
struct EvalConfig {
  long long units = 128;
  long long unit_tokens = 32;
  std::vector<EvalSet> sets;  ///< model: `streams:` then `slices:` entries
  int seq_len = 256;
  /// model: evaluate the FP model beside the quantized one (KL, top-1 agreement, deltas).
  /// false halves the cost and reports only the quantized model's own ppl, nll and accuracy.
  bool kl = true;
  std::string freq_corpus;    ///< token-frequency buckets are ranked on this text (default: the calibration data)
  bool freq_corpus_is_ids = false;  ///< freq_corpus is a token-id file (the default when calib.ids is used)
  std::vector<long long> rank_edges{100, 1000, 10000};
};

/// `output:` — where results go and which table to print at the end.
struct OutputConfig {
  std::string path;  ///< HDF5 file; default results/<config file stem>.h5
  std::string table_rows = "label";
  std::string table_cols;  ///< empty: no table printed
  std::vector<std::string> table_metrics;
  std::string table_format = "md";
  std::string table_over;  ///< params key aggregated as mean ± sd (e.g. calib.draw); "" = none
};

struct RunConfig {
  std::string label;
  std::string experiment;  ///< the sweep's experiment label, without swept values
  uint64_t seed = 0;
  WorkloadConfig workload;
  CalibConfig calib;
  EvalConfig eval;
  BootstrapOptions slices;
  std::vector<QuantStep> quant;
  OutputConfig output;
  /// `numerics: fast | portable` (core/numerics.h): which kernels compute every product.
  Numerics numerics = Numerics::Fast;

  /// Canonical resolved config (defaults filled in; output excluded): what run_id hashes.
  ConfigNode canonical;
  std::string run_id;

  /// The workload part alone; runs with equal workload keys share generated data.
  std::string workload_key() const;
  /// "fp", "rtn", "smoothquant+gptq", ...
  std::string pipeline_name() const;
  /// Weight bits of the run: the smallest `bits` of its steps (16 when nothing is quantized).
  int weight_bits() const;
  /// Activation quantization of the run, e.g. "a8 sym per-token dynamic" (the last step that
  /// quantizes activations), or "a16".
  std::string activation() const;
};

/// Parse and validate one expanded run. `config_path` is used for the default output path.
/// Throws ConfigError (file:line:col, key path, expected vs found, run label).
RunConfig parse_run_config(const ConfigNode& root, const std::string& label,
                           const std::string& config_path, const AlgorithmRegistry& registry);

/// One documented section of a run config, for `quantlab list`: the section's key, the
/// workload kind it applies to ("" = both) and the option docs of its schema (the same
/// schema that parses it, so the listing cannot drift from the parser).
struct ConfigSectionDoc {
  std::string key;
  std::string applies_to;
  std::string summary;
  std::vector<OptionDoc> options;
};
std::vector<ConfigSectionDoc> config_section_docs();

/// Flatten a tree into dotted keys ("quant.0.bits" -> "4"); sequences of scalars become flow
/// text ("[a, b]").
std::vector<ParamRow> flatten_params(const ConfigNode& node);

}  // namespace ql
