#include "experiments/pipeline.h"

#include <chrono>

#include "core/error.h"
#include "core/model/fold.h"
#include "core/model/transforms.h"
#include "core/rng.h"

namespace ql {

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

bool full_match_any(const std::vector<std::regex>& res, const std::string& name) {
  for (const std::regex& r : res)
    if (std::regex_match(name, r)) return true;
  return false;
}

void apply_layer_step(const Pipeline& p, std::size_t si, const LayerAlgorithm& algo,
                      InputGroupState& g, RunRecord& rec) {
  const PipelineStep& ps = p.steps()[si];
  const QuantStep& step = ps.config();
  for (std::size_t m = 0; m < g.weights.size(); ++m) {
    if (!ps.applies_to(g.names[m])) continue;
    LayerInput in;
    in.name = g.names[m];
    in.W = g.weights[m];
    in.hessian = g.H;
    in.channels = g.S;
    in.spec = step.weight;
    in.seed = mix_stream(p.seed(), g.seed_streams[m] + si);
    LayerResult r = algo.run(in);
    LayerRow& row = *g.rows[m];
    row.seconds += r.metrics.seconds;
    *g.weights[m] = std::move(r.output.W);
    if (r.output.quantized) {
      row.bits = step.weight.bits;
      row.scheme = scheme_name(step.weight.scheme);
      row.group_size = layer_group_size(step.weight);
      row.bpw = r.metrics.bits_per_weight;
    }
    *g.codes[m] = std::move(r.output.quantized);
    for (auto& [name, value] : r.output.diagnostics)
      rec.diagnostics.push_back({g.names[m], static_cast<int>(si), step.algorithm, name, value});
  }
}

/// Folds 1/s into the rows of the linear producing g's input (W_p = diag(1/s) W_p, bias / s).
/// Quantized rows keep their codes: row j's grid scales become scale / s_j and the weights
/// dequantize(codes), which is the fold up to float rounding of the product.
void fold_into_producer_rows(InputGroupState& g, const VectorD& s) {
  Matrix& W = *g.producer_rows;
  if (W.rows() != s.size()) throw ShapeError("'" + g.input_name + "': producer rows do not match the scales");
  for (Index j = 0; j < W.rows(); ++j) {
    const float sj = static_cast<float>(s[j]);  // as the norm fold: one float division by float(s_j)
    W.row(j) /= sj;
    if (g.producer_bias && g.producer_bias->size()) (*g.producer_bias)[j] /= sj;
    if (g.producer_codes && *g.producer_codes) (*g.producer_codes)->scales.row(j) /= sj;
  }
  if (g.producer_codes && *g.producer_codes) W = dequantize(**g.producer_codes);
}

void apply_norm_step(const Pipeline& p, std::size_t si, const NormConsumerAlgorithm& algo,
                     InputGroupState& g, RunRecord& rec) {
  const PipelineStep& ps = p.steps()[si];
  const QuantStep& step = ps.config();
  const bool rows = !g.absorbs_scale && g.producer_rows && ps.scales_linear_producers();
  const bool can_scale = g.absorbs_scale || rows;
  // A plugin with a weight grid quantizes every group; a pure scaling plugin only acts where
  // a producer absorbs s.
  const bool quantizes = ps.uses_weight_spec() && step.weight.quantized();
  if ((!can_scale && !quantizes) || !ps.applies_to(g.names.front())) return;
  NormConsumerInput in;
  in.name = g.input_name;
  in.consumer_names = g.names;
  for (Matrix* W : g.weights) in.consumers.push_back(W);
  in.input_stats = g.S;
  if (ps.needs().hessian) in.hessian = g.H;
  if (ps.uses_weight_spec()) in.spec = &step.weight;
  in.can_scale = can_scale;
  // Left on the grid unless a later step quantizes these consumers ([awq, gptq]).
  in.quantize = quantizes;
  for (std::size_t j = si + 1; j < p.steps().size(); ++j)
    if (p.steps()[j].uses_weight_spec() && p.steps()[j].config().weight.quantized() &&
        p.steps()[j].applies_to(g.names.front()))
      in.quantize = false;
  const auto t0 = std::chrono::steady_clock::now();
  ChannelScaleTransform tr = algo.run(in);
  const double dt = seconds_since(t0);
  for (LayerRow* row : g.rows) row->seconds += dt / static_cast<double>(g.rows.size());
  // Fold exactly once (core/model/fold.h): W_i' = W_i diag(s), norm' = norm / s (or the
  // producer's rows / s), so the statistics of x' = x / s are the calibration statistics rescaled.
  if (tr.weights.empty()) {
    fold_channel_scales(g.norm, g.weights, tr.scales);
    for (auto* c : g.codes) c->reset();  // the folded weights are off their grids
  } else {
    if (g.norm) fold_channel_scales(*g.norm, {}, tr.scales);
    for (std::size_t m = 0; m < g.weights.size(); ++m) {
      *g.weights[m] = std::move(tr.weights[m]);
      *g.codes[m] = std::move(tr.quantized[m]);
      if (const auto& q = *g.codes[m]) {
        LayerRow& row = *g.rows[m];
        row.bits = q->spec.bits;
        row.scheme = scheme_name(q->spec.scheme);
        row.group_size = layer_group_size(q->spec);
        row.bpw = bits_per_weight(*q);
      }
    }
  }
  if (rows) fold_into_producer_rows(g, tr.scales);
  const VectorD inv = tr.scales.cwiseInverse();
  g.H->scale_channels(inv);
  g.S->scale_channels(inv);
  *g.scale = g.scale->cwiseProduct(tr.scales);
  for (auto& [name, value] : tr.diagnostics)
    rec.diagnostics.push_back({in.name, static_cast<int>(si), step.algorithm, name, value});
}

/// Block-scope step on a standalone input (validate_pipeline admits only plugins with
/// info.standalone_inputs there): P merged into the consumer, applied online by the workload.
void apply_standalone_step(const Pipeline& p, std::size_t si, const BlockAlgorithm& algo, InputGroupState& g,
                           RunRecord& rec) {
  const PipelineStep& ps = p.steps()[si];
  const std::string& name = g.names.front();
  if (!ps.applies_to(name)) return;
  if (*g.transform)
    throw ShapeError("'" + name + "': a second block-scope transform of its input (compose them in one step)");
  const auto t0 = std::chrono::steady_clock::now();
  StandaloneInput in;
  in.name = name;
  in.width = g.weights.front()->cols();
  in.stream = mix_stream(p.seed(), g.seed_streams.front() + si);
  in.X_calib = g.X_calib;
  for (const Matrix* W : g.weights) in.weights.push_back(W);
  // The quantizers that follow: the first later weight grid, and the activation spec of the
  // first step (this one or later) that sets one for this input.
  for (std::size_t j = si + 1; j < p.steps().size() && !in.weight_spec; ++j)
    if (p.steps()[j].config().weight.bits < 16 && p.steps()[j].applies_to(name))
      in.weight_spec = &p.steps()[j].config().weight;
  for (std::size_t j = si; j < p.steps().size() && !in.act_spec; ++j)
    if (p.steps()[j].config().act.quantized() && p.steps()[j].applies_to(name)) in.act_spec = &p.steps()[j].config().act;
  StandaloneResult res = algo.run_standalone(in);
  auto& t = res.transform;
  if (!t) return;
  if (res.weights.empty())
    for (Matrix* W : g.weights) merge_input_transform(*W, *t);
  else
    for (std::size_t i = 0; i < g.weights.size(); ++i) *g.weights[i] = std::move(res.weights[i]);
  for (auto* c : g.codes) c->reset();
  if (g.act_clip) *g.act_clip = res.act_clip;
  Matrix X = *g.X_calib;
  t->apply(X);
  *g.H = HessianAccumulator(X.cols());
  g.H->add(X);
  *g.S = ChannelStats(X.cols());
  g.S->add(X);
  *g.transform = std::move(t);
  const double dt = seconds_since(t0);
  for (LayerRow* row : g.rows) row->seconds += dt / static_cast<double>(g.rows.size());
  rec.params.push_back({name + ".transform.input", (*g.transform)->describe()});
  rec.diagnostics.push_back({name, static_cast<int>(si), ps.config().algorithm, "seconds", dt});
  for (auto& [key, value] : res.diagnostics)
    rec.diagnostics.push_back({name, static_cast<int>(si), ps.config().algorithm, key, value});
}

}  // namespace

PipelineStep::PipelineStep(const QuantStep& step, const AlgorithmInfo& info)
    : step_(&step),
      plugin_(info.create(step.options)),
      scope_(info.scope),
      needs_(info.needs),
      uses_weight_spec_(info.uses_weight_spec),
      scales_linear_producers_(info.scales_linear_producers) {
  for (auto& r : step.targets) targets_.emplace_back(r);
  for (auto& r : step.ignore) ignore_.emplace_back(r);
}

bool PipelineStep::applies_to(const std::string& layer) const {
  return full_match_any(targets_, layer) && !full_match_any(ignore_, layer);
}

void validate_pipeline(const RunConfig& run, const AlgorithmRegistry& registry) {
  const bool model = run.workload.is_model();
  std::string weight_step;  // the first layer or norm->consumers step so far
  std::string model_step;   // the first model-scope step so far
  for (std::size_t i = 0; i < run.quant.size(); ++i) {
    const QuantStep& step = run.quant[i];
    const std::string path = "quant." + std::to_string(i) + ".algorithm";
    const AlgorithmInfo& info = registry.get(step.algorithm);
    const Scope scope = info.scope;
    // The synthetic suite's layers have no block; a block plugin that transforms a standalone
    // linear's input runs there on each layer's input.
    const bool driven = scope == Scope::Layer || scope == Scope::NormConsumers ||
                        (model && (scope == Scope::Block || scope == Scope::KvCache || scope == Scope::Model)) ||
                        (!model && scope == Scope::Block && info.standalone_inputs);
    if (!driven)
      throw ConfigError(step.loc, path,
                        "algorithm '" + step.algorithm + "' acts at " + scope_name(scope) + " scope, which the " +
                            (model ? "model" : "synthetic layer-suite") + " workload does not drive" +
                            (model ? "" : " (it has no transformer blocks or KV cache)"),
                        run.label);
    // Block transforms define the space the weight steps quantize in, so they come first.
    if (scope == Scope::Block && !weight_step.empty())
      throw ConfigError(step.loc, path,
                        "block-scope step '" + step.algorithm + "' must come before the weight steps ('" + weight_step +
                            "' is earlier): its transforms define the space the weights are quantized in",
                        run.label);
    // A model step acts on the finished block-sequential result: nothing block-sequential after it.
    if (scope != Scope::Model && !model_step.empty())
      throw ConfigError(step.loc, path,
                        scope_name(scope) + std::string("-scope step '") + step.algorithm +
                            "' must come before the model-scope step '" + model_step +
                            "', which acts on the whole model after the block-sequential steps",
                        run.label);
    if (weight_step.empty() && (scope == Scope::Layer || scope == Scope::NormConsumers)) weight_step = step.algorithm;
    if (model_step.empty() && scope == Scope::Model) model_step = step.algorithm;
  }
}

Pipeline::Pipeline(const RunConfig& run, const AlgorithmRegistry& registry)
    : run_(&run), seed_(static_cast<uint64_t>(run.seed)) {
  validate_pipeline(run, registry);
  for (const QuantStep& step : run.quant) {
    const AlgorithmInfo& info = registry.get(step.algorithm);
    identity_ = identity_ && info.identity && !step.act.quantized();
    channel_stats_ = channel_stats_ || info.needs.channel_stats ||
                     (step.act.quantized() && step.act.mode == ActRangeMode::Static) ||
                     step.weight.mse_weights == MseWeights::Imatrix;
    steps_.emplace_back(step, info);
  }
}

void apply_step(const Pipeline& pipeline, std::size_t si, InputGroupState& g, RunRecord& rec) {
  const PipelineStep& ps = pipeline.steps()[si];
  switch (ps.scope()) {
    case Scope::Layer:
      apply_layer_step(pipeline, si, dynamic_cast<const LayerAlgorithm&>(ps.plugin()), g, rec);
      break;
    case Scope::NormConsumers:
      apply_norm_step(pipeline, si, dynamic_cast<const NormConsumerAlgorithm&>(ps.plugin()), g, rec);
      break;
    case Scope::Block:  // a model's blocks: the model runner, before the weight steps
      if (g.transform) apply_standalone_step(pipeline, si, dynamic_cast<const BlockAlgorithm&>(ps.plugin()), g, rec);
      break;
    case Scope::KvCache:  // acts on a block's cache (apply_kv_step), not on linear inputs
    case Scope::Model:    // acts on the whole model after every block (apply_model_step)
      break;
  }
  if (ps.config().act.quantized())
    for (std::size_t m = 0; m < g.names.size(); ++m)
      if (ps.applies_to(g.names[m])) *g.act[m] = &ps.config().act;
}

void Pipeline::check_heads(const HeadLayout& heads) const {
  for (std::size_t i = 0; i < steps_.size(); ++i) {
    if (steps_[i].scope() != Scope::KvCache) continue;
    try {
      dynamic_cast<const KvCacheAlgorithm&>(steps_[i].plugin()).check_heads(heads);
    } catch (const ConfigError& e) {
      throw ConfigError(steps_[i].config().loc, "quant." + std::to_string(i) + "." + e.key_path(),
                        e.detail(), run_->label);
    }
  }
}

void apply_kv_step(const Pipeline& pipeline, std::size_t si, const KvCacheInput& in, int64_t eval_len,
                   std::shared_ptr<const KvQuantizer>& slot, RunRecord& rec) {
  const PipelineStep& ps = pipeline.steps()[si];
  if (!ps.applies_to(in.name)) return;
  const auto& ka = dynamic_cast<const KvCacheAlgorithm&>(ps.plugin());
  KvCacheResult r = ka.run(in);
  slot = std::move(r.quantizer);
  if (slot) rec.params.push_back({in.name + ".kv_cache", slot->describe()});
  const std::string& alg = ps.config().algorithm;
  for (auto& [name, value] : r.diagnostics) rec.diagnostics.push_back({in.name, static_cast<int>(si), alg, name, value});
  rec.diagnostics.push_back({in.name, static_cast<int>(si), alg, "kv_bits",
                             slot ? slot->kv_bits(eval_len, in.heads.kv_dim()) : 16.0});
  rec.diagnostics.push_back({in.name, static_cast<int>(si), alg, "seconds", r.seconds});
}

ModelResult apply_model_step(const Pipeline& pipeline, std::size_t si, ModelInput& in, RunRecord& rec) {
  const PipelineStep& ps = pipeline.steps()[si];
  ModelResult r;
  if (ps.scope() != Scope::Model || !ps.applies_to(in.name)) return r;
  in.seed = mix_stream(pipeline.seed(), (uint64_t{1} << 40) + si);
  r = dynamic_cast<const ModelAlgorithm&>(ps.plugin()).run(in);
  const std::string& alg = ps.config().algorithm;
  for (auto& [name, value] : r.diagnostics) rec.diagnostics.push_back({in.name, static_cast<int>(si), alg, name, value});
  for (const TrainingPoint& p : r.trace)
    rec.training.push_back({static_cast<int>(si), alg, p.step, p.forwards, p.backwards, p.train_loss, p.heldout_loss,
                            p.grad_cosine, p.grad_norm_ratio, p.lr, p.seconds});
  rec.diagnostics.push_back({in.name, static_cast<int>(si), alg, "seconds", r.seconds});
  return r;
}

LayerRow initial_layer_row(const RunConfig& run, const std::string& name) {
  LayerRow row;
  row.layer = name;
  row.algorithm = run.pipeline_name();
  row.scheme = "none";
  return row;
}

}  // namespace ql
