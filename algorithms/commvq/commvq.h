// commvq: RoPE-commutative vector quantization of the KV cache ("CommVQ: Commutative Vector
// Quantization for KV Cache Compression", arXiv 2506.18879, ICML 2025; ALGORITHMS.md §7).
//
// Per block and group of KV heads (core/model/kv_vq.h): keys captured before RoPE, each
// token's group vector L2-normalised (norm stored in fp16), encoded by S residual stages of
// 2 x sub_bits bits whose codewords are, per RoPE pair, u[A] + i·u[B] — a 2x2 block
// [[a, b], [−b, a]] that commutes with every RoPE rotation — fitted by annealed soft EM with
// the structured closed-form M-step (core/vq.h). Stages: as many as the bit budget allows,
// floor(k_bits · group width / (2 · sub_bits)) (21 for 2 bits on 128 channels, the
// reference's setting; 10 for 1 bit). Group: the whole KV heads whose width is closest to 128
// (128 when the heads allow; the shared model's 4 heads x 32; 5 heads x 32 -> one group of
// 160), or group_heads.
//
// DEVIATION from the paper, stated: values use a residual additive codebook fitted by the same
// EM without the structural constraint (Free), after the paper's per-channel scale (mean |v|)
// and per-token norm, instead of the paper's trained encoder (LayerNorm -> Linear -> GELU ->
// Linear with Gumbel-softmax codes), which needs end-to-end training.
//
// Ablation: keys: free fits an unconstrained residual VQ of the same bit budget; it does not
// commute with RoPE, so it quantizes keys after RoPE (key_stage: post_rope, default) or
// before it and decodes each token (pre_rope).
//
// The codebooks are fitted on the first 3/4 of the calibration windows (at most train_tokens
// rows, evenly strided); the diagnostics are measured on the last 1/4 (held out): key/value
// relative MSE, attention-score relative error (Frobenius, causal entries, every head) and
// top-k agreement of each query's k highest-scoring keys, and per group and stage the EM
// steps and the MSE after the stage. Attention reads R = residual_length recent tokens exact.
// Incremental decoding can score the encoded keys without decoding them
// (vq_key_scores_fast in core/model/kv_vq.h).
#pragma once

namespace ql {
class AlgorithmRegistry;
void register_commvq(AlgorithmRegistry& registry);
}  // namespace ql
