// flatquant: learnable affine transforms with learnable clipping for W4A4 (FlatQuant,
// "FlatQuant: Flatness Matters for LLM Quantization", arXiv 2410.09426; ALGORITHMS.md §5). Per
// linear input a Kronecker transform P = P1 ⊗ P2 (factor sizes from the pair closest to
// sqrt(d)) in the SVD form with Cayley-parameterised orthogonal factors, a per-channel scale c
// before it (initialised SmoothQuant-style, alpha 0.3), learnable weight clipping per output row
// and learnable activation clipping per tensor, trained with AdamW (lr 5e-3, clipping logits
// 10x, weight decay 0.01 on every trained tensor) and a cosine schedule to lr x 1e-3 against
// the FP output, the MSE divided by its own detached value. Afterwards P and c are merged into
// the weights in double, the learned clipping applied to them, and the next pipeline step
// quantizes them ([flatquant, rtn] or [flatquant, gptq]); activations are quantized online after
// P with the learned clipping. The grids trained against are the run's: the first later weight
// step's (per-channel) and the input's activation quantizer (per-token, dynamic).
//
// Where it runs today: the synthetic suite's layers (one transform per linear input, trained
// against the layer's output: ALGORITHMS.md §5.6). The block-wise training of a transformer
// model (transforms on the q/k/v, gate/up and down inputs, P_v per head, P_o across heads, P_k)
// is not built yet: the pipeline rejects flatquant on model workloads with a ConfigError.
//
// Config keys: epochs (15), lr (5e-3), clip_lr_factor (10), weight_decay (0.01), diag_alpha
// (0.3), add_diag, lwc, lac (true), train_transform (true; false keeps P at its random start),
// seed (0), batch_tokens (128: calibration tokens per step on a standalone layer).
#pragma once

namespace ql {
class AlgorithmRegistry;
void register_flatquant(AlgorithmRegistry& registry);
}  // namespace ql
