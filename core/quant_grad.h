// Fake quantization with straight-through gradients and learnable clipping, as quantization-
// aware calibration trains it (FlatQuant arXiv 2410.09426 §3.3 / its quant_utils.py and
// flat_linear.py; OmniQuant arXiv 2308.13137 §3.2 for the clipping form). One row = one
// quantization group (a token's activations, a weight's output row, a KV head of a token).
//
// Forward of row x (n values), bits b:
//   ClampValues (LWC, weights): x' = clamp(x, min(x)·σ(β), max(x)·σ(α)) elementwise, then the
//     range of x' with ratios 1;  ScaleRange (LAC, activations): x' = x and the ratios σ(α), σ(β)
//     scale the range.
//   hi = max(max(x'), 0)·ratio_hi,  lo = min(min(x'), 0)·ratio_lo
//   symmetric:  s = max(|lo|, hi) / (2^(b-1) - 1)  (below min_range: s = min_range / qmax, or
//               1 when min_range is 0 and the range is 0, as the reference does);
//               y = s · clamp(round(x'/s), -2^(b-1), 2^(b-1) - 1)
//   asymmetric: s = (hi - lo) / (2^b - 1) (lo, hi = -1, 1 when both are 0); z = round(-lo/s)
//               without gradient; y = s · (clamp(round(x'/s) + z, 0, 2^b - 1) - z)
// round is half-to-even (torch.round). Backward: round's derivative is taken as 1 (the STE), so
// dy/dx' = 1 where the clamp of the integer passes it and 0 where it clips, and
// dy/ds = (q - z) - [passed] x'/s; the range's gradient flows through s to the row's max / min
// elements (split evenly over ties, as amax does), through the clip ratios to the logits
// (σ' = σ(1 - σ)), and with ClampValues through the clamp: clipped elements pass their gradient
// to the bound, the bound to the logit and the row's max / min element.
//
// Logits: empty (no clipping: ratios 1, no gradient), one pair shared by all rows (per tensor,
// FlatQuant's LAC), or one pair per row (LWC). Gradients of the logits ACCUMULATE.
#pragma once
#include <vector>

#include "core/tensor.h"

namespace ql {

enum class ClipStyle { ScaleRange, ClampValues };

struct FakeQuantGrad {
  int bits = 4;
  bool symmetric = true;
  ClipStyle clip = ClipStyle::ScaleRange;
  /// Floor of the range (weights: 1e-5 as the reference's weight quantizer; activations: 0,
  /// where an all-zero row gets s = 1).
  double min_range = 0.0;
  /// false: no rounding (y = s·clamp(x'/s)), the function whose exact gradient the STE
  /// gradient is; for finite-difference checks only.
  bool round_values = true;
};

/// What the backward reads besides x and the logits, per row.
template <class S>
struct FakeQuantTape {
  VecT<S> scale, zero;         ///< s and z per row (z = 0 when symmetric)
  std::vector<char> scale_fixed;  ///< s did not depend on x (floor or zero range)
  MatT<S> xc;                  ///< x' (ClampValues only; else empty, x' = x)
};

/// Y (resized) = fake-quantized X, row by row.
template <class S>
void fake_quant_fwd(const MatT<S>& X, const FakeQuantGrad& spec, const VecT<S>& logit_hi, const VecT<S>& logit_lo,
                    MatT<S>& Y, FakeQuantTape<S>& tape);

/// dX (resized, overwritten) and, when non-null, dlogit_hi / dlogit_lo (+=, the logits' sizes).
template <class S>
void fake_quant_bwd(const MatT<S>& dY, const MatT<S>& X, const FakeQuantGrad& spec, const VecT<S>& logit_hi,
                    const VecT<S>& logit_lo, const FakeQuantTape<S>& tape, MatT<S>& dX, VecT<S>* dlogit_hi,
                    VecT<S>* dlogit_lo);

/// LWC on its own (when an op sits between the clipping and the grid, as FlatQuant's P_v on
/// v_proj's output): Y = clamp(X, min_row(X)·σ(lo), max_row(X)·σ(hi)) row by row, one logit pair
/// per row (or one shared).
template <class S>
void clip_rows_fwd(const MatT<S>& X, const VecT<S>& logit_hi, const VecT<S>& logit_lo, MatT<S>& Y);
/// dX (overwritten): clipped elements pass their gradient to the bound, the bound to its logit
/// and the row's max / min element; dlogit_hi / dlogit_lo += when non-null.
template <class S>
void clip_rows_bwd(const MatT<S>& dY, const MatT<S>& X, const VecT<S>& logit_hi, const VecT<S>& logit_lo, MatT<S>& dX,
                   VecT<S>* dlogit_hi, VecT<S>* dlogit_lo);

}  // namespace ql
