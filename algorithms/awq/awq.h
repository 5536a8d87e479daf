// awq: "AWQ: Activation-aware Weight Quantization for On-Device LLM Compression and
// Acceleration" (Lin et al., arXiv 2306.00978; ALGORITHMS.md §3). Weight-only. A few input
// channels with large activations carry most of the output; scaling them up before rounding
// (W diag(s), the inverse folded into the producer) gives them finer effective resolution at
// the expense of the quiet channels. Per shared input (q/k/v after input_layernorm, gate/up
// after post_attention_layernorm, down after up_proj's rows; o_proj's input has no producer
// that can absorb a scale under grouped-query attention, so it gets clipping and rounding only,
// as the reference skips v->o when the shapes differ):
//
// 1. Scale search (§3 "Scale search"): s = mean|x|^α, clamped to >= 1e-4 and normalised by
//    sqrt(max s · min s), for α on a grid (default 0, 0.05, ..., 0.95). Each candidate is
//    scored by the output error of every consumer on the calibration inputs,
//      E(α) = Σ_i tr(ΔW_i H ΔW_iᵀ),  ΔW_i = Q(W_i diag(s)) diag(1/s) − W_i,
//    with H = XᵀX/n the captured Hessian of the shared input: exactly the mean squared error
//    of the linears' outputs that the reference measures by replaying the tokens (it measures
//    the enclosing module's output; the issue asks for the linears'). α = 0 gives s = 1, i.e.
//    RTN, so the chosen scales never score worse than RTN. Ties keep the earliest α.
// 2. Clip search (auto_clip.py): per output row and weight group of the scaled weights, the
//    largest |w| is shrunk by 1 − i/clip_grid for i < clip_max_shrink · clip_grid (default
//    1, 0.95, ..., 0.55), the group clamped to ±max and quantized on the step's grid, and the
//    ratio minimising the group's output error Δw H'_gg Δwᵀ (the diagonal block of the scaled
//    H' = diag(1/s) H diag(1/s); the reference sums the group's products over 512 sampled
//    tokens) is kept. q_proj and k_proj are not clipped by default, as in the reference (their
//    errors meet in the attention logits, which a per-linear objective does not see).
//    Per-tensor grids have no groups to clip.
// 3. The clipped weights are rounded on the step's grid (RTN), unless a later step quantizes
//    the same linears ([awq, gptq]): then they are left in float (scaled and clipped) for it.
//
// Config keys (the step's bits / scheme / granularity / group_size set the grid, e.g. w4 g128):
//   alpha            auto (default: the grid search) or a fixed α in [0, 1]
//   alpha_grid       candidate α for auto (default 0, 0.05, ..., 0.95: the reference's 20 points)
//   clip             bool (default true): run the clip search
//   clip_grid        int >= 2 (default 20), clip_max_shrink in (0, 1) (default 0.5)
//   clip_qk          bool (default false): also clip q_proj / k_proj
//
// Deliberate differences from mit-han-lab/llm-awq (auto_scale.py, auto_clip.py): the loss is
// evaluated exactly through H on every calibration token instead of by replaying the block
// (module outputs) on the calibration set, and clipping is scored on all tokens, not 512
// samples. With asymmetric grids the clamp is [−max, max] as the reference, so a group's min
// only moves when |min| exceeds the shrunk max.
//
// Diagnostics per input group: alpha, scale_error (E at the chosen α), scale_error_rtn (E at
// s = 1), max_scale, min_scale, and with clipping clip_mean_ratio (mean chosen shrink over the
// clipped groups), clip_error_before / clip_error_after (Σ of the per-group objectives at ratio
// 1 and at the chosen ratios), clipped_groups.
#pragma once
#include <vector>

#include "core/quant_spec.h"
#include "core/tensor.h"

namespace ql {
class AlgorithmRegistry;
void register_awq(AlgorithmRegistry& registry);

/// The reference's scales for one α: s_j = max(mean_abs_j^α, 1e-4) / sqrt(max s · min s),
/// evaluated in double and rounded to float once (the fold multiplies by float(s)).
/// NumericError for a negative or non-finite mean_abs or α outside [0, 1].
VectorD awq_scales(const VectorD& mean_abs, double alpha);

/// The clip search on one matrix W (rows x d, already scaled) under H (d x d): per row and
/// group of spec's granularity, the shrink ratio in {1 − i/grid : i < max_shrink · grid}
/// minimising Δw H_gg Δwᵀ after clamping to ±ratio · max|w_g| and quantizing on spec's grid.
/// Returns the clamped (not yet quantized) weights; ratios (rows x groups) and the summed
/// objective before / after are written when non-null. Per-tensor specs return W unchanged.
Matrix awq_clip(const Matrix& W, const Matrix& H, const QuantSpec& spec, int grid, double max_shrink,
                Matrix* ratios = nullptr, double* error_before = nullptr, double* error_after = nullptr);

}  // namespace ql
