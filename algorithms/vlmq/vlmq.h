// vlmq: "VLMQ: Efficient Post-Training Quantization for Large Vision-Language Models via Hessian
// Augmentation" (arXiv 2508.03351; ALGORITHMS.md §8). GPTQ weighs every calibration token alike
// (H = XᵀX/n); when one population of tokens is redundant and numerous it dominates H and the
// few tokens that matter are under-served. VLMQ minimises ‖(W − Ŵ) Xᵀ G^½‖²_F instead, with
// G = diag(g_t) from a block-local first-order signal (§8.1: ΔL ≈ Σ_t ⟨∂L/∂y_t, δy_t⟩), so the
// Hessian becomes H̃ = Σ_t g_t x_t x_tᵀ / Σ_t g_t and the GPTQ solver runs on it unchanged
// (act-order, groups, damping escalation: gptq_solve).
//
// Token importance, once per block before its linears are quantized (the runner then captures
// the block's Hessians weighted by g):
//   1. Forward the block on its calibration inputs (as quantized upstream) with its weights
//      rounded to the step's grid (RTN), and take the block loss L = Σ_t |y_t − y*_t|² (`loss:
//      mse`) or Σ_t |y_t − y*_t|² / |y*_t|² (`loss: relative`) against the FP block's output
//      y* on the same inputs. (The loss needs a perturbed block: on its FP weights the block
//      reproduces y* exactly and every gradient is 0. The paper's exact target is not public;
//      ALGORITHMS.md §8.1 "Unknown".) On the synthetic suite a layer is its own block: the
//      loss is its output error, read at its output.
//      Why `relative` exists: with `mse` the gradient at token t is 2 (Q(W) − W) x_t, whose
//      norm grows with |x_t|, so g favours the loud tokens that already dominate H. On the
//      §8.6 suite (configs/paper/vlmq_synthetic.yaml, README) that raises the minority's
//      error; the relative loss lowers it.
//   2. Backward (core/model/block_grad: block_bwd) to the gradient site: `qkvo` (the paper's
//      q/k/v/o projection outputs, concatenated per token) or `output` (the block output).
//   3. g_t = the L1 or L2 norm (`norm`) of token t's gradient there.
//   4. Clip g at its `clip_percentile` over all calibration tokens of the block (100 = off),
//      optionally replace it per calibration source (`population: average`: every token gets
//      its source's mean g; `balance`: every source the same total weight, gradients unused:
//      the per-population ablation of §8.5), then normalise to mean 1 (H̃'s scale, and so
//      percdamp's meaning, stay GPTQ's).
//
// Config keys: gptq's (percdamp, blocksize, act_order, static_groups, damp_schedule, group_fit,
// compare_rtn) and loss (mse | relative, default mse), site (qkvo | output, default qkvo),
// norm (l1 | l2, default l2), clip_percentile ((0, 100], default 99), population (none |
// average | balance, default none; sources are the calibration mixture's on a model and the
// calibration populations on the synthetic suite).
//
// Diagnostics per block (layer model.layers.<b>): effective_tokens (Σg)²/Σg² over the block's
// calibration tokens, importance_max (max g after normalisation), importance_share.<source>
// (share of Σg per calibration source), importance_seconds; per input group
// (model.layers.<b>.<group>) cond_ratio = cond(H̃)/cond(H), both damped by 1% of their mean
// diagonal; per linear gptq's diagnostics.
#pragma once
#include <vector>

#include "core/tensor.h"

namespace ql {
class AlgorithmRegistry;
void register_vlmq(AlgorithmRegistry& registry);

/// Steps 3-4 on raw per-token gradient norms (per window): clip at `percentile` of all tokens
/// (100: no clip), then mean 1 over all tokens. Population averaging is separate.
/// NumericError when every norm is 0 or one is negative / not finite.
std::vector<Vector> normalise_importance(std::vector<Vector> g, double percentile);

}  // namespace ql
