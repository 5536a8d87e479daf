// zeroqat: "ZeroQAT: Your Quantization-aware Training but Efficient" / "End-to-End On-Device
// Quantization-Aware Training for LLMs at Inference Cost" (arXiv 2509.00031; ALGORITHMS.md §6).
// The model-scope plugin: after the block-sequential steps have quantized the model (the warm
// start: [rtn, zeroqat], [gptq, zeroqat], [smoothquant, rtn, zeroqat]), it trains a small set
// of latent parameters of the quantized model end to end on the calibration windows:
// per-group weight clipping logits on the warm start's grids, per-channel smoothing scales at
// the norm-produced inputs (folded into the norms) and, optionally, the float latent weights of
// chosen linears (core/model/qat_params.h). The loss gradient comes from SPSA with two forward
// passes per query (estimator: spsa, the paper's) or from a backward pass through the whole
// model with straight-through fake quantization (estimator: first_order, the baseline);
// algorithms/zeroqat/qat_trainer.h has the loop.
//
// Config keys (the step takes no weight grid: it trains on the grids the warm start left):
//   estimator        spsa | first_order (default spsa)
//   clip, smooth     bool (default true): train clipping logits / smoothing scales
//   latent_weights   regex over linear names whose float weights train (default none),
//                    e.g. 'model\.layers\.\d+\.self_attn\.(q|v)_proj'
//   loss             ce | kl (default ce): next-token cross-entropy or KL to the FP model
//   steps, batch     updates (default 100) and windows per step (default 4)
//   queries, eps     spsa: ± pairs per step (default 1) and ε (default 1e-3)
//   lr, lr_schedule, lr_end   learning rate (default 1e-3), constant | linear (to lr·lr_end)
//   weight_lr_scale           latent weights step at lr times this (default 1)
//   optimizer, weight_decay   first_order: adamw | sgd (default adamw), AdamW's decay (0)
//   heldout, eval_every       calibration windows held out (4) and the held-out loss period (10)
//   grad_check_every          spsa: cos(estimate, exact gradient) every k steps (0: never)
//   stochastic_perturbation   spsa + latent_weights: perturb the latent weights by whole grid
//                             steps, ε z / step stochastically rounded (ALGORITHMS.md §6.5)
//   tokens                    crop windows to their first `tokens` ids (0: as given)
//
// Results: diagnostics (parameter counts, held-out loss before / after, forwards, peak RSS of
// the training phase) and the run's `training` table (one row per step: forwards, training
// loss, held-out loss, gradient cosine and norm ratio, lr, seconds).
#pragma once

namespace ql {
class AlgorithmRegistry;
void register_zeroqat(AlgorithmRegistry& registry);
}  // namespace ql
