// Whole-model quantization-aware training of the latent parameters of core/model/qat_params.h
// with two estimators of the loss gradient (ALGORITHMS.md §6):
//
//  - spsa (ZeroQAT / MeZO, arXiv 2509.00031; ALGORITHMS.md §6.1): per query q of step t,
//      z ~ N(0, I) regenerated from CounterRng(seed, stream(t, q)) element by element, never
//      stored; L± = L(θ ± ε z) by two forward passes of the fake-quantized model (the
//      evaluation forward, with every activation / KV quantizer of the warm start);
//      g_q = (L+ − L−) / 2ε;  θ ← θ − lr · (1/n) Σ_q g_q z_q.
//    θ is the fp32 master copy: the perturbed parameters are written to a scratch vector and
//    materialised from there, so the master is never perturbed and restoring is exact.
//  - first_order (the baseline the paper's reviewers asked for): the exact gradient of the same
//    loss by one backward pass through the whole model (core/model/model_grad.h) and the
//    straight-through estimator of the fake quantization (QatParameters::backward), AdamW or SGD.
//
// Loss (option): next-token cross-entropy, or KL to the FP model's distribution (the FP logits
// of each batch computed by one FP forward, not counted as a forward of the quantized model).
// Batches: `batch` windows per step from the training windows, an epoch-wise permutation drawn
// from the seed; the last `heldout` calibration windows are held out and scored every
// eval_every steps. Every grad_check_every steps (spsa) the exact gradient on the step's batch
// is computed beside the estimate and their cosine and norm ratio are logged (reviewers asked
// exactly how good the zeroth-order estimate is).
//
// The first-order path needs the training graph to equal the evaluated model: it fake-quantizes
// the linears' inputs with the model's activation quantizers (straight-through), and refuses
// models with online transforms, KV-cache quantizers, linears that share an input but quantize
// it differently, or blocks the graph does not model (Qwen3's q/k norms); spsa runs on any
// model (its forward is the evaluation's).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "algorithms/algorithm.h"
#include "core/model/model_grad.h"
#include "core/model/qat_params.h"

namespace ql {

enum class QatEstimator { Spsa, FirstOrder };
enum class LrSchedule { Constant, Linear };
enum class QatOptimizer { AdamW, Sgd };

struct QatTrainOptions {
  QatEstimator estimator = QatEstimator::Spsa;
  // The parameter set (QatParamSpec): clipping logits, smoothing scales, latent weights.
  bool clip = true;
  bool smooth = true;
  std::string latent_weights;
  LmLoss loss = LmLoss::CrossEntropy;
  int steps = 100;
  int batch = 4;        ///< windows per step
  int queries = 1;      ///< spsa: ± pairs per step (n)
  double eps = 1e-3;    ///< spsa: perturbation scale ε
  double lr = 1e-3;
  /// Latent weights step at lr · weight_lr_scale (they live on another scale than the logits)
  double weight_lr_scale = 1.0;
  LrSchedule schedule = LrSchedule::Constant;
  double lr_end = 0.5;  ///< linear: the last step's lr as a fraction of lr (the reference: 0.5)
  QatOptimizer optimizer = QatOptimizer::AdamW;  ///< first_order
  double weight_decay = 0.0;                      ///< first_order AdamW
  int heldout = 4;           ///< calibration windows held out for the held-out loss
  int eval_every = 10;       ///< held-out loss every k steps (and at 0 and the end)
  int grad_check_every = 0;  ///< spsa: cosine with the exact gradient every k steps (0: never)
  int tokens = 0;            ///< crop each window to its first `tokens` ids (0: as given)
  /// spsa: perturb latent weights by whole grid steps (stochastic rounding of ε z / step)
  bool stochastic_perturbation = false;
  uint64_t seed = 0;  ///< the run's (not a YAML key)
  QatParamSpec param_spec() const {
    QatParamSpec p;
    p.clip = clip;
    p.smooth = smooth;
    p.latent_weights = latent_weights;
    return p;
  }
};

/// z_j of query q at step t (the SPSA direction), a pure function of its arguments.
double spsa_direction(uint64_t seed, int64_t step, int query, Index j);

/// The perturbation ε d_j of parameter j: ε z_j (in float) when grid_step is 0; otherwise ε z_j
/// stochastically rounded to a whole number of grid steps (ALGORITHMS.md §6.5; expectation
/// ε z_j), from a second counter stream keyed like z.
float spsa_displacement(uint64_t seed, int64_t step, int query, Index j, double eps, float grid_step);

/// One SPSA update of a generic loss (the ZeroQAT step without the model): for q < queries,
/// L± = loss(θ ± ε d_q), d_q = spsa_displacement(...)/ε (z_q without grid steps), written into
/// `scratch` (the master θ is never perturbed); g_q = (L+ − L−) / 2ε;
/// θ ← θ − lr · (1/queries) Σ_q g_q d_q with d regenerated. grid_steps (null, or one per
/// parameter, 0 = Gaussian) selects stochastically rounded perturbations. The averaged
/// estimate is written to `estimate` when non-null; lr_scale (null, or one factor per parameter)
/// multiplies lr per parameter. Returns the mean of L+ and L− of query 0
/// (the step's training loss, O(ε²) from L(θ)).
double spsa_update(std::vector<float>& theta, std::vector<float>& scratch,
                   const std::function<double(const float*)>& loss, uint64_t seed, int64_t step, int queries,
                   double eps, double lr, std::vector<float>* estimate, const std::vector<float>* grid_steps = nullptr,
                   const std::vector<float>* lr_scale = nullptr);

/// Why the first-order path cannot train this model ("" when it can): online transforms, KV
/// quantizers, or linears that read one input but quantize it differently.
std::string first_order_unsupported(const QuantizedModel& qm);

/// The model's activation quantizers as the training graph's input quantization (straight-
/// through in the backward); empty without activation quantizers. Refers to qm.
ModelInputQuant<float> training_input_quant(const QuantizedModel& qm);

/// The loss of the model θ describes on a batch, by the evaluation forward (materialises θ into
/// qm first). reference: the FP logits with KL, else null.
double qat_loss(const QatParameters& p, const float* theta, QuantizedModel& qm,
                const std::vector<std::vector<int32_t>>& batch, LmLoss loss, const std::vector<Matrix>* reference);

/// The exact (STE) gradient dθ (p.size() floats) of the same loss by the training forward and
/// backward; returns the loss. ShapeError when first_order_unsupported(qm) is not empty.
double qat_exact_gradient(const QatParameters& p, const float* theta, QuantizedModel& qm,
                          const std::vector<std::vector<int32_t>>& batch, LmLoss loss,
                          const std::vector<Matrix>* reference, float* dtheta);

struct QatTrainResult {
  std::vector<TrainingPoint> trace;
  Diagnostics diagnostics;
};

/// Trains the latent parameters of qm's warm start on the windows and leaves the trained model
/// in qm (weights, codes, norms; learned scales stored as the warm start's spec stores them).
/// With lr 0 the model is left bitwise as it was. Errors: ShapeError for fewer than
/// heldout + 1 windows or windows shorter than 2 tokens (after `tokens`), and as QatParameters.
QatTrainResult train_qat(QuantizedModel& qm, const std::vector<std::vector<int32_t>>& windows,
                         const QatTrainOptions& o, const std::function<void(const std::string&)>& progress = {});

}  // namespace ql
