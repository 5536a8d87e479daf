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
// On a transformer model (block scope, the reference's placement, block_graph.h): P_a on the
// q/k/v input, P_ug on the gate/up input, P_d on the down input (each Kronecker with a channel
// scale), P_v per KV head on v_proj's output (merged into v and o) and P_o across heads before
// o_proj; every linear its own LWC and LAC. Trained block by block on the block's calibration
// inputs against the FP block's outputs (set calib.propagate: fp, as the reference), batches of
// batch_size windows in order. When installed (QuantizedModel::apply_transforms) the channel
// scales are folded into input_layernorm, post_attention_layernorm and up_proj's rows, so only
// the Kronecker products stay online, as the reference deploys them.
// With a later kv_rtn step of per-token post-RoPE grids (FlatQuant's W4A4KV4 setting), P_k per
// head after RoPE (P_k⁻ᵀ on the queries) and the K and V grids' clipping train with the block
// against those grids, and kv_rtn uses the learned clipping; a KV cache the graph cannot
// simulate (CommVQ, per-channel keys) gets a random orthogonal P_k. Deviation: q/k/v biases
// (Qwen2) are not in the training graph (ShapeError). On the synthetic suite's layers
// (ALGORITHMS.md §5.6) one transform per linear input is trained against the layer's output.
//
// Config keys: parameterisation (svd | direct_inverse: the factor matrices themselves, inverted
// in double), epochs (15), lr (5e-3), clip_lr_factor (10), weight_decay (0.01), diag_alpha
// (0.3), add_diag, lwc, lac (true), train_transform (true; false keeps P at its random start),
// train_kv (true), seed (0), batch_size (4 windows per step on a model), batch_tokens (128:
// calibration tokens per step on a standalone layer).
#pragma once

namespace ql {
class AlgorithmRegistry;
void register_flatquant(AlgorithmRegistry& registry);
}  // namespace ql
