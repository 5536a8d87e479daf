#include "algorithms/algorithm.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/error.h"
#include "core/metrics.h"

namespace ql {

const char* scope_name(Scope s) {
  switch (s) {
    case Scope::Layer: return "layer";
    case Scope::NormConsumers: return "norm-consumers";
    case Scope::Block: return "block";
    case Scope::Model: return "model";
    case Scope::KvCache: return "kv-cache";
  }
  return "?";
}

namespace {

bool all_finite(const Matrix& m) { return m.allFinite(); }

}  // namespace

LayerResult LayerAlgorithm::run(const LayerInput& in) const {
  if (!in.W || in.W->size() == 0)
    throw ShapeError("layer '" + in.name + "': empty weight matrix");
  const Matrix& W = *in.W;
  if (!all_finite(W)) throw NumericError("layer '" + in.name + "': weights contain NaN or Inf");
  if (in.hessian && in.hessian->dim() != W.cols())
    throw ShapeError("layer '" + in.name + "': Hessian is " + std::to_string(in.hessian->dim()) +
                     "x" + std::to_string(in.hessian->dim()) + " but d_in = " +
                     std::to_string(W.cols()));
  if (in.channels && in.channels->dim() != W.cols())
    throw ShapeError("layer '" + in.name + "': channel statistics have " +
                     std::to_string(in.channels->dim()) + " channels but d_in = " +
                     std::to_string(W.cols()));

  auto t0 = std::chrono::steady_clock::now();
  LayerResult r;
  r.output = quantize_layer(in);
  r.metrics.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  const Matrix& Wq = r.output.W;
  if (Wq.rows() != W.rows() || Wq.cols() != W.cols())
    throw ShapeError("layer '" + in.name + "': plugin returned " + std::to_string(Wq.rows()) +
                     "x" + std::to_string(Wq.cols()) + " weights for a " +
                     std::to_string(W.rows()) + "x" + std::to_string(W.cols()) + " layer");
  if (!all_finite(Wq))
    throw NumericError("layer '" + in.name + "': quantized weights contain NaN or Inf");

  if (r.output.quantized) {
    const QuantizedTensor& q = *r.output.quantized;
    if (q.rows() != W.rows() || q.cols() != W.cols())
      throw ShapeError("layer '" + in.name + "': codes have the wrong shape");
    const int lo = q.spec.qmin(), hi = q.spec.qmax();
    if (q.codes.minCoeff() < lo || q.codes.maxCoeff() > hi)
      throw NumericError("layer '" + in.name + "': codes outside [" + std::to_string(lo) + ", " +
                         std::to_string(hi) + "]");
    // The weights handed downstream must be exactly what the stored codes reconstruct;
    // otherwise the reported bits per weight would describe a different model.
    if (dequantize(q) != Wq)
      throw NumericError("layer '" + in.name + "': weights differ from dequantize(codes)");
    r.metrics.bits_per_weight = bits_per_weight(q);  // counts a stored g_idx
  } else if (in.spec.quantized()) {
    throw NumericError("layer '" + in.name + "': a " + std::to_string(in.spec.bits) +
                       "-bit step returned no codes");
  } else {
    r.metrics.bits_per_weight = 16.0;
  }

  r.metrics.weight_mse = weight_mse(W, Wq);
  r.metrics.sqnr_db = sqnr_db(W, Wq);
  r.metrics.rel_output_error_h = in.hessian
                                     ? relative_output_error(W, Wq, in.hessian->hessian())
                                     : std::numeric_limits<double>::quiet_NaN();
  return r;
}

TokenImportance LayerAlgorithm::compute_token_importance(const TokenImportanceInput& in) const {
  throw Error("'" + in.name + "': this plugin does not weigh calibration tokens");
}

TokenImportance LayerAlgorithm::token_importance(const TokenImportanceInput& in) const {
  if (!in.inputs || !in.targets || in.inputs->size() != in.targets->size() || in.inputs->empty() ||
      !((in.weights && in.config) || in.linear))
    throw ShapeError("'" + in.name + "': token importance needs the block or linear, its calibration inputs and FP outputs");
  for (std::size_t w = 0; w < in.inputs->size(); ++w) {
    const Matrix &x = (*in.inputs)[w], &y = (*in.targets)[w];
    const bool ok = in.linear ? x.cols() == in.linear->cols() && y.cols() == in.linear->rows() : x.cols() == y.cols();
    if (x.rows() != y.rows() || !ok)
      throw ShapeError("'" + in.name + "': window " + std::to_string(w) + " has inputs and targets of other shapes");
  }
  TokenImportance r = compute_token_importance(in);
  if (r.weights.size() != in.inputs->size())
    throw ShapeError("'" + in.name + "': " + std::to_string(r.weights.size()) + " importance vectors for " +
                     std::to_string(in.inputs->size()) + " windows");
  double total = 0;
  for (std::size_t w = 0; w < r.weights.size(); ++w) {
    if (r.weights[w].size() != (*in.inputs)[w].rows())
      throw ShapeError("'" + in.name + "': window " + std::to_string(w) + " has a wrong number of token weights");
    for (Index t = 0; t < r.weights[w].size(); ++t) {
      const float g = r.weights[w][t];
      if (!(g >= 0.0f) || !std::isfinite(g))
        throw NumericError("'" + in.name + "': token weight " + std::to_string(t) + " of window " +
                           std::to_string(w) + " is not finite and >= 0");
      total += g;
    }
  }
  if (!(total > 0)) throw NumericError("'" + in.name + "': every token weight is 0");
  return r;
}

ChannelScaleTransform NormConsumerAlgorithm::run(const NormConsumerInput& in) const {
  if (in.consumers.empty()) throw ShapeError("'" + in.name + "': no consumer linears");
  const Index d = in.consumers.front()->cols();
  for (std::size_t i = 0; i < in.consumers.size(); ++i)
    if (in.consumers[i]->cols() != d)
      throw ShapeError("'" + in.name + "': consumers read inputs of different widths");
  if (in.input_stats && in.input_stats->dim() != d)
    throw ShapeError("'" + in.name + "': input statistics do not match the consumers' d_in");
  if (in.hessian && in.hessian->dim() != d)
    throw ShapeError("'" + in.name + "': input Hessian does not match the consumers' d_in");
  ChannelScaleTransform t = compute_transform(in);
  if (t.scales.size() != d)
    throw ShapeError("'" + in.name + "': transform has " + std::to_string(t.scales.size()) +
                     " scales for " + std::to_string(d) + " channels");
  for (Index j = 0; j < d; ++j)
    if (!(t.scales[j] > 0) || !std::isfinite(t.scales[j]) || (!in.can_scale && t.scales[j] != 1.0))
      throw NumericError("'" + in.name + "': channel scale " + std::to_string(j) +
                         (in.can_scale ? " is not positive and finite" : " is not 1 on an input nothing absorbs"));
  if (t.weights.empty()) return t;
  if (t.weights.size() != in.consumers.size() || t.quantized.size() != in.consumers.size())
    throw ShapeError("'" + in.name + "': plugin returned " + std::to_string(t.weights.size()) + " weights / " +
                     std::to_string(t.quantized.size()) + " codes for " + std::to_string(in.consumers.size()) +
                     " consumers");
  for (std::size_t i = 0; i < t.weights.size(); ++i) {
    const std::string who = "'" + (i < in.consumer_names.size() ? in.consumer_names[i] : in.name) + "'";
    const Matrix& W = t.weights[i];
    if (W.rows() != in.consumers[i]->rows() || W.cols() != d)
      throw ShapeError(who + ": plugin returned weights of the wrong shape");
    if (!all_finite(W)) throw NumericError(who + ": returned weights contain NaN or Inf");
    if (const auto& q = t.quantized[i]) {
      if (q->rows() != W.rows() || q->cols() != W.cols() || q->codes.minCoeff() < q->spec.qmin() ||
          q->codes.maxCoeff() > q->spec.qmax() || dequantize(*q) != W)
        throw NumericError(who + ": codes out of range or not reconstructing the returned weights");
    }
  }
  return t;
}

std::size_t kv_heldout_window(std::size_t n) { return n > 1 ? n - std::max<std::size_t>(1, n / 4) : 0; }

Index kv_window_rows(const std::vector<Index>& window_rows, std::size_t windows) {
  Index r = 0;
  for (std::size_t w = 0; w < windows && w < window_rows.size(); ++w) r += window_rows[w];
  return r;
}

KvCacheResult KvCacheAlgorithm::run(const KvCacheInput& in) const {
  const Index kvd = in.heads.kv_dim();
  if (kvd <= 0) throw ShapeError("'" + in.name + "': empty KV width");
  for (const Matrix* m : {in.keys_pre_rope, in.keys_post_rope, in.values})
    if (m && m->cols() != kvd)
      throw ShapeError("'" + in.name + "': calibration K/V of width " + std::to_string(m->cols()) +
                       ", the block's KV width is " + std::to_string(kvd));
  const auto t0 = std::chrono::steady_clock::now();
  KvCacheResult r;
  r.quantizer = fit_quantizer(in, r.diagnostics);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!r.quantizer) return r;
  const KvQuantizer& q = *r.quantizer;
  if (q.key_chunk() < 1 || q.value_chunk() < 1 || q.residual_length() < 0)
    throw ShapeError("'" + in.name + "': KV quantizer with chunks " + std::to_string(q.key_chunk()) + "/" +
                     std::to_string(q.value_chunk()) + " and residual " + std::to_string(q.residual_length()));
  for (KvKind kind : {KvKind::Key, KvKind::Value}) {
    const Index rows = kind == KvKind::Key ? q.key_chunk() : q.value_chunk();
    Matrix probe = Matrix::Ones(rows, kvd), out;
    q.decode(q.encode(kind, probe), out);
    if (out.rows() != rows || out.cols() != kvd || !out.allFinite())
      throw NumericError("'" + in.name + "': the KV quantizer does not round-trip a chunk of the block's width");
  }
  r.diagnostics.emplace_back("kv_bits_per_element_k", q.bits_per_element(KvKind::Key, kvd));
  r.diagnostics.emplace_back("kv_bits_per_element_v", q.bits_per_element(KvKind::Value, kvd));
  if (in.keys_pre_rope && in.keys_post_rope && in.values && in.queries && !in.window_rows.empty()) {
    const HeadLayout& hl = in.heads;
    const KvErrorStats e = measure_kv_error(q, hl.num_heads, hl.num_kv_heads, hl.head_dim, in.rope.rope,
                                            *in.keys_pre_rope, *in.keys_post_rope, *in.values, *in.queries,
                                            in.window_rows, kv_heldout_window(in.window_rows.size()), 8);
    r.diagnostics.emplace_back("key_rel_mse", e.key_rel_mse);
    r.diagnostics.emplace_back("value_rel_mse", e.value_rel_mse);
    r.diagnostics.emplace_back("attn_score_rel_err", e.attn_score_rel_err);
    r.diagnostics.emplace_back("attn_top8_agreement", e.attn_topk_agreement);
  }
  return r;
}

BlockResult BlockAlgorithm::run(const BlockInput& in) const {
  if (!in.arch || !in.weights || !in.config) throw ShapeError("'" + in.name + "': block input without weights");
  for (int k = 0; k < kLinearKinds; ++k)
    if (!in.weights->linear(static_cast<LinearKind>(k)).W.allFinite())
      throw NumericError("'" + in.name + "': " + linear_suffix(static_cast<LinearKind>(k)) + " weights are not finite");
  if (static_cast<bool>(in.inputs) != static_cast<bool>(in.targets) ||
      (in.inputs && in.inputs->size() != in.targets->size()))
    throw ShapeError("'" + in.name + "': block inputs and targets must come together, one per window");
  for (std::size_t w = 0; in.inputs && w < in.inputs->size(); ++w) {
    const Matrix &x = (*in.inputs)[w], &y = (*in.targets)[w];
    if (x.cols() != in.config->hidden_size || y.rows() != x.rows() || y.cols() != x.cols())
      throw ShapeError("'" + in.name + "': window " + std::to_string(w) + " has inputs " + std::to_string(x.rows()) +
                       "x" + std::to_string(x.cols()) + " and targets " + std::to_string(y.rows()) + "x" +
                       std::to_string(y.cols()) + ", expected T x " + std::to_string(in.config->hidden_size) + " both");
  }
  const auto t0 = std::chrono::steady_clock::now();
  BlockResult r;
  r.transforms = compute_transforms(in, r.diagnostics);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (int s = 0; s < kTransformSlots; ++s) {
    const auto& t = r.transforms.slot[s];
    if (!t) continue;
    const std::string slot = in.arch->transform_slots()[s].name;
    const Index width = in.arch->slot_width(static_cast<TransformSlot>(s));
    if (t->width() != width)
      throw ShapeError("'" + in.name + "': a " + t->describe() + " for slot " + slot + " of width " +
                       std::to_string(width));
    const double e = t->inverse_error();
    if (!(e < 1e-6))
      throw NumericError("'" + in.name + "': the inverse of the " + slot + " transform is off by " + std::to_string(e));
    r.diagnostics.emplace_back(slot + "_inverse_error", e);
  }
  return r;
}

std::shared_ptr<const InputTransform> BlockAlgorithm::standalone_transform(Index, uint64_t) const {
  throw Error("this block-scope plugin transforms only the slots of a transformer block");
}

StandaloneResult BlockAlgorithm::fit_standalone(const StandaloneInput& in) const {
  StandaloneResult r;
  r.transform = standalone_transform(in.width, in.stream);
  return r;
}

StandaloneResult BlockAlgorithm::run_standalone(const StandaloneInput& in) const {
  const std::string& name = in.name;
  if (in.width < 1) throw ShapeError("'" + name + "': an input of " + std::to_string(in.width) + " channels");
  if (in.X_calib && in.X_calib->cols() != in.width)
    throw ShapeError("'" + name + "': calibration inputs of width " + std::to_string(in.X_calib->cols()) +
                     " for an input of " + std::to_string(in.width));
  StandaloneResult r = fit_standalone(in);
  const auto& t = r.transform;
  if (t) {
    if (t->width() != in.width)
      throw ShapeError("'" + name + "': a " + t->describe() + " for an input of width " + std::to_string(in.width));
    const double e = t->inverse_error();
    if (!(e < 1e-6))
      throw NumericError("'" + name + "': the inverse of the input transform is off by " + std::to_string(e));
  }
  if (!r.weights.empty()) {
    if (r.weights.size() != in.weights.size())
      throw ShapeError("'" + name + "': " + std::to_string(r.weights.size()) + " replacement weights for " +
                       std::to_string(in.weights.size()) + " consumers");
    for (std::size_t i = 0; i < r.weights.size(); ++i)
      if (r.weights[i].rows() != in.weights[i]->rows() || r.weights[i].cols() != in.width ||
          !r.weights[i].allFinite())
        throw NumericError("'" + name + "': replacement weight " + std::to_string(i) +
                           " has the wrong shape or a non-finite value");
  }
  if (!(r.act_clip.lo > 0 && r.act_clip.lo <= 1 && r.act_clip.hi > 0 && r.act_clip.hi <= 1))
    throw NumericError("'" + name + "': learned activation clip ratios outside (0, 1]");
  return r;
}

ModelResult ModelAlgorithm::run(ModelInput& in) const {
  if (!in.model) throw ShapeError("'" + in.name + "': model input without a model");
  if (!in.windows || in.windows->empty()) throw ShapeError("'" + in.name + "': no calibration windows");
  const int vocab = in.model->config().vocab_size;
  for (std::size_t w = 0; w < in.windows->size(); ++w)
    for (int32_t id : (*in.windows)[w])
      if (id < 0 || id >= vocab)
        throw ShapeError("'" + in.name + "': calibration window " + std::to_string(w) + " holds token id " +
                         std::to_string(id) + ", outside the vocabulary of " + std::to_string(vocab));
  const auto t0 = std::chrono::steady_clock::now();
  ModelResult r;
  process_model(in, r);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (int b = 0; b < in.model->num_blocks(); ++b)
    for (int k = 0; k < kLinearKinds; ++k) {
      const LinearKind kind = static_cast<LinearKind>(k);
      const Matrix& W = in.model->block(b).linear(kind).W;
      if (!W.allFinite()) throw NumericError("'" + in.name + "': " + linear_name(b, kind) + " weights are not finite");
      const auto& codes = in.model->codes(b, kind);
      if (!codes) continue;
      const Matrix deq = dequantize(*codes);
      if (deq.rows() != W.rows() || deq.cols() != W.cols() ||
          std::memcmp(deq.data(), W.data(), sizeof(float) * static_cast<std::size_t>(W.size())) != 0)
        throw NumericError("'" + in.name + "': the codes of " + linear_name(b, kind) +
                           " no longer reproduce its weights (set or clear them with the weights)");
    }
  return r;
}

const std::vector<std::string>& common_step_keys() {
  static const std::vector<std::string> keys = {
      "algorithm", "bits", "scheme", "granularity", "group_size", "range", "percentile",
      "mse_grid", "mse_maxshrink", "mse_norm", "scale_dtype", "act", "targets", "ignore"};
  return keys;
}

void AlgorithmRegistry::add(AlgorithmInfo info) {
  if (contains(info.name)) throw Error("algorithm '" + info.name + "' registered twice");
  if (!info.make) throw Error("algorithm '" + info.name + "' has no factory");
  if (info.options)
    for (const std::string& k : info.options->keys())
      for (const std::string& c : common_step_keys())
        if (k == c)
          throw Error("algorithm '" + info.name + "': option '" + k +
                      "' collides with a common quant-step key");
  infos_.push_back(std::move(info));
}

bool AlgorithmRegistry::contains(const std::string& name) const {
  for (auto& i : infos_)
    if (i.name == name) return true;
  return false;
}

const AlgorithmInfo& AlgorithmRegistry::get(const std::string& name) const {
  for (auto& i : infos_)
    if (i.name == name) return i;
  std::string known;
  for (auto& i : infos_) known += (known.empty() ? "" : ", ") + i.name;
  throw Error("unknown algorithm '" + name + "'; known: " + known);
}

std::vector<std::string> AlgorithmRegistry::names() const {
  std::vector<std::string> n;
  for (auto& i : infos_) n.push_back(i.name);
  return n;
}

std::unique_ptr<Algorithm> AlgorithmInfo::create(const std::any& options) const {
  const std::any opts = options.has_value() ? options : this->options->defaults();
  if (opts.type() != this->options->defaults().type())
    throw Error("algorithm '" + name + "': options of type " + opts.type().name() + ", expected " +
                this->options->defaults().type().name());
  return make(opts);
}

const AlgorithmRegistry& default_registry() {
  static const AlgorithmRegistry registry = [] {
    AlgorithmRegistry r;
    register_all(r);
    return r;
  }();
  return registry;
}

}  // namespace ql
