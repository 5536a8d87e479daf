// rotation: fixed random orthogonal transforms in FlatQuant's slots, without training
// (QuaRot, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", arXiv 2404.00456, without
// its fused kernels). An orthogonal P spreads an outlier channel's energy over all channels, so
// per-token activation grids and per-channel weight grids lose less to a few large values;
// the model's function is unchanged because each P is merged into the weights as P⁻ᵀ = P.
// Slots (core/model/architecture.h): P_a on the q/k/v input and P_ug on the gate/up input
// (online, Kronecker P1 ⊗ P2 with FlatQuant's factor sizes, 256 -> 16 x 16, 768 -> 24 x 32),
// P_d on down_proj's input (online, Kronecker), P_v per kv head on v_proj's output (merged
// into v_proj and o_proj, no online cost), P_o across heads on o_proj's input (online), and P_k
// per head on keys and queries after RoPE (online) when a KV-cache step follows (keys: auto).
// This is FlatQuant's transform structure with its starting point: FlatQuant learns the same
// objects (flatquant.json's rotation rows draw them the same way, with numpy).
//
// Config keys (no weight grid): seed (default 0; the draws of block b, slot s, factor f come from
// CounterRng(mix(seed, ...))), matrix (haar: Q of the QR of a Gaussian with sign-fixed columns;
// hadamard: a randomized Hadamard matrix where the factor size is a power of two, Haar
// otherwise), kronecker (default true; false = one dense P per q/k/v, gate/up, down input),
// keys (auto | on | off: P_k when a KV-cache step follows / always / never).
// The step's targets/ignore regexes match the block, "model.layers.<b>".
// Deliberate difference from QuaRot: transforms sit online after each RMSNorm (FlatQuant's
// placement) instead of being fused into the residual stream, so no norm weights move.
#pragma once

namespace ql {
class AlgorithmRegistry;
void register_rotation(AlgorithmRegistry& registry);
}  // namespace ql
