#include "algorithms/vlmq/vlmq.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "algorithms/algorithm.h"
#include "algorithms/gptq/gptq.h"
#include "core/error.h"
#include "core/linalg.h"
#include "core/model/block_grad.h"
#include "core/quantize.h"

namespace ql {
namespace {

enum class Site { Qkvo, Output };
enum class Norm { L1, L2 };
enum class Population { None, Average, Balance };
enum class Loss { Mse, Relative };

struct VlmqOptions : GptqOptions {
  Site site = Site::Qkvo;
  Norm norm = Norm::L2;
  double clip_percentile = 99.0;
  Population population = Population::None;
  Loss loss = Loss::Mse;
};

/// dL/dy of the block loss: L = Σ_t |ŷ_t − y*_t|² (mse) or Σ_t |ŷ_t − y*_t|² / |y*_t|² (relative:
/// every token's error relative to its own output, so loud tokens do not win by their norm).
Matrix loss_gradient(const Matrix& yhat, const Matrix& target, Loss loss) {
  Matrix dy = 2.0f * (yhat - target);
  if (loss == Loss::Relative)
    for (Index t = 0; t < dy.rows(); ++t) dy.row(t) /= std::max(target.row(t).squaredNorm(), 1e-12f);
  return dy;
}

/// |row t| in L1 or L2, accumulated as squares (L2) or sums (L1) into acc[t].
void add_row_norms(const Matrix& G, Norm norm, VectorD& acc) {
  for (Index t = 0; t < G.rows(); ++t)
    acc[t] += norm == Norm::L2 ? static_cast<double>(G.row(t).squaredNorm())
                               : static_cast<double>(G.row(t).cwiseAbs().sum());
}

class Vlmq final : public LayerAlgorithm {
 public:
  explicit Vlmq(VlmqOptions o) : opt_(std::move(o)) {}

 private:
  VlmqOptions opt_;

  LayerOutput quantize_layer(const LayerInput& in) const override {
    LayerOutput out;
    if (!in.spec.quantized()) {
      out.W = *in.W;
      return out;
    }
    if (in.spec.mse_weights != MseWeights::None)
      throw ConfigError(SourceLoc{}, "mse_weights", "'" + in.name + "': vlmq weighs errors by H; mse_weights is for rtn");
    if (!in.hessian || in.hessian->count() == 0)
      throw ConfigError(SourceLoc{}, "calib", "layer '" + in.name + "': vlmq needs calibration data (the weighted Hessian)");
    GptqResult r = gptq_solve(*in.W, in.hessian->upper_triangle(), in.spec, opt_, in.name);
    out.W = std::move(r.W);
    out.quantized = std::move(r.quantized);
    out.diagnostics = std::move(r.diagnostics);
    return out;
  }

  /// Steps 1-3 of the header for one window: per-token gradient norms at the site.
  Vector window_norms(const BlockShape& shape, const BlockParams<float>& pq, const Matrix& x, const Matrix& target,
                      RopeTables& tab, BlockTape<float>& tape, BlockParams<float>& grads) const {
    const Index T = x.rows();
    block_fwd<float>(shape, pq, x, T, 0, tab, tape);
    const Matrix dy = loss_gradient(tape.y, target, opt_.loss);
    VectorD acc = VectorD::Zero(T);
    if (opt_.site == Site::Output) {
      add_row_norms(dy, opt_.norm, acc);
    } else {
      Matrix dx;
      block_bwd<float>(shape, pq, tape, tab, dy, dx, grads);
      const auto& s = tape.scratch;  // gradients at the q/k/v outputs (pre-RoPE) and o's output (dh1)
      for (const Matrix* G : {&s.dq, &s.dk, &s.dv, &s.dh1}) add_row_norms(*G, opt_.norm, acc);
    }
    if (opt_.norm == Norm::L2) acc = acc.cwiseSqrt();
    return acc.cast<float>();
  }

  TokenImportance compute_token_importance(const TokenImportanceInput& in) const override {
    if (!in.spec.quantized())
      throw Error("'" + in.name + "': vlmq's importance needs the step's weight grid (bits < 16)");
    std::vector<Vector> g;
    if (in.linear) {
      // A standalone linear is its own block: L = Σ_t |Q(W) x_t − W x_t|², read at its output.
      const Matrix Wq = fake_quant(*in.linear, in.spec);
      for (std::size_t w = 0; w < in.inputs->size(); ++w) {
        const Matrix dy = loss_gradient(matmul_nt((*in.inputs)[w], Wq), (*in.targets)[w], opt_.loss);
        VectorD acc = VectorD::Zero(dy.rows());
        add_row_norms(dy, opt_.norm, acc);
        if (opt_.norm == Norm::L2) acc = acc.cwiseSqrt();
        g.push_back(acc.cast<float>());
      }
    } else {
      const BlockShape shape = BlockShape::of(*in.config);
      BlockParams<float> pq = BlockParams<float>::from(*in.weights);
      for (int k = 0; k < kLinearKinds; ++k) {
        MatT<float>& W = pq.linear(static_cast<LinearKind>(k));
        W = fake_quant(W, in.spec);
      }
      BlockParams<float> grads = BlockParams<float>::zeros_like(pq);
      RopeTables tab;
      BlockTape<float> tape;
      for (std::size_t w = 0; w < in.inputs->size(); ++w)
        g.push_back(window_norms(shape, pq, (*in.inputs)[w], (*in.targets)[w], tab, tape, grads));
    }
    g = normalise_importance(std::move(g), opt_.clip_percentile);
    apply_population(in, g);

    TokenImportance r;
    double s1 = 0, s2 = 0, gmax = 0;
    std::vector<double> per_source(in.source_names.size(), 0.0);
    for (std::size_t w = 0; w < g.size(); ++w) {
      const double sw = g[w].cast<double>().sum();
      s1 += sw;
      s2 += g[w].cast<double>().squaredNorm();
      gmax = std::max(gmax, static_cast<double>(g[w].maxCoeff()));
      if (w < in.window_source.size() && in.window_source[w] >= 0 &&
          static_cast<std::size_t>(in.window_source[w]) < per_source.size())
        per_source[in.window_source[w]] += sw;
    }
    r.diagnostics.push_back({"effective_tokens", s1 * s1 / s2});
    r.diagnostics.push_back({"importance_max", gmax});
    for (std::size_t k = 0; per_source.size() > 1 && k < per_source.size(); ++k)
      r.diagnostics.push_back({"importance_share." + in.source_names[k], per_source[k] / s1});
    r.weights = std::move(g);
    return r;
  }

  /// The per-population ablations of §8.5 (mean 1 is kept).
  void apply_population(const TokenImportanceInput& in, std::vector<Vector>& g) const {
    if (opt_.population == Population::None) return;
    const std::size_t P = std::max<std::size_t>(1, in.source_names.size());
    std::vector<double> sum(P, 0.0), count(P, 0.0);
    auto source = [&](std::size_t w) {
      const int s = w < in.window_source.size() ? in.window_source[w] : 0;
      return s >= 0 && static_cast<std::size_t>(s) < P ? static_cast<std::size_t>(s) : 0;
    };
    double n = 0;
    for (std::size_t w = 0; w < g.size(); ++w) {
      sum[source(w)] += g[w].cast<double>().sum();
      count[source(w)] += static_cast<double>(g[w].size());
      n += static_cast<double>(g[w].size());
    }
    std::size_t present = 0;
    for (double c : count) present += c > 0;
    for (std::size_t w = 0; w < g.size(); ++w) {
      const std::size_t s = source(w);
      const double v = opt_.population == Population::Average ? sum[s] / count[s]
                                                              : n / (static_cast<double>(present) * count[s]);
      g[w].setConstant(static_cast<float>(v));
    }
  }
};

std::shared_ptr<OptionSchema<VlmqOptions>> make_schema() {
  auto s = std::make_shared<OptionSchema<VlmqOptions>>();
  add_gptq_options(*s);
  s->add_enum("site", &VlmqOptions::site,
              "where the block loss's gradient is read per token: the q/k/v/o projection outputs (the paper) or "
              "the block output",
              std::vector<std::pair<std::string, Site>>{{"qkvo", Site::Qkvo}, {"output", Site::Output}});
  s->add_enum("norm", &VlmqOptions::norm, "g_t = the L1 or L2 norm of token t's gradient",
              std::vector<std::pair<std::string, Norm>>{{"l1", Norm::L1}, {"l2", Norm::L2}});
  s->add_enum("loss", &VlmqOptions::loss,
              "block loss whose gradient gives g: mse (sum of squared output errors) or relative (each token's "
              "squared error over its own squared output norm)",
              std::vector<std::pair<std::string, Loss>>{{"mse", Loss::Mse}, {"relative", Loss::Relative}});
  s->add("clip_percentile", &VlmqOptions::clip_percentile,
         "clip g at this percentile of the block's calibration tokens (100: no clipping)", {1e-9, 100});
  s->add_enum("population", &VlmqOptions::population,
              "ablation per calibration source: none (token importance), average (each token its source's mean g), "
              "balance (every source the same total weight, no gradients)",
              std::vector<std::pair<std::string, Population>>{
                  {"none", Population::None}, {"average", Population::Average}, {"balance", Population::Balance}});
  return s;
}

}  // namespace

std::vector<Vector> normalise_importance(std::vector<Vector> g, double percentile) {
  std::vector<float> all;
  for (const Vector& v : g)
    for (Index t = 0; t < v.size(); ++t) {
      if (!(v[t] >= 0.0f) || !std::isfinite(v[t])) throw NumericError("vlmq: a token's gradient norm is not finite");
      all.push_back(v[t]);
    }
  if (all.empty()) throw NumericError("vlmq: no calibration tokens");
  if (percentile < 100) {
    // The nearest-rank percentile: the smallest value with at least p% of the tokens at or below it.
    const std::size_t rank = static_cast<std::size_t>(std::ceil(percentile / 100.0 * static_cast<double>(all.size())));
    const std::size_t k = std::min(all.size() - 1, rank == 0 ? 0 : rank - 1);
    std::vector<float> sorted = all;
    std::nth_element(sorted.begin(), sorted.begin() + static_cast<std::ptrdiff_t>(k), sorted.end());
    const float cap = sorted[k];
    for (Vector& v : g) v = v.cwiseMin(cap);
  }
  double sum = 0;
  for (const Vector& v : g) sum += v.cast<double>().sum();
  if (!(sum > 0)) throw NumericError("vlmq: every token's gradient is 0 (the rounded block reproduces its target)");
  const double mean = sum / static_cast<double>(all.size());
  for (Vector& v : g) v = (v.cast<double>() / mean).cast<float>();
  return g;
}

void register_vlmq(AlgorithmRegistry& registry) {
  AlgorithmInfo info;
  info.name = "vlmq";
  info.scope = Scope::Layer;
  info.summary =
      "GPTQ on the token-importance Hessian X^T G X / sum g, g_t the norm of a block-local loss gradient at token t "
      "(q/k/v/o outputs or block output); model workloads";
  info.paper =
      "VLMQ: Efficient Post-Training Quantization for Large Vision-Language Models via Hessian Augmentation, "
      "arXiv 2508.03351";
  info.uses_weight_spec = true;
  info.needs.hessian = true;
  info.needs.token_importance = true;
  info.options = make_schema();
  info.make = [](const std::any& o) { return std::make_unique<Vlmq>(std::any_cast<const VlmqOptions&>(o)); };
  registry.add(std::move(info));
}

}  // namespace ql
