#include "algorithms/smoothquant/smoothquant.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>

#include "core/detmath.h"
#include "algorithms/algorithm.h"
#include "core/error.h"

namespace ql {
namespace {

/// The reference's floor on both maxima (gptq_smoothquant.json "smoothquant_settings"): keeps s
/// finite for dead channels and all-zero weight columns.
constexpr double kMaxClamp = 1e-5;

struct SmoothQuantOptions {
  double alpha = 0.5;
  bool auto_alpha = false;
  std::vector<double> alpha_grid = default_grid();
  int auto_wbits = 8;
  int auto_abits = 8;

  static std::vector<double> default_grid() {
    std::vector<double> g;
    for (int i = 0; i <= 20; ++i) g.push_back(i / 20.0);
    return g;
  }
};

/// max/median over channels; the median of an even count is the mean of the middle two.
double outlier_ratio(const VectorD& v) {
  std::vector<double> x(v.data(), v.data() + v.size());
  std::sort(x.begin(), x.end());
  const std::size_t n = x.size();
  const double median = n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
  return x.back() / median;
}

VectorD clamped(const Vector& v) {
  return v.cast<double>().cwiseMax(kMaxClamp);
}

class SmoothQuant final : public NormConsumerAlgorithm {
 public:
  explicit SmoothQuant(SmoothQuantOptions o) : opt_(std::move(o)) {}

 private:
  SmoothQuantOptions opt_;

  ChannelScaleTransform compute_transform(const NormConsumerInput& in) const override {
    if (!in.input_stats)
      throw Error("'" + in.name + "': smoothquant needs calibration statistics of the shared input");
    const SmoothQuantOptions& opt = opt_;
    for (std::size_t i = 0; i < in.consumers.size(); ++i)
      if (!in.consumers[i]->allFinite())
        throw NumericError("'" + in.name + "': weights of " +
                           (i < in.consumer_names.size() ? in.consumer_names[i] : "a consumer") +
                           " contain NaN or Inf");
    const Vector& a = in.input_stats->absmax();
    const Vector w = consumer_column_absmax(in.consumers);

    ChannelScaleTransform t;
    double alpha = opt.alpha;
    double best_err = 0, unsmoothed_err = 0;
    if (opt.auto_alpha) {
      const VectorD msq = in.input_stats->mean_sq();
      best_err = std::numeric_limits<double>::infinity();
      for (double cand : opt.alpha_grid) {
        VectorD s = smoothquant_scales(a, w, cand);
        const double e =
            smoothquant_proxy_error(in.consumers, a, msq, s, opt.auto_wbits, opt.auto_abits);
        if (e < best_err) {  // strict: ties keep the earliest grid entry
          best_err = e;
          alpha = cand;
          t.scales = std::move(s);
        }
      }
      if (t.scales.size() == 0)  // every candidate gave NaN: report it through run()'s check
        t.scales = smoothquant_scales(a, w, opt.alpha_grid.front());
      unsmoothed_err = smoothquant_proxy_error(in.consumers, a, msq, VectorD::Ones(a.size()),
                                               opt.auto_wbits, opt.auto_abits);
    } else {
      t.scales = smoothquant_scales(a, w, alpha);
    }

    const VectorD ac = clamped(a), wc = clamped(w);
    t.diagnostics = {
        {"alpha", alpha},
        {"max_scale", t.scales.maxCoeff()},
        {"min_scale", t.scales.minCoeff()},
        {"act_outlier_ratio_before", outlier_ratio(ac)},
        {"act_outlier_ratio_after", outlier_ratio(ac.cwiseQuotient(t.scales))},
        {"weight_outlier_ratio_before", outlier_ratio(wc)},
        {"weight_outlier_ratio_after", outlier_ratio(wc.cwiseProduct(t.scales))},
        {"alpha_auto", opt.auto_alpha ? 1.0 : 0.0},
    };
    if (opt.auto_alpha) {
      t.diagnostics.push_back({"auto_proxy_error", best_err});
      t.diagnostics.push_back({"auto_proxy_error_unsmoothed", unsmoothed_err});
    }
    return t;
  }
};

std::shared_ptr<OptionSchema<SmoothQuantOptions>> make_schema() {
  auto s = std::make_shared<OptionSchema<SmoothQuantOptions>>();
  s->add_custom(
      "alpha", "float in [0, 1] | auto",
      "migration strength α of s_j = max|X_j|^α / max|W_:j|^(1-α) (Eq. 4); auto: chosen per "
      "norm group from alpha_grid by the predicted W/A quantization error",
      [](SmoothQuantOptions& o, const ConfigNode& n, const std::string& p) {
        const std::optional<double> a = read_auto_or_double(n, p, 0.0, 1.0);
        o.auto_alpha = !a;
        if (a) o.alpha = *a;
      },
      [](const SmoothQuantOptions& o) {
        return ConfigNode::scalar(o.auto_alpha ? "auto" : format_double(o.alpha));
      });
  s->add_custom(
      "alpha_grid", "list of floats in [0, 1]",
      "candidate α values for alpha: auto (default 0, 0.05, ..., 1)",
      [](SmoothQuantOptions& o, const ConfigNode& n, const std::string& p) { o.alpha_grid = read_double_list(n, p, 0.0, 1.0); },
      [](const SmoothQuantOptions& o) { return double_list_node(o.alpha_grid); });
  s->add("auto_wbits", &SmoothQuantOptions::auto_wbits,
         "alpha: auto models per-output-channel symmetric weights of this many bits", {2, 8});
  s->add("auto_abits", &SmoothQuantOptions::auto_abits,
         "alpha: auto models one symmetric activation grid per tensor of this many bits", {2, 8});
  s->validator([](const SmoothQuantOptions& o, const ConfigNode& map, const std::string& path) {
    if (o.auto_alpha) return;
    for (const char* key : {"alpha_grid", "auto_wbits", "auto_abits"})
      if (map.find(key))
        throw ConfigError(map.key_loc(key), join_path(path, key),
                          std::string("'") + key + "' is only used with alpha: auto; remove it or set alpha: auto");
  });
  return s;
}

}  // namespace

Vector consumer_column_absmax(const std::vector<const Matrix*>& consumers) {
  if (consumers.empty()) throw ShapeError("smoothquant: no consumer weights");
  for (const Matrix* W : consumers)
    if (!W) throw ShapeError("smoothquant: null consumer weight");
  const Index d = consumers.front()->cols();
  Vector m = Vector::Zero(d);
  for (const Matrix* W : consumers) {
    if (W->cols() != d) throw ShapeError("smoothquant: consumers have different input widths");
    for (Index o = 0; o < W->rows(); ++o) m = m.cwiseMax(W->row(o).transpose().cwiseAbs());
  }
  return m;
}

VectorD smoothquant_scales(const Vector& act_absmax, const Vector& weight_absmax, double alpha) {
  if (act_absmax.size() != weight_absmax.size())
    throw ShapeError("smoothquant: " + std::to_string(act_absmax.size()) + " activation maxima for " +
                     std::to_string(weight_absmax.size()) + " weight columns");
  if (!(alpha >= 0.0 && alpha <= 1.0)) throw NumericError("smoothquant: alpha outside [0, 1]");
  const Index d = act_absmax.size();
  VectorD s(d);
  for (Index j = 0; j < d; ++j) {
    const double a = act_absmax[j], w = weight_absmax[j];
    if (!(a >= 0) || !(w >= 0) || !std::isfinite(a) || !std::isfinite(w))
      throw NumericError("smoothquant: channel " + std::to_string(j) +
                         " has a negative or non-finite maximum");
    // Eq. 4 in double from the float maxima, then one rounding to float: the runner folds
    // float(s), and returning exactly that value keeps the statistics rescaling consistent.
    const double sj = detmath::pow(std::max(a, kMaxClamp), alpha) /
                      detmath::pow(std::max(w, kMaxClamp), 1.0 - alpha);
    s[j] = static_cast<double>(static_cast<float>(sj));
  }
  return s;
}

double smoothquant_proxy_error(const std::vector<const Matrix*>& consumers, const Vector& act_absmax,
                               const VectorD& act_mean_sq, const VectorD& s, int wbits, int abits) {
  const Index d = s.size();
  if (act_absmax.size() != d || act_mean_sq.size() != d)
    throw ShapeError("smoothquant: statistics and scales have different sizes");
  for (const Matrix* W : consumers)
    if (!W || W->cols() != d) throw ShapeError("smoothquant: consumer width differs from the scales");
  const double qa = std::ldexp(1.0, abits - 1) - 1, qw = std::ldexp(1.0, wbits - 1) - 1;

  // x' = x/s: per-channel maxima, mean squares; one activation step Δ_a for the whole tensor.
  VectorD msq_t(d);
  double amax = 0;
  for (Index j = 0; j < d; ++j) {
    amax = std::max(amax, std::max(static_cast<double>(act_absmax[j]), kMaxClamp) / s[j]);
    msq_t[j] = act_mean_sq[j] / (s[j] * s[j]);
  }
  const double noise_a = (amax / qa) * (amax / qa) / 12.0;

  // Weight term per output row in parallel (each row has its own Δ_o); the per-row partial sums
  // and the column energies Σ_o W'_oj² are then added in row order, so the result does not
  // depend on the thread count.
  double act_term = 0, weight_term = 0;
  VectorD col_energy = VectorD::Zero(d);
  for (const Matrix* Wp : consumers) {
    const Matrix& W = *Wp;
    const Index rows = W.rows();
    VectorD row_w(rows);
#pragma omp parallel for schedule(static)
    for (Index o = 0; o < rows; ++o) {
      double rmax = 0;
      for (Index j = 0; j < d; ++j) rmax = std::max(rmax, std::abs(static_cast<double>(W(o, j)) * s[j]));
      const double noise_w = (rmax / qw) * (rmax / qw) / 12.0;
      double e = 0;
      for (Index j = 0; j < d; ++j) {
        const double v = static_cast<double>(W(o, j)) * s[j];
        e += std::min(noise_w, v * v) * msq_t[j];
      }
      row_w[o] = e;
    }
    for (Index o = 0; o < rows; ++o) {
      weight_term += row_w[o];
      for (Index j = 0; j < d; ++j) {
        const double v = static_cast<double>(W(o, j)) * s[j];
        col_energy[j] += v * v;
      }
    }
  }
  for (Index j = 0; j < d; ++j) act_term += std::min(noise_a, msq_t[j]) * col_energy[j];
  return act_term + weight_term;
}

void register_smoothquant(AlgorithmRegistry& registry) {
  AlgorithmInfo info;
  info.name = "smoothquant";
  info.scope = Scope::NormConsumers;
  info.summary =
      "per-channel scales s = max|X|^α / max|W|^(1-α) folded into the norm and its consumers "
      "(q/k/v, gate/up); quantize with later steps and the act spec";
  info.paper =
      "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models, "
      "arXiv 2211.10438";
  info.uses_weight_spec = false;
  info.options = make_schema();
  info.needs.channel_stats = true;
  info.make = [](const std::any& o) {
    return std::make_unique<SmoothQuant>(std::any_cast<const SmoothQuantOptions&>(o));
  };
  registry.add(std::move(info));
}

}  // namespace ql
