#include "algorithms/awq/awq.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>

#include "algorithms/algorithm.h"
#include "core/detmath.h"
#include "core/error.h"
#include "core/metrics.h"
#include "core/quantize.h"

namespace ql {
namespace {

/// The reference's floor on s before normalisation (auto_scale.py: scales.clamp(min=1e-4)).
constexpr double kScaleFloor = 1e-4;

struct AwqOptions {
  bool auto_alpha = true;
  double alpha = 0.5;  ///< with auto_alpha false
  std::vector<double> alpha_grid = default_grid();
  bool clip = true;
  int clip_grid = 20;
  double clip_max_shrink = 0.5;
  bool clip_qk = false;

  static std::vector<double> default_grid() {
    std::vector<double> g;
    for (int i = 0; i < 20; ++i) g.push_back(i / 20.0);
    return g;
  }
};

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

Matrix scaled_columns(const Matrix& W, const VectorD& s) {
  Matrix out = W;
  out.array().rowwise() *= s.cast<float>().transpose().array();
  return out;
}

/// E(s) of the header: Σ_i tr(ΔW_i H ΔW_iᵀ) with ΔW_i = Q(W_i diag(s)) diag(1/s) − W_i.
double scaled_error(const std::vector<const Matrix*>& consumers, const Matrix& H, const VectorD& s,
                    const QuantSpec& spec) {
  const Vector sf = s.cast<float>();
  double e = 0;
  for (const Matrix* W : consumers) {
    Matrix dW = fake_quant(scaled_columns(*W, s), spec);
    dW.array().rowwise() /= sf.transpose().array();
    dW -= *W;
    e += output_error(dW, H);
  }
  return e;
}

class Awq final : public NormConsumerAlgorithm {
 public:
  explicit Awq(AwqOptions o) : opt_(std::move(o)) {}

 private:
  AwqOptions opt_;

  /// Step 1: the α minimising E, or the fixed α; s = 1 where nothing absorbs a scale.
  VectorD search_scales(const NormConsumerInput& in, const Matrix& H, Diagnostics& diag) const {
    const Index d = H.rows();
    const double rtn_error = scaled_error(in.consumers, H, VectorD::Ones(d), *in.spec);
    VectorD best = VectorD::Ones(d);
    double best_alpha = 0, best_error = rtn_error;
    if (in.can_scale) {
      const VectorD mean_abs = in.input_stats->mean_abs();
      best_error = std::numeric_limits<double>::infinity();
      const std::vector<double> grid = opt_.auto_alpha ? opt_.alpha_grid : std::vector<double>{opt_.alpha};
      for (double a : grid) {
        VectorD s = awq_scales(mean_abs, a);
        const double e = s.isOnes() ? rtn_error : scaled_error(in.consumers, H, s, *in.spec);
        if (e < best_error) {  // strict: ties keep the earliest grid entry
          best_error = e;
          best_alpha = a;
          best = std::move(s);
        }
      }
      if (!std::isfinite(best_error))
        throw NumericError("'" + in.name + "': awq scale search gave no finite output error");
    }
    diag.push_back({"alpha", best_alpha});
    diag.push_back({"scale_error", best_error});
    diag.push_back({"scale_error_rtn", rtn_error});
    diag.push_back({"max_scale", best.maxCoeff()});
    diag.push_back({"min_scale", best.minCoeff()});
    return best;
  }

  ChannelScaleTransform compute_transform(const NormConsumerInput& in) const override {
    if (!in.spec || !in.spec->quantized())
      throw Error("'" + in.name + "': awq searches scales and clipping for a weight grid; set bits below 16");
    if (!in.hessian || !in.input_stats || in.hessian->count() == 0)
      throw Error("'" + in.name + "': awq needs the calibration inputs of the shared input (Hessian and channel means)");
    for (std::size_t i = 0; i < in.consumers.size(); ++i)
      if (!in.consumers[i]->allFinite())
        throw NumericError("'" + in.consumer_names.at(i) + "': weights contain NaN or Inf");
    const Matrix H = in.hessian->hessian();
    ChannelScaleTransform t;
    t.scales = search_scales(in, H, t.diagnostics);

    // H' = diag(1/s) H diag(1/s): the second moment of x' = x / s, which the scaled weights read.
    const Vector inv = t.scales.cwiseInverse().cast<float>();
    const Matrix Hs = inv.asDiagonal() * H * inv.asDiagonal();
    double before = 0, after = 0, ratio_sum = 0;
    Index clipped = 0;
    for (std::size_t i = 0; i < in.consumers.size(); ++i) {
      Matrix W = scaled_columns(*in.consumers[i], t.scales);
      const std::string& name = in.consumer_names.at(i);
      const bool qk = ends_with(name, "q_proj") || ends_with(name, "k_proj");
      if (opt_.clip && (opt_.clip_qk || !qk) && in.spec->granularity != Granularity::PerTensor) {
        Matrix ratios;
        double b = 0, a = 0;
        W = awq_clip(W, Hs, *in.spec, opt_.clip_grid, opt_.clip_max_shrink, &ratios, &b, &a);
        before += b;
        after += a;
        ratio_sum += ratios.cast<double>().sum();
        clipped += ratios.size();
      }
      if (in.quantize) {
        QuantizedTensor q = quantize(W, *in.spec);
        t.weights.push_back(dequantize(q));
        t.quantized.emplace_back(std::move(q));
      } else {
        t.weights.push_back(std::move(W));
        t.quantized.emplace_back(std::nullopt);
      }
    }
    if (clipped) {
      t.diagnostics.push_back({"clip_mean_ratio", ratio_sum / static_cast<double>(clipped)});
      t.diagnostics.push_back({"clip_error_before", before});
      t.diagnostics.push_back({"clip_error_after", after});
    }
    t.diagnostics.push_back({"clipped_groups", static_cast<double>(clipped)});
    return t;
  }
};

std::shared_ptr<OptionSchema<AwqOptions>> make_schema() {
  auto s = std::make_shared<OptionSchema<AwqOptions>>();
  s->add_custom(
      "alpha", "auto | float in [0, 1]",
      "exponent α of s = mean|x|^α; auto: the α of alpha_grid minimising the consumers' output error",
      [](AwqOptions& o, const ConfigNode& n, const std::string& p) {
        const std::optional<double> a = read_auto_or_double(n, p, 0.0, 1.0);
        o.auto_alpha = !a;
        if (a) o.alpha = *a;
      },
      [](const AwqOptions& o) { return ConfigNode::scalar(o.auto_alpha ? "auto" : format_double(o.alpha)); });
  s->add_custom(
      "alpha_grid", "list of floats in [0, 1]", "candidate α for alpha: auto (default 0, 0.05, ..., 0.95)",
      [](AwqOptions& o, const ConfigNode& n, const std::string& p) { o.alpha_grid = read_double_list(n, p, 0.0, 1.0); },
      [](const AwqOptions& o) { return double_list_node(o.alpha_grid); });
  s->add("clip", &AwqOptions::clip, "search a max-shrink ratio per output row and weight group (auto_clip)");
  s->add("clip_grid", &AwqOptions::clip_grid, "clip ratios are 1 - i/clip_grid", {2, 1000});
  s->add("clip_max_shrink", &AwqOptions::clip_max_shrink,
         "i runs below clip_max_shrink * clip_grid (0.5: ratios down to 0.55 with clip_grid 20)", {1e-9, 1 - 1e-9});
  s->add("clip_qk", &AwqOptions::clip_qk, "also clip q_proj and k_proj (the reference does not)");
  s->validator([](const AwqOptions& o, const ConfigNode& map, const std::string& path) {
    if (!o.auto_alpha && map.find("alpha_grid"))
      throw ConfigError(map.key_loc("alpha_grid"), join_path(path, "alpha_grid"),
                        "'alpha_grid' is only used with alpha: auto; remove it or set alpha: auto");
    if (!o.clip)
      for (const char* key : {"clip_grid", "clip_max_shrink", "clip_qk"})
        if (map.find(key))
          throw ConfigError(map.key_loc(key), join_path(path, key),
                            std::string("'") + key + "' is only used with clip: true");
  });
  return s;
}

}  // namespace

VectorD awq_scales(const VectorD& mean_abs, double alpha) {
  if (!(alpha >= 0.0 && alpha <= 1.0)) throw NumericError("awq: alpha outside [0, 1]");
  const Index d = mean_abs.size();
  VectorD s(d);
  for (Index j = 0; j < d; ++j) {
    if (!(mean_abs[j] >= 0) || !std::isfinite(mean_abs[j]))
      throw NumericError("awq: channel " + std::to_string(j) + " has a negative or non-finite mean |x|");
    s[j] = std::max(detmath::pow(mean_abs[j], alpha), kScaleFloor);
  }
  if (d == 0) return s;
  const double norm = std::sqrt(s.maxCoeff() * s.minCoeff());
  for (Index j = 0; j < d; ++j) s[j] = static_cast<double>(static_cast<float>(s[j] / norm));
  return s;
}

Matrix awq_clip(const Matrix& W, const Matrix& H, const QuantSpec& spec, int grid, double max_shrink,
                Matrix* ratios, double* error_before, double* error_after) {
  const Index rows = W.rows(), d = W.cols();
  if (H.rows() != d || H.cols() != d) throw ShapeError("awq_clip: H does not match the weights' width");
  if (grid < 2 || !(max_shrink > 0 && max_shrink < 1)) throw NumericError("awq_clip: bad clip grid");
  Matrix out = W;
  if (spec.granularity == Granularity::PerTensor || !spec.quantized()) {
    if (ratios) *ratios = Matrix();
    if (error_before) *error_before = 0;
    if (error_after) *error_after = 0;
    return out;
  }
  const Index gs = spec.granularity == Granularity::PerGroup ? std::min<Index>(spec.group_size, d) : d;
  const Index groups = (d + gs - 1) / gs;
  const int steps = static_cast<int>(max_shrink * grid);  // the reference's int(max_shrink * n_grid)
  Matrix best_ratio(rows, groups);
  MatrixD err0(rows, groups), err1(rows, groups);
  // Rows are independent and each (row, group) is searched serially: thread-count independent.
#pragma omp parallel for schedule(static)
  for (Index r = 0; r < rows; ++r) {
    std::vector<float> clamped, xhat;
    for (Index g = 0; g < groups; ++g) {
      const Index c0 = g * gs, n = std::min(gs, d - c0);
      const float* w = W.data() + r * d + c0;
      float wmax = 0;
      for (Index k = 0; k < n; ++k) wmax = std::max(wmax, std::abs(w[k]));
      const auto Hgg = H.block(c0, c0, n, n);
      double best = std::numeric_limits<double>::infinity();
      clamped.assign(n, 0.0f);
      xhat.assign(n, 0.0f);
      for (int i = 0; i < std::max(steps, 1); ++i) {
        const float ratio = static_cast<float>(1.0 - static_cast<double>(i) / grid);
        const float m = wmax * ratio;
        for (Index k = 0; k < n; ++k) clamped[k] = std::clamp(w[k], -m, m);
        const Grid q = fit_grid(clamped.data(), n, 1, spec);
        quantize_with_grid(clamped.data(), n, 1, q, nullptr, xhat.data(), 1);
        double e = 0;  // Δw H_gg Δwᵀ, Δw = Q(clamp(w)) − w
        for (Index a = 0; a < n; ++a) {
          double row = 0;
          for (Index b = 0; b < n; ++b) row += static_cast<double>(Hgg(a, b)) * (xhat[b] - w[b]);
          e += (xhat[a] - w[a]) * row;
        }
        if (i == 0) err0(r, g) = e;
        if (e < best) {  // strict: ties keep the larger ratio
          best = e;
          best_ratio(r, g) = ratio;
          for (Index k = 0; k < n; ++k) out(r, c0 + k) = clamped[k];
        }
      }
      err1(r, g) = best;
    }
  }
  if (ratios) *ratios = best_ratio;
  if (error_before) *error_before = err0.sum();
  if (error_after) *error_after = err1.sum();
  return out;
}

void register_awq(AlgorithmRegistry& registry) {
  AlgorithmInfo info;
  info.name = "awq";
  info.scope = Scope::NormConsumers;
  info.summary =
      "activation-aware scales s = mean|x|^α searched per shared input (folded into norms / up rows), "
      "per-group clip search, then RTN on the step's grid (or a later step's, e.g. [awq, gptq])";
  info.paper = "AWQ: Activation-aware Weight Quantization for On-Device LLM Compression and Acceleration, arXiv 2306.00978";
  info.uses_weight_spec = true;
  info.scales_linear_producers = true;
  info.needs.hessian = true;
  info.needs.channel_stats = true;
  info.options = make_schema();
  info.make = [](const std::any& o) { return std::make_unique<Awq>(std::any_cast<const AwqOptions&>(o)); };
  registry.add(std::move(info));
}

}  // namespace ql
