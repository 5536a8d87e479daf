// The latent trainable parameters of a quantized model (quantization-aware training, ZeroQAT
// arXiv 2509.00031 and its first-order baseline; ALGORITHMS.md §6.1): one flat float32 vector θ,
// the master copy the optimisers and the SPSA perturbations act on, and the map from θ to the
// model's current weights, which are fake-quantized on every materialisation.
//
// θ holds, per the QatParamSpec, in named segments:
//  - clip   Learnable weight clipping (OmniQuant-style LWC, arXiv 2308.13137 §3.2) on the grid
//           the warm start left: per quantization group (one per output row at per-channel
//           granularity), r_hi = 2σ(γ_hi), r_lo = 2σ(γ_lo) scale the group's range
//           [lo0, hi0] = [s0 (qmin − z0), s0 (qmax − z0)], so
//             s = s0 f,  f = (r_hi (qmax − z0) − r_lo (qmin − z0)) / (qmax − qmin),
//             z = qmin − round(r_lo (qmin − z0) / f)        (asymmetric grids);
//             s = s0 r_hi, z = z0                            (symmetric grids: one logit).
//           γ = 0 gives r = 1, f = 1, s = s0 and z = z0 exactly: the warm start bit for bit.
//  - smooth A per-channel smoothing scale c = exp(u) at the inputs the architecture table says a
//           norm produces (q/k/v and gate/up: the equivalent transformation ZeroQAT trains):
//           the consumers quantize W ⊙ c (columns), the norm's weight becomes γ / c. u = 0: c = 1.
//           (The shift of OmniQuant's transformation needs a bias on every consumer, which LLaMA
//           linears do not have; it is not offered.)
//  - weight The float latent weights of the linears a regex selects (e.g. q/v only); the others
//           stay at their start.
// The latent weights start at the float weights the warm start rounded when that is known: the
// FP weights in the current model's space (columns of a norm-fed linear times γ_fp / γ_now, which
// undoes nothing and recovers what a channel-scale fold such as SmoothQuant's made of them), when
// the warm start's codes are their nearest rounding on its grids (RTN of those weights; an entry
// the recovery's float re-rounding put at most 8 ulps across a rounding boundary is moved back
// into its code's cell); otherwise at the warm start's own (on-grid) weights. The
// difference matters: on-grid latent weights make every straight-through gradient of the grid
// and of the smoothing scales vanish at the start (round(v/s) − v/s = 0, and the smoothing
// scale's two paths cancel exactly), so only latent weights would move.
// Every linear that has codes (the warm start quantized it) is fake-quantized on its own grid:
//   W_eff = s (clamp(round(V / s) + z, qmin, qmax) − z),  V = W_latent ⊙ c,
// through core/quantize's quantize_value / dequantize_value, so the codes written with the
// weights reconstruct them bitwise. Linears without codes are not touched.
//
// The backward maps the gradients of the effective weights and norm weights (core/model/
// model_grad.h) to θ with the straight-through estimator (round's derivative taken as 1, the
// clamp's mask kept; dW_eff/ds = (q − z) − [passed] V/s, z without gradient).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/model/model_grad.h"
#include "core/model/quantized_model.h"
#include "core/quantize.h"

namespace ql {

struct QatParamSpec {
  bool clip = true;
  bool smooth = true;
  std::string latent_weights;  ///< ECMAScript regex over linear names ("" = none)
  /// false: V/s is not rounded (the rounding-free surrogate whose exact gradient the STE
  /// gradient is); for finite-difference tests only.
  bool round_values = true;
};

enum class QatKind { ClipHi, ClipLo, Smooth, Weight };
const char* qat_kind_name(QatKind k);  ///< "clip_hi", "clip_lo", "smooth", "weight"

/// A named slice of θ: e.g. "model.layers.3.self_attn.q_proj.clip_hi".
struct QatSegment {
  std::string name;
  QatKind kind;
  int block = 0;
  Index offset = 0, size = 0;
};

class QatParameters {
 public:
  /// Snapshots the warm start (current weights, codes, norm weights) of `qm`. ShapeError when no
  /// linear has codes; Error when smooth is asked where a block carries an online
  /// transform on a norm-produced input (c would have to commute with it), or the regex is
  /// invalid or latent weights are asked of a linear without codes (Error).
  QatParameters(const QuantizedModel& qm, const QatParamSpec& spec);

  Index size() const { return n_; }
  const std::vector<QatSegment>& segments() const { return segments_; }
  /// θ at the warm start (all logits and log-scales 0, latent weights the warm start's).
  std::vector<float> initial() const;
  /// Number of parameters of one kind.
  Index count(QatKind k) const;
  /// Per parameter: the warm start's grid step of a latent weight (its group's scale), 0 for
  /// every other parameter (the unit of ZeroQAT's stochastically rounded perturbations).
  std::vector<float> grid_steps() const;
  /// Linears whose latent weights start at the FP weights (the rest start on the grid).
  int fp_latent_linears() const { return fp_latent_; }

  /// Writes the model θ describes into qm (the model given to the constructor, or one with the
  /// same warm start): every covered linear's current weights and codes, the smoothed norms'
  /// weights. With `f16_scales` each learned scale is rounded to IEEE half where the warm
  /// start's spec stores half scales (the deployable model; training uses float scales so that
  /// small perturbations of γ are not lost to the rounding).
  void materialize(const float* theta, QuantizedModel& qm, bool f16_scales = false) const;
  /// dθ (size(), overwritten) from the gradients of the current (effective) weights and norm
  /// weights of materialize(theta) (grads: the shape of ModelParams<float>::from(qm.current())).
  void backward(const float* theta, const ModelParams<float>& grads, float* dtheta) const;

 private:
  struct Linear;
  struct Smooth;
  std::vector<Linear> linears_;
  std::vector<Smooth> smooths_;
  std::vector<InputSite> arch_groups_;  // site of each input group of the architecture table
  std::vector<QatSegment> segments_;
  Index n_ = 0;
  int fp_latent_ = 0;
  bool round_values_ = true;
  static bool rounds_to_codes(const Linear& L, Matrix& W, const QuantizedTensor& codes);
  std::vector<float> initial_;

 public:
  ~QatParameters();
  QatParameters(QatParameters&&) noexcept;
};

}  // namespace ql
