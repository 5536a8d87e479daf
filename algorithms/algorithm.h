// The plugin interface. Algorithms act at different scopes (DESIGN.md "One interface, several
// scopes"), so there is one narrow base class per scope instead of one wide interface:
//
//   Layer          RTN, GPTQ, VLMQ        one linear's W (+ its calibration statistics) -> Ŵ;
//                                          VLMQ also weighs a block's calibration tokens
//   NormConsumers  SmoothQuant, AWQ        a shared input and the linears reading it ->
//                                          an explicit per-channel equivalence transform
//                                          (AWQ: plus the consumers' quantized weights)
//   Block          rotation, FlatQuant
//   Model          ZeroQAT
//   KvCache        CommVQ, scalar KV baselines
//
// The runner owns ordering, calibration capture, block-sequential propagation and evaluation;
// a plugin owns only its math. Shared work lives once in the non-virtual run() of each scope
// class: it checks shapes and finiteness, times the call, calls the plugin's private
// implementation, then checks that codes lie on the grid and computes the standard metrics.
// Every plugin quantizes through core/quantize.h; none has its own round/clamp loop.
#pragma once
#include <any>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/calib_stats.h"
#include "core/model/architecture.h"
#include "core/model/kv_cache_quant.h"
#include "core/model/quantized_model.h"
#include "core/options.h"
#include "core/quant_spec.h"
#include "core/quantize.h"
#include "core/tensor.h"

namespace ql {

enum class Scope { Layer, NormConsumers, Block, Model, KvCache };
const char* scope_name(Scope s);

/// A named scalar a plugin reports about one layer (e.g. gptq_loss, damping_used); written to
/// the per-layer diagnostics table.
using Diagnostics = std::vector<std::pair<std::string, double>>;

class Algorithm {
 public:
  virtual ~Algorithm() = default;
  virtual Scope scope() const = 0;
};

// ------------------------------------------------------------------------------------------
// Layer scope
// ------------------------------------------------------------------------------------------

/// What a layer-scope plugin sees. References stay valid for the duration of the call.
struct LayerInput {
  std::string name;                             ///< layer name, for diagnostics and errors
  const Matrix* W = nullptr;                    ///< d_out x d_in, after earlier pipeline steps
  const HessianAccumulator* hessian = nullptr;  ///< calibration H of the layer input, or null
  const ChannelStats* channels = nullptr;       ///< per-input-channel statistics, or null
  QuantSpec spec;                               ///< the weight grid requested by the step
  uint64_t seed = 0;                            ///< for plugins that draw random numbers
};

/// What a layer-scope plugin returns.
struct LayerOutput {
  Matrix W;                                   ///< weights to use from now on (d_out x d_in)
  std::optional<QuantizedTensor> quantized;   ///< codes + grids when W lies on spec's grid
  Diagnostics diagnostics;
};

/// The standard per-layer metrics run() computes for every plugin.
struct LayerMetrics {
  double weight_mse = 0;
  double rel_output_error_h = 0;  ///< tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) under calibration H; NaN without H
  double sqnr_db = 0;             ///< of the weights
  double bits_per_weight = 16;
  double seconds = 0;
};

struct LayerResult {
  LayerOutput output;
  LayerMetrics metrics;
};

/// What a layer plugin that weighs its calibration tokens (needs.token_importance: VLMQ) sees
/// once per block, before the block's layer steps. References stay valid for the call.
struct TokenImportanceInput {
  int block = 0;
  std::string name;                               ///< "model.layers.3", or the standalone linear
  const ModelConfig* config = nullptr;
  const DecoderBlock* weights = nullptr;          ///< the block's current (unquantized) weights
  /// A standalone linear instead (the synthetic suite, no block; config and weights null): its
  /// weights, and then inputs / targets are its calibration inputs per population block and
  /// the FP outputs X Wᵀ on them.
  const Matrix* linear = nullptr;
  const std::vector<Matrix>* inputs = nullptr;    ///< calibration inputs, one T x hidden per window
  const std::vector<Matrix>* targets = nullptr;   ///< the FP block's outputs on exactly those inputs
  QuantSpec spec;                                 ///< the step's weight grid
  /// Per window: index into source_names (the calibration source it was drawn from).
  std::vector<int> window_source;
  std::vector<std::string> source_names;
};

struct TokenImportance {
  /// Per window, one weight g_t >= 0 per token (finite, not all zero). The runner accumulates
  /// the block's Hessians as Σ g_t x_t x_tᵀ / Σ g_t (VLMQ's H̃ = Xᵀ G X, mean-normalised).
  std::vector<Vector> weights;
  Diagnostics diagnostics;
};

class LayerAlgorithm : public Algorithm {
 public:
  Scope scope() const final { return Scope::Layer; }
  /// For plugins whose info declares needs.token_importance: the importance of every
  /// calibration token of one block. Checks the input (inputs and targets of equal shapes) and
  /// the result (one finite non-negative weight per token, a positive total); ShapeError /
  /// NumericError naming the block.
  TokenImportance token_importance(const TokenImportanceInput& in) const;
  /// Checks W (finite, non-empty) and H (matching d_in), times quantize_layer, checks the
  /// output shape and finiteness, that codes lie in [qmin, qmax] and that W equals
  /// dequantize(codes) when codes are given, then computes LayerMetrics. Throws ShapeError /
  /// NumericError naming the layer.
  LayerResult run(const LayerInput& in) const;

 private:
  virtual LayerOutput quantize_layer(const LayerInput& in) const = 0;
  /// Default: Error (a plugin that declares needs.token_importance overrides it).
  virtual TokenImportance compute_token_importance(const TokenImportanceInput& in) const;
};

// ------------------------------------------------------------------------------------------
// Norm -> consumers scope
// ------------------------------------------------------------------------------------------

/// A per-input-channel equivalence transform for a group of linears that read the same input
/// x (d_in): x' = x / s and W' = W diag(s) for every consumer, so x'W'ᵀ = xWᵀ exactly in real
/// arithmetic. The runner folds 1/s into the producer (an RMSNorm weight, or the synthetic
/// suite's input) exactly once. Returned as an object so results can record it.
struct ChannelScaleTransform {
  VectorD scales;  ///< s_j > 0, finite
  Diagnostics diagnostics;
  /// Plugins that take a weight grid (AWQ): the consumers' weights to use from now on, already
  /// in the scaled space (W diag(s), then e.g. clipped or quantized), one per consumer; the
  /// runner then folds s into the producer only. Empty: the runner folds s into the weights.
  std::vector<Matrix> weights;
  /// Parallel to weights when set: their codes where they lie on the step's grid
  /// (dequantize(codes) == weights, checked by run()), else nullopt.
  std::vector<std::optional<QuantizedTensor>> quantized;
};

struct NormConsumerInput {
  std::string name;                        ///< e.g. "block3.attn_in"
  std::vector<std::string> consumer_names;
  std::vector<const Matrix*> consumers;    ///< weights of the linears reading the input
  const ChannelStats* input_stats = nullptr;  ///< statistics of the shared input
  /// For plugins whose info declares needs.hessian: H = XᵀX/n of the shared input (the input
  /// the current weights read), else null.
  const HessianAccumulator* hessian = nullptr;
  /// For plugins that take a weight grid: the step's grid, and whether the consumers should be
  /// left on it (false when a later step quantizes them, e.g. [awq, gptq]).
  const QuantSpec* spec = nullptr;
  bool quantize = false;
  /// False when no producer can absorb a channel scale (a model's o_proj input): the plugin
  /// must return scales of 1 (it may still clip and quantize).
  bool can_scale = true;
};

class NormConsumerAlgorithm : public Algorithm {
 public:
  Scope scope() const final { return Scope::NormConsumers; }
  /// Checks consumers share d_in and stats / H match it; checks the returned scales are
  /// positive and finite (exactly 1 when !can_scale), and returned weights: one per consumer,
  /// same shapes, finite, codes (when given) in range and reconstructing the weights bitwise.
  ChannelScaleTransform run(const NormConsumerInput& in) const;

 private:
  virtual ChannelScaleTransform compute_transform(const NormConsumerInput& in) const = 0;
};

// ------------------------------------------------------------------------------------------
// KV-cache scope: a quantizer attention reads through (core/model/kv_cache_quant.h), per block.
// Model workloads only; the runner refuses it elsewhere with an error naming the step.
// ------------------------------------------------------------------------------------------

/// What a KV-cache plugin sees for one block.
struct KvCacheInput {
  int block = 0;
  std::string name;   ///< "model.layers.3.self_attn"
  HeadLayout heads;   ///< kv width = heads.kv_dim()
  RopePairing rope;
  /// Calibration keys (before and after RoPE) and values of the block, every calibration window
  /// stacked (rows = tokens, kv_dim columns), as the block's current weights produce them;
  /// captured only when the plugin declares CalibNeeds::kv, else null.
  const Matrix* keys_pre_rope = nullptr;
  const Matrix* keys_post_rope = nullptr;
  const Matrix* values = nullptr;
  /// With the captures: the post-RoPE queries (tokens x q_dim, rows as above; for attention
  /// diagnostics) and the row count of each stacked window (window w starts at position 0).
  const Matrix* queries = nullptr;
  std::vector<Index> window_rows;
  /// Clipping of the per-token grids learned by an earlier block step against this cache's
  /// scalar_grid() (FlatQuant); identity when none.
  ActClip key_clip, value_clip;
  uint64_t seed = 0;
};

struct KvCacheResult {
  /// Null: the plugin leaves the cache exact (e.g. 16 bits).
  std::shared_ptr<const KvQuantizer> quantizer;
  Diagnostics diagnostics;
  double seconds = 0;
};

/// With captures of n calibration windows: a plugin that fits on them uses windows
/// [0, kv_heldout_window(n)) and the diagnostics are measured on [kv_heldout_window(n), n): the
/// last quarter (at least one window) held out, or the one window itself when n == 1.
std::size_t kv_heldout_window(std::size_t n_windows);
/// Rows of the first `windows` windows.
Index kv_window_rows(const std::vector<Index>& window_rows, std::size_t windows);

class KvCacheAlgorithm : public Algorithm {
 public:
  Scope scope() const final { return Scope::KvCache; }
  /// Checks the captures' widths against the head layout, times fit_quantizer, and checks the
  /// quantizer: chunks >= 1, residual >= 0, and one chunk of keys and of values of the block's
  /// width encodes and decodes to finite values of that shape. Throws ShapeError / NumericError
  /// naming the block. With captures (needs.kv), adds the held-out measure_kv_error of
  /// core/model/kv_cache_quant.h as diagnostics key_rel_mse, value_rel_mse,
  /// attn_score_rel_err, attn_top8_agreement.
  KvCacheResult run(const KvCacheInput& in) const;
  /// Checks the options against the model's heads before any compute (a group that would
  /// split a head, a bit width no stage count reaches, ...): throws ConfigError whose key path
  /// is the option's key (the runner prefixes the step's path and line). Default: nothing.
  virtual void check_heads(const HeadLayout& heads) const { (void)heads; }
  /// The scalar grid this step applies when a block-local objective can simulate it exactly
  /// (asymmetric per-token grids over channel groups for post-RoPE keys and values, every token
  /// quantized); an earlier trained block step (FlatQuant) then trains the key transform and
  /// the grids' clipping against it. Default: none (nothing to simulate, e.g. vector codebooks).
  virtual std::optional<ScalarKvSpec> scalar_grid() const { return std::nullopt; }

 private:
  virtual std::shared_ptr<const KvQuantizer> fit_quantizer(const KvCacheInput& in,
                                                           Diagnostics& diagnostics) const = 0;
};

// ------------------------------------------------------------------------------------------
// Block scope: transforms for one decoder block, in the slots of the architecture table
// (rotation; FlatQuant will learn the same objects). The runner merges their inverses into the
// weights and installs the online parts in the quantized model (QuantizedModel::
// apply_transforms) before the block's norm->consumers and layer steps, which then see the
// transformed weights and inputs.
// ------------------------------------------------------------------------------------------

struct BlockInput {
  int block = 0;
  std::string name;                         ///< "model.layers.3"
  const Architecture* arch = nullptr;       ///< slots, head layout, widths
  const ModelConfig* config = nullptr;
  const DecoderBlock* weights = nullptr;    ///< the block's current weights
  bool kv_quantized = false;                ///< a KV-cache step follows in the pipeline
  /// That step's scalar grid when it has one to simulate (KvCacheAlgorithm::scalar_grid).
  std::optional<ScalarKvSpec> kv_grid;
  uint64_t seed = 0;
  /// With needs.block_io: the block's calibration inputs (one T x hidden residual stream per
  /// window, as quantized upstream under calib.propagate: quantized) and the FP block's outputs
  /// on exactly those inputs (what a block-local objective reconstructs); null otherwise.
  const std::vector<Matrix>* inputs = nullptr;
  const std::vector<Matrix>* targets = nullptr;
  /// The quantizers the run applies after this step (what a trained transform's objective
  /// simulates): the grid of the first later weight step and the first activation spec of
  /// this or a later step; null: none.
  const QuantSpec* weight_spec = nullptr;
  const ActQuantSpec* act_spec = nullptr;
  /// The run's progress line (may be empty): training plugins report epoch and loss there.
  std::function<void(const std::string&)> progress;
};

struct BlockResult {
  BlockTransforms transforms;
  Diagnostics diagnostics;
  double seconds = 0;
};

/// A standalone linear's input (the synthetic suite's layers, which have no block), for plugins
/// whose info declares standalone_inputs.
struct StandaloneInput {
  std::string name;                        ///< the consumer, e.g. "attn.qkv"
  Index width = 0;                         ///< input channels
  uint64_t stream = 0;                     ///< random stream of this layer and step
  /// Calibration inputs (tokens x width) as the earlier steps left them, and the consumers'
  /// current weights: what a trained transform fits (null / empty for draw-only plugins' tests).
  const Matrix* X_calib = nullptr;
  std::vector<const Matrix*> weights;
  /// The quantizers the run applies after this step: the grid of the first later weight step
  /// (null: none) and the activation quantizer of this input (null: float), which a trained
  /// transform's objective simulates.
  const QuantSpec* weight_spec = nullptr;
  const ActQuantSpec* act_spec = nullptr;
};

struct StandaloneResult {
  std::shared_ptr<const InputTransform> transform;  ///< null: the input is left alone
  /// The consumers' weights to use after the transform (consumer order), e.g. merged and
  /// clipped (FlatQuant's LWC); empty: the caller merges the transform's inverse itself.
  std::vector<Matrix> weights;
  ActClip act_clip;  ///< learned clipping of the input's activation quantizer (LAC)
  Diagnostics diagnostics;
};

class BlockAlgorithm : public Algorithm {
 public:
  Scope scope() const final { return Scope::Block; }
  /// Checks the block's weights are finite, times compute_transforms, and checks every returned
  /// transform: the width of its slot, and a stored inverse exact to 1e-6 (max |P P⁻¹ - I|).
  /// Throws ShapeError / NumericError naming the block and slot.
  BlockResult run(const BlockInput& in) const;
  /// For plugins whose info declares standalone_inputs: the transform of a standalone
  /// linear's input (fit_standalone), checked as run() checks a slot (width, inverse error
  /// < 1e-6) and, when replacement weights are returned, their count and shapes. The caller
  /// applies the transform online (and merges its inverse unless weights were returned).
  StandaloneResult run_standalone(const StandaloneInput& in) const;

 private:
  virtual BlockTransforms compute_transforms(const BlockInput& in, Diagnostics& diagnostics) const = 0;
  /// Default: standalone_transform(in.width, in.stream), no weights, no clipping.
  virtual StandaloneResult fit_standalone(const StandaloneInput& in) const;
  /// A draw-only transform of `width` channels from random stream `stream` (rotation).
  virtual std::shared_ptr<const InputTransform> standalone_transform(Index width, uint64_t stream) const;
};

// ------------------------------------------------------------------------------------------
// Model scope (ZeroQAT): one call on the whole quantized model, after every block-sequential
// step (the runner refuses a model step followed by another kind), before evaluation.
// ------------------------------------------------------------------------------------------

struct ModelInput {
  std::string name = "model";
  /// The pipeline's result so far. The plugin may change current weights (setting or clearing
  /// their codes so that dequantize(codes) == weights still holds), activation and KV-cache
  /// quantizers; the FP weights are never changed.
  QuantizedModel* model = nullptr;
  /// Calibration windows (token ids inside the vocabulary), as the block steps saw them.
  const std::vector<std::vector<int32_t>>* windows = nullptr;
  uint64_t seed = 0;
  /// The run's progress line (may be empty): training plugins report step, loss and ETA there.
  std::function<void(const std::string&)> progress;
};

/// One row of a training plugin's per-step trace (written to the run's `training` table).
/// NaN where a quantity was not measured at that step.
struct TrainingPoint {
  int64_t step = 0;         ///< 0 = before the first update
  int64_t forwards = 0;     ///< forward passes of the quantized model so far
  int64_t backwards = 0;    ///< backward passes so far
  double train_loss = 0;    ///< on the step's batch (at the parameters the step started from)
  double heldout_loss = 0;  ///< on the held-out windows
  double grad_cosine = 0;   ///< cos(estimate, exact gradient) on the step's batch
  double grad_norm_ratio = 0;  ///< |estimate| / |exact gradient|
  double lr = 0;
  double seconds = 0;       ///< since training started
};

struct ModelResult {
  Diagnostics diagnostics;
  std::vector<TrainingPoint> trace;
  double seconds = 0;
};

class ModelAlgorithm : public Algorithm {
 public:
  Scope scope() const final { return Scope::Model; }
  /// Checks the input (a model; at least one window; ids inside the vocabulary), times
  /// process_model, then checks the model it leaves: every current weight finite, and where a
  /// linear has codes, dequantize(codes) equal to its weights bitwise. Throws ShapeError /
  /// NumericError naming the linear.
  ModelResult run(ModelInput& in) const;

 private:
  /// Fills out.diagnostics and, for a training plugin, out.trace.
  virtual void process_model(ModelInput& in, ModelResult& out) const = 0;
};

// ------------------------------------------------------------------------------------------
// Registration
// ------------------------------------------------------------------------------------------

/// The calibration data a plugin reads; the runner captures only what some step needs.
struct CalibNeeds {
  bool hessian = false;        ///< H = XᵀX/n of each linear's input
  bool channel_stats = false;  ///< per-input-channel absmax / mean|x| / mean x² / min / max
  bool kv = false;             ///< each block's calibration keys (pre/post RoPE) and values
  bool block_io = false;       ///< each block's calibration inputs and FP outputs (BlockInput)
  /// Layer scope: the plugin weighs calibration tokens (LayerAlgorithm::token_importance); the
  /// first such step's weights then define every Hessian of the block the run's steps read
  /// (layer rows keep measuring under the unweighted FP Hessian).
  bool token_importance = false;
};

struct AlgorithmInfo {
  std::string name;     ///< the `algorithm:` value in YAML
  Scope scope = Scope::Layer;
  std::string summary;  ///< one line for `quantlab list`
  std::string paper;    ///< title and arXiv id, or "" for baselines
  /// Whether the step's weight QuantSpec keys (bits, scheme, ...) apply; `fp` takes none.
  bool uses_weight_spec = true;
  /// The plugin leaves every weight as it is (`fp`): a pipeline of such steps without
  /// activation quantization is the FP model, which the runner need not evaluate twice.
  bool identity = false;
  /// Block scope: the plugin also transforms the input of a standalone linear
  /// (BlockAlgorithm::run_standalone), so the synthetic layer suite can drive it.
  bool standalone_inputs = false;
  /// Norm->consumers scope: a scale of an input without a norm may also fold into the rows of
  /// the linear producing it (the table's scale_rows: up_proj for down's input), AWQ's up->down;
  /// SmoothQuant's reference folds into norms only. (A norm->consumers plugin that takes a
  /// weight grid runs on every input group, with can_scale false where nothing absorbs s.)
  bool scales_linear_producers = false;
  CalibNeeds needs;
  /// Option entries ("k: v, ..."; no commas inside values) under which the plugin applies to
  /// the conformance tests' tiny shapes (KV widths 4-32, a few hundred calibration tokens), when
  /// its defaults cannot (e.g. 4096-codeword stages on 128 training tokens, or a stage wider
  /// than the bit budget of 4 channels); empty = the defaults apply.
  std::string tiny_model_options;
  /// The plugin's own options (typed struct behind std::any).
  std::shared_ptr<const AnyOptionSchema> options;
  /// Builds the plugin with its parsed options (the struct options->defaults() holds); a
  /// plugin is built once per run and keeps its typed options.
  std::function<std::unique_ptr<Algorithm>(const std::any& options)> make;
  /// make() with `options`, or with the schema's defaults when `options` is empty. Error naming
  /// the plugin when `options` holds another type.
  std::unique_ptr<Algorithm> create(const std::any& options = {}) const;
};

class AlgorithmRegistry {
 public:
  /// Throws Error on a duplicate name or an option that collides with a step key.
  void add(AlgorithmInfo info);
  /// Throws Error "unknown algorithm 'x'; known: fp, rtn, ..." for an unknown name.
  const AlgorithmInfo& get(const std::string& name) const;
  bool contains(const std::string& name) const;
  std::vector<std::string> names() const;  ///< in registration order

 private:
  std::vector<AlgorithmInfo> infos_;
};

/// The keys every quant step has besides the plugin's own options.
const std::vector<std::string>& common_step_keys();

/// Calls every plugin's register_* function (algorithms/register_all.cc: the one list).
void register_all(AlgorithmRegistry& registry);
/// A registry filled by register_all, built on first use; immutable afterwards.
const AlgorithmRegistry& default_registry();

}  // namespace ql
