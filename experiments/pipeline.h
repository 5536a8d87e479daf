// The one pipeline path of every workload: the plugins of a run, built once, and apply_step,
// which runs one step of the pipeline on one shared input and the linears that read it,
// dispatching on the plugin's scope. The synthetic layer suite (one linear per input) and the
// model workload (the groups of core/model/architecture.h, block by block) both call it, so
// step dispatch, scope gates, diagnostics, layer rows and folding exist once.
//
// Per input group the pipeline keeps the consumers' current weights in the transformed input
// space, the cumulative per-channel scale s (x' = x / s after norm->consumers steps) and the
// calibration statistics of x'. A norm->consumers step folds 1/s into the producer (an RMSNorm
// weight) when the group has one; otherwise the workload applies 1/s to the input itself.
#pragma once
#include <functional>
#include <memory>
#include <optional>
#include <regex>
#include <string>
#include <vector>

#include "algorithms/algorithm.h"
#include "experiments/config.h"
#include "experiments/run_record.h"

namespace ql {

/// One step of a run's pipeline, ready to run: the plugin built once with the step's options,
/// and its layer-selection regexes compiled once.
class PipelineStep {
 public:
  PipelineStep(const QuantStep& step, const AlgorithmInfo& info);
  const QuantStep& config() const { return *step_; }
  const Algorithm& plugin() const { return *plugin_; }
  Scope scope() const { return scope_; }
  const CalibNeeds& needs() const { return needs_; }
  /// The plugin's info (AlgorithmInfo::uses_weight_spec, scales_linear_producers).
  bool uses_weight_spec() const { return uses_weight_spec_; }
  bool scales_linear_producers() const { return scales_linear_producers_; }
  /// The step acts on the layer: its name fully matches a target and no ignore regex.
  bool applies_to(const std::string& layer) const;

 private:
  const QuantStep* step_;
  std::unique_ptr<Algorithm> plugin_;
  Scope scope_;
  CalibNeeds needs_;
  bool uses_weight_spec_ = true;
  bool scales_linear_producers_ = false;
  std::vector<std::regex> targets_, ignore_;
};

/// Checks that every step of `run` acts at a scope its workload drives (synthetic suite: layer,
/// norm->consumers, and block plugins that transform standalone inputs; model: also block, KV
/// cache and model) and that block-scope steps come before the weight steps and model steps
/// after everything else. ConfigError at the step's line otherwise. parse_run_config calls it, so a
/// bad pipeline fails before any compute.
void validate_pipeline(const RunConfig& run, const AlgorithmRegistry& registry);

/// The steps of one run (validated by validate_pipeline).
class Pipeline {
 public:
  Pipeline(const RunConfig& run, const AlgorithmRegistry& registry);
  const std::vector<PipelineStep>& steps() const { return steps_; }
  /// Every step is `fp` without activation quantization: the quantized model is the FP model.
  bool is_identity() const { return identity_; }
  uint64_t seed() const { return seed_; }
  const RunConfig& run() const { return *run_; }
  /// Whether any step reads channel statistics: a plugin that declares them, or static
  /// activation ranges (fixed from the calibration inputs' min/max). The runner captures them
  /// only then.
  bool needs_channel_stats() const { return channel_stats_; }
  /// The model-dependent option checks of the KV-cache steps (KvCacheAlgorithm::check_heads),
  /// before any compute: ConfigError at the step's line with the path quant.<i>.<key>.
  void check_heads(const HeadLayout& heads) const;

 private:
  const RunConfig* run_;
  uint64_t seed_;
  std::vector<PipelineStep> steps_;
  bool identity_ = true;
  bool channel_stats_ = false;
};

/// One shared input and the linears reading it, at one point of a run. Pointers refer to the
/// workload's state and stay valid for the call; the vectors are parallel (one entry per
/// consumer, in data-flow order).
struct InputGroupState {
  std::string input_name;                     ///< e.g. "model.layers.3.input_layernorm"
  std::vector<std::string> names;             ///< consumer linear names
  std::vector<Matrix*> weights;               ///< consumers' current weights (d_out x d_in)
  std::vector<LayerRow*> rows;                ///< their layer rows (bits, bpw, seconds)
  std::vector<const ActQuantSpec**> act;      ///< their activation quantizer (set by steps)
  /// Their codes and grids: set by a layer step that returns them, cleared by a step that
  /// changes the weights without them (so dequantize(codes) == weights whenever set).
  std::vector<std::optional<QuantizedTensor>*> codes;
  /// Per consumer: the random stream of its plugin calls is mix_stream(run seed, this + step
  /// index), so plugins that draw numbers are reproducible per layer and step.
  std::vector<uint64_t> seed_streams;
  HessianAccumulator* H = nullptr;            ///< of x' (the transformed input)
  ChannelStats* S = nullptr;                  ///< of x'
  VectorD* scale = nullptr;                   ///< cumulative s, x' = x / s
  Vector* norm = nullptr;                     ///< producer RMSNorm weight, or null
  /// Whether a per-channel scale of this input can be absorbed: by `norm`, or (no norm) by
  /// the workload dividing the input by `scale` itself. False for inputs no producer can
  /// absorb exactly (a model's o_proj and down_proj inputs): norm->consumers steps skip them.
  bool absorbs_scale = false;
  /// Without a norm: the linear whose output rows produce the input channel by channel (the
  /// architecture table's scale_rows: up_proj for down's input), which absorbs a scale as
  /// rows / s for plugins that declare scales_linear_producers; its codes follow (grid scales
  /// of row j / s_j, weights = dequantize(codes)). Null elsewhere.
  Matrix* producer_rows = nullptr;
  Vector* producer_bias = nullptr;
  std::optional<QuantizedTensor>* producer_codes = nullptr;
  /// A standalone linear's input (the synthetic suite, one consumer): where a block-scope
  /// step's input transform goes, and the calibration inputs its statistics are recomputed
  /// from. Null for a model's groups, whose block steps act per block (the model runner).
  std::shared_ptr<const InputTransform>* transform = nullptr;
  const Matrix* X_calib = nullptr;
  ActClip* act_clip = nullptr;  ///< learned clipping of the input's activation quantizer (standalone)
};

/// Runs step `si` on group g: a layer-scope step quantizes every consumer it applies to; a
/// norm->consumers step (when it applies to the first consumer) computes s, folds it into the
/// consumers (and 1/s into the norm or the producer's rows), and rescales H, S and the
/// cumulative scale; one that takes a weight grid (AWQ) runs on every group (scales of 1 where
/// nothing absorbs them) and its returned weights / codes replace the consumers'; a block-scope
/// step on a standalone input (g.transform set) draws its transform P, merges P⁻ᵀ into the
/// weights (double) and recomputes H and S from X_calib P; a step with activation quantization
/// sets the consumers' act spec; KV-cache, model and per-block steps do nothing here (their
/// runners call them). Diagnostics go to rec.
void apply_step(const Pipeline& pipeline, std::size_t si, InputGroupState& g, RunRecord& rec);

/// Runs KV-cache step `si` on one block: the plugin fits a quantizer from `in` (whose captures
/// the caller filled when the plugin's info declares needs.kv) and the result replaces `slot`
/// when the step applies to in.name (a later KV step replaces an earlier one). Diagnostics,
/// including kv_bits at `eval_len` tokens, go to rec.
void apply_kv_step(const Pipeline& pipeline, std::size_t si, const KvCacheInput& in, int64_t eval_len,
                   std::shared_ptr<const KvQuantizer>& slot, RunRecord& rec);

/// Runs model-scope step `si` on the whole model when it applies to in.name ("model"), with
/// the step's random stream in in.seed; diagnostics go to rec. Other scopes: nothing.
ModelResult apply_model_step(const Pipeline& pipeline, std::size_t si, ModelInput& in, RunRecord& rec);

/// A fresh layer row for a linear: the run's pipeline name, no grid (16 bits) until a step
/// quantizes it.
LayerRow initial_layer_row(const RunConfig& run, const std::string& name);

}  // namespace ql
