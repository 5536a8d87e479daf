#include "algorithms/zeroqat/qat_trainer.h"

#include <chrono>
#include <cmath>
#include <fstream>
#include <limits>
#include <sstream>

#include "core/error.h"
#include "core/optim.h"
#include "core/rng.h"

namespace ql {

namespace {

constexpr uint64_t kSpsaStream = 0x5a51415453505341ull;     // z of (step, query)
constexpr uint64_t kSamplerStream = 0x5a5141545341504dull;  // batch permutations
constexpr uint64_t kRoundStream = 0x5a51415453524e44ull;    // stochastic rounding of perturbations
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

/// The FP model's logits of a batch (the KL loss's reference).
std::vector<Matrix> fp_logits(const QuantizedModel& qm, const std::vector<std::vector<int32_t>>& batch) {
  const Transformer fp = qm.fp_transformer();
  return fp.forward_batch(batch);
}

/// Epoch-wise permutations of the training windows, drawn from the seed (Fisher-Yates with the
/// counter-based generator, so batch t is a pure function of (seed, t)).
class BatchSampler {
 public:
  BatchSampler(std::size_t n, uint64_t seed) : n_(n), seed_(seed) {}
  std::vector<std::size_t> next(int batch) {
    std::vector<std::size_t> out;
    for (int i = 0; i < batch; ++i) {
      if (pos_ == order_.size()) shuffle();
      out.push_back(order_[pos_++]);
    }
    return out;
  }

 private:
  void shuffle() {
    order_.resize(n_);
    for (std::size_t i = 0; i < n_; ++i) order_[i] = i;
    const CounterRng rng(seed_, mix_stream(kSamplerStream, epoch_++));
    for (std::size_t i = n_; i > 1; --i) std::swap(order_[i - 1], order_[rng.below(i, i)]);
    pos_ = 0;
  }
  std::size_t n_, pos_ = 0;
  uint64_t seed_, epoch_ = 0;
  std::vector<std::size_t> order_;
};

double lr_at(const QatTrainOptions& o, int step) {  // step 0-based
  if (o.schedule == LrSchedule::Constant || o.steps <= 1) return o.lr;
  const double frac = static_cast<double>(step) / static_cast<double>(o.steps - 1);
  return o.lr * (1.0 - (1.0 - o.lr_end) * frac);
}

/// Resident memory of this process from /proc/self/status (kB fields VmRSS / VmHWM), and a
/// reset of the peak (writing 5 to clear_refs, Linux >= 4.0) so that a phase's own peak can be
/// read; -1 where /proc is not available.
double proc_status_mb(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(field, 0) == 0) {
      std::istringstream ss(line.substr(std::string(field).size() + 1));
      double kb = 0;
      ss >> kb;
      return kb / 1024.0;
    }
  return -1;
}
void reset_peak_rss() {
  std::ofstream out("/proc/self/clear_refs");
  out << "5";
}

std::string format_eta(double seconds) {
  const long s = std::lround(std::max(0.0, seconds));
  return s >= 60 ? std::to_string(s / 60) + "m" + (s % 60 < 10 ? "0" : "") + std::to_string(s % 60) + "s"
                 : std::to_string(s) + "s";
}

double cosine(const std::vector<float>& a, const std::vector<float>& b, double* norm_ratio) {
  double ab = 0, aa = 0, bb = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    ab += double(a[i]) * b[i];
    aa += double(a[i]) * a[i];
    bb += double(b[i]) * b[i];
  }
  *norm_ratio = bb > 0 ? std::sqrt(aa / bb) : kNaN;
  return aa > 0 && bb > 0 ? ab / std::sqrt(aa * bb) : kNaN;
}

/// The training loop's state: the parameter set, the fp32 master θ, a scratch vector for the
/// perturbed parameters, and the data.
class Trainer {
 public:
  Trainer(QuantizedModel& qm, const std::vector<std::vector<int32_t>>& windows, const QatTrainOptions& o)
      : qm_(qm), o_(o), p_(qm, o.param_spec()), theta_(p_.initial()), scratch_(theta_.size()), sampler_(0, 0) {
    split(windows);
    sampler_ = BatchSampler(train_.size(), o.seed);
    if (o.estimator == QatEstimator::FirstOrder || o.grad_check_every > 0) {
      const std::string why = first_order_unsupported(qm);
      if (!why.empty()) {
        if (o.estimator == QatEstimator::FirstOrder) throw ShapeError("zeroqat estimator first_order: " + why);
        grad_check_reason_ = why;
      }
    }
    if (o.loss == LmLoss::KlToReference && !heldout_.empty()) heldout_ref_ = fp_logits(qm, heldout_);
    if (o.stochastic_perturbation) grid_steps_ = p_.grid_steps();
    lr_scale_.assign(theta_.size(), 1.0f);
    for (const QatSegment& seg : p_.segments())
      if (seg.kind == QatKind::Weight)
        std::fill(lr_scale_.begin() + seg.offset, lr_scale_.begin() + seg.offset + seg.size, static_cast<float>(o.weight_lr_scale));
  }

  QatTrainResult run(const std::function<void(const std::string&)>& progress);

 private:
  void split(const std::vector<std::vector<int32_t>>& windows);
  double heldout_loss() {  // NaN with heldout: 0
    return heldout_.empty() ? kNaN : qat_loss(p_, theta_.data(), qm_, heldout_, o_.loss, ref_or_null(heldout_ref_));
  }
  const std::vector<Matrix>* ref_or_null(const std::vector<Matrix>& r) const {
    return o_.loss == LmLoss::KlToReference ? &r : nullptr;
  }
  double spsa_step(int step, const std::vector<std::vector<int32_t>>& batch, const std::vector<Matrix>* ref,
                   double lr, std::vector<float>* estimate);
  double first_order_step(const std::vector<std::vector<int32_t>>& batch, const std::vector<Matrix>* ref, double lr);

  QuantizedModel& qm_;
  const QatTrainOptions& o_;
  QatParameters p_;
  std::vector<float> theta_, scratch_, grad_, grid_steps_, lr_scale_;
  std::vector<std::vector<int32_t>> train_, heldout_;
  std::vector<Matrix> heldout_ref_;
  BatchSampler sampler_;
  std::unique_ptr<AdamW> adam_, adam_w_;
  std::vector<Index> adam_grads_, adam_w_grads_;  // segment offsets registered with each
  std::string grad_check_reason_;
  int64_t forwards_ = 0, backwards_ = 0;
};

void Trainer::split(const std::vector<std::vector<int32_t>>& windows) {
  if (o_.heldout < 0 || static_cast<std::size_t>(o_.heldout) + 1 > windows.size())
    throw ShapeError("zeroqat: " + std::to_string(windows.size()) + " calibration windows cannot hold out " +
                     std::to_string(o_.heldout) + " and train on the rest");
  for (std::size_t w = 0; w < windows.size(); ++w) {
    std::vector<int32_t> ids = windows[w];
    if (o_.tokens > 0 && static_cast<int>(ids.size()) > o_.tokens) ids.resize(static_cast<std::size_t>(o_.tokens));
    if (ids.size() < 2) throw ShapeError("zeroqat: calibration window " + std::to_string(w) + " has fewer than 2 tokens");
    (w + static_cast<std::size_t>(o_.heldout) < windows.size() ? train_ : heldout_).push_back(std::move(ids));
  }
}

double Trainer::spsa_step(int step, const std::vector<std::vector<int32_t>>& batch, const std::vector<Matrix>* ref,
                          double lr, std::vector<float>* estimate) {
  auto loss = [&](const float* theta) {
    ++forwards_;
    return qat_loss(p_, theta, qm_, batch, o_.loss, ref);
  };
  return spsa_update(theta_, scratch_, loss, o_.seed, step, o_.queries, o_.eps, lr, estimate,
                     o_.stochastic_perturbation ? &grid_steps_ : nullptr, o_.weight_lr_scale != 1.0 ? &lr_scale_ : nullptr);
}

double Trainer::first_order_step(const std::vector<std::vector<int32_t>>& batch, const std::vector<Matrix>* ref,
                                 double lr) {
  grad_.resize(theta_.size());
  const double loss = qat_exact_gradient(p_, theta_.data(), qm_, batch, o_.loss, ref, grad_.data());
  forwards_ += 1;
  backwards_ += 1;
  if (lr == 0) return loss;
  if (o_.optimizer == QatOptimizer::Sgd) {
    for (std::size_t j = 0; j < theta_.size(); ++j) theta_[j] -= static_cast<float>(lr * lr_scale_[j] * grad_[j]);
  } else {
    if (!adam_) {  // two AdamW instances: latent weights step at lr · weight_lr_scale
      AdamWOptions ao;
      ao.lr = o_.lr;
      ao.weight_decay = o_.weight_decay;
      adam_ = std::make_unique<AdamW>(ao);
      adam_w_ = std::make_unique<AdamW>(ao);
      for (const QatSegment& seg : p_.segments()) {
        (seg.kind == QatKind::Weight ? adam_w_ : adam_)->add(theta_.data() + seg.offset, seg.size);
        (seg.kind == QatKind::Weight ? adam_w_grads_ : adam_grads_).push_back(seg.offset);
      }
    }
    auto grads_of = [&](const std::vector<Index>& offsets) {
      std::vector<const float*> g;
      for (Index off : offsets) g.push_back(grad_.data() + off);
      return g;
    };
    if (!adam_grads_.empty()) adam_->step(grads_of(adam_grads_), lr);
    if (!adam_w_grads_.empty()) adam_w_->step(grads_of(adam_w_grads_), lr * o_.weight_lr_scale);
  }
  return loss;
}

QatTrainResult Trainer::run(const std::function<void(const std::string&)>& progress) {
  QatTrainResult r;
  const double rss_start = proc_status_mb("VmRSS:");
  reset_peak_rss();
  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  const double heldout0 = heldout_loss();
  r.trace.push_back({0, 0, 0, kNaN, heldout0, kNaN, kNaN, 0.0, elapsed()});
  std::vector<float> estimate, exact;
  for (int step = 0; step < o_.steps; ++step) {
    std::vector<std::vector<int32_t>> batch;
    for (std::size_t i : sampler_.next(o_.batch)) batch.push_back(train_[i]);
    std::vector<Matrix> ref;
    if (o_.loss == LmLoss::KlToReference) ref = fp_logits(qm_, batch);
    const double lr = lr_at(o_, step);
    TrainingPoint pt{step + 1, 0, 0, 0.0, kNaN, kNaN, kNaN, lr, 0.0};
    const bool check = o_.estimator == QatEstimator::Spsa && o_.grad_check_every > 0 &&
                       grad_check_reason_.empty() && (step + 1) % o_.grad_check_every == 0;
    if (check) {  // the exact gradient at the parameters the step starts from
      exact.resize(theta_.size());
      qat_exact_gradient(p_, theta_.data(), qm_, batch, o_.loss, ref_or_null(ref), exact.data());
    }
    if (o_.estimator == QatEstimator::Spsa)
      pt.train_loss = spsa_step(step, batch, ref_or_null(ref), lr, check ? &estimate : nullptr);
    else
      pt.train_loss = first_order_step(batch, ref_or_null(ref), lr);
    if (check) pt.grad_cosine = cosine(estimate, exact, &pt.grad_norm_ratio);
    if ((o_.eval_every > 0 && (step + 1) % o_.eval_every == 0) || step + 1 == o_.steps) pt.heldout_loss = heldout_loss();
    pt.forwards = forwards_;
    pt.backwards = backwards_;
    pt.seconds = elapsed();
    r.trace.push_back(pt);
    if (progress) {
      std::ostringstream line;
      line << "zeroqat step " << step + 1 << "/" << o_.steps << " loss " << pt.train_loss;
      if (!std::isnan(pt.heldout_loss)) line << " heldout " << pt.heldout_loss;
      line << " ETA " << format_eta(pt.seconds / (step + 1) * (o_.steps - step - 1));
      progress(line.str());
    }
  }
  p_.materialize(theta_.data(), qm_, true);  // the deployable model: scales stored as the spec says
  const double peak = proc_status_mb("VmHWM:");
  const double final_heldout = r.trace.back().heldout_loss;
  r.diagnostics = {{"params", double(p_.size())},
                   {"params_clip", double(p_.count(QatKind::ClipHi) + p_.count(QatKind::ClipLo))},
                   {"params_smooth", double(p_.count(QatKind::Smooth))},
                   {"params_weight", double(p_.count(QatKind::Weight))},
                   {"fp_latent_linears", double(p_.fp_latent_linears())},
                   {"train_windows", double(train_.size())},
                   {"heldout_loss_start", heldout0},
                   {"heldout_loss_end", final_heldout},
                   {"forwards", double(forwards_)},
                   {"backwards", double(backwards_)},
                   {"rss_start_mb", rss_start},
                   {"peak_rss_mb", peak},
                   {"peak_rss_over_start_mb", peak >= 0 && rss_start >= 0 ? peak - rss_start : kNaN}};
  return r;
}

}  // namespace

float spsa_displacement(uint64_t seed, int64_t step, int query, Index j, double eps, float grid_step) {
  const double z = spsa_direction(seed, step, query, j);
  if (grid_step <= 0) return static_cast<float>(eps) * static_cast<float>(z);
  // Stochastic rounding of ε z / step to an integer (ALGORITHMS.md §6.5): E = ε z, and the
  // perturbation moves the weight by whole grid steps, so it changes rounding decisions.
  const double x = eps * z / grid_step, lo = std::floor(x);
  const CounterRng rng(seed, mix_stream(mix_stream(kRoundStream, static_cast<uint64_t>(step)), static_cast<uint64_t>(query)));
  const double k = lo + (rng.uniform(static_cast<uint64_t>(j)) < x - lo ? 1.0 : 0.0);
  return static_cast<float>(k * grid_step);
}

double spsa_update(std::vector<float>& theta, std::vector<float>& scratch,
                   const std::function<double(const float*)>& loss, uint64_t seed, int64_t step, int queries,
                   double eps, double lr, std::vector<float>* estimate, const std::vector<float>* grid_steps,
                   const std::vector<float>* lr_scale) {
  const Index n = static_cast<Index>(theta.size());
  if ((grid_steps && static_cast<Index>(grid_steps->size()) != n) || (lr_scale && static_cast<Index>(lr_scale->size()) != n))
    throw ShapeError("spsa_update: one grid step / lr scale per parameter expected");
  auto displacement = [&](int q, Index j) {
    return spsa_displacement(seed, step, q, j, eps, grid_steps ? (*grid_steps)[j] : 0.0f);
  };
  scratch.resize(theta.size());
  std::vector<double> g(static_cast<std::size_t>(queries));
  double loss0 = 0;
  for (int q = 0; q < queries; ++q) {
    double l[2];
    for (int side = 0; side < 2; ++side) {
      const float sign = side == 0 ? 1.0f : -1.0f;
#pragma omp parallel for schedule(static)
      for (Index j = 0; j < n; ++j) scratch[j] = theta[j] + sign * displacement(q, j);
      l[side] = loss(scratch.data());
    }
    g[static_cast<std::size_t>(q)] = (l[0] - l[1]) / (2.0 * eps);
    if (q == 0) loss0 = 0.5 * (l[0] + l[1]);
  }
  if (estimate) estimate->assign(theta.size(), 0.0f);
#pragma omp parallel for schedule(static)
  for (Index j = 0; j < n; ++j) {
    double est = 0;  // Σ_q g_q d_q with d = displacement / ε (z itself without grid steps)
    for (int q = 0; q < queries; ++q) {
      const double d = grid_steps && (*grid_steps)[j] > 0 ? displacement(q, j) / eps : spsa_direction(seed, step, q, j);
      est += g[static_cast<std::size_t>(q)] * d;
    }
    const float ef = static_cast<float>(est / queries);  // the estimate as the update uses it
    if (estimate) (*estimate)[j] = ef;
    if (lr != 0) theta[j] -= static_cast<float>((lr_scale ? lr * (*lr_scale)[j] : lr) * ef);
  }
  return loss0;
}

double spsa_direction(uint64_t seed, int64_t step, int query, Index j) {
  const CounterRng rng(seed, mix_stream(mix_stream(kSpsaStream, static_cast<uint64_t>(step)), static_cast<uint64_t>(query)));
  return rng.normal(static_cast<uint64_t>(j));
}

std::string first_order_unsupported(const QuantizedModel& qm) {
  const Architecture& arch = qm.architecture();
  for (int b = 0; b < qm.num_blocks(); ++b) {
    if (!qm.transforms(b).empty()) return "block " + std::to_string(b) + " carries online transforms";
    if (qm.kv_quantizer(b)) return "block " + std::to_string(b) + " quantizes its KV cache";
    // The training graph quantizes a shared input once (block_grad.h's InputQuant).
    for (const InputGroup& g : arch.input_groups())
      for (LinearKind k : g.members)
        if (!qm.act(b, k).same_as(qm.act(b, g.members.front())))
          return linear_name(b, k) + " quantizes its input unlike " + linear_name(b, g.members.front()) +
                 ", which reads the same input";
  }
  return "";
}

ModelInputQuant<float> training_input_quant(const QuantizedModel& qm) {
  if (!qm.has_activation_quant()) return {};
  return [&qm](int b, LinearKind k, Matrix& X) { qm.act(b, k).apply(X); };
}

double qat_loss(const QatParameters& p, const float* theta, QuantizedModel& qm,
                const std::vector<std::vector<int32_t>>& batch, LmLoss loss, const std::vector<Matrix>* reference) {
  p.materialize(theta, qm);
  const Transformer tf = qm.transformer();
  const ForwardHooks hooks = qm.hooks();
  return lm_loss(tf.forward_batch(batch, &hooks), batch, loss, reference);
}

double qat_exact_gradient(const QatParameters& p, const float* theta, QuantizedModel& qm,
                          const std::vector<std::vector<int32_t>>& batch, LmLoss loss,
                          const std::vector<Matrix>* reference, float* dtheta) {
  const std::string why = first_order_unsupported(qm);
  if (!why.empty()) throw ShapeError("qat: exact gradient: " + why);
  p.materialize(theta, qm);
  const BlockShape s = BlockShape::of(qm.config());
  const ModelParams<float> mp = ModelParams<float>::from(qm.current());
  ModelTape<float> tape;
  const double l = model_loss_fwd(s, mp, batch, loss, reference, tape, training_input_quant(qm));
  ModelParams<float> grads = ModelParams<float>::zeros_like(mp);
  model_bwd(s, mp, tape, grads);
  p.backward(theta, grads, dtheta);
  return l;
}

QatTrainResult train_qat(QuantizedModel& qm, const std::vector<std::vector<int32_t>>& windows,
                         const QatTrainOptions& o, const std::function<void(const std::string&)>& progress) {
  if (o.steps < 0 || o.batch < 1 || o.queries < 1 || !(o.eps > 0))
    throw ShapeError("zeroqat: steps >= 0, batch >= 1, queries >= 1 and eps > 0 are required");
  Trainer t(qm, windows, o);
  return t.run(progress);
}

}  // namespace ql
