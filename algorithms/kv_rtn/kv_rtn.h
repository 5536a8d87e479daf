// kv_rtn: scalar round-to-nearest quantization of the KV cache, the baseline every KV-cache
// paper compares with. Asymmetric grids on [min(x, 0), max(x, 0)] (core/model/kv_cache_quant.h):
//  - values per token, one grid per group of `channel_group` channels (0 = one per head);
//  - keys per token in the same way, or (keys: channel) per channel over chunks of
//    `token_group` tokens: KIVI's layout ("KIVI: A Tuning-Free Asymmetric 2bit Quantization for
//    KV Cache", arXiv 2402.02750), because key outliers sit in fixed channels;
//  - the `residual_length` most recent tokens (KIVI's R) stay exact, and a per-channel key
//    chunk is quantized only once complete (tokens of an incomplete chunk stay exact, as in
//    KIVI's streaming cache); R = 0 with per-token grids quantizes every token;
//  - keys quantized after RoPE (KIVI, FlatQuant) or before it (key_stage: pre_rope, KVQuant).
// FlatQuant's setting (its repository: K and V per token, one group per head, 4 bits, R = 0)
// is the default layout with k_bits = v_bits = 4.
// No calibration data are used by the grids; the calibration K/V are captured for the KV-cache
// scope's held-out error diagnostics (key/value MSE, attention-score error, top-8 agreement). Attention reads the quantized cache in evaluation windows and
// in incremental decoding (the cache then holds codes). kv_bits (summary) counts code bits,
// fp16 scales and zero-points and the exact tokens, at the evaluation window length.
//
// With per-token post-RoPE grids an earlier trained block step (flatquant) can learn the
// grids' clipping ratios against them (FlatQuant's LAC on K and V); they are used unless
// learned_clip is false.
//
// Config keys (no weight grid): k_bits, v_bits (1..8 or 16 = exact; default 4), keys
// (token | channel), channel_group, token_group (default 32), residual_length (default 0),
// key_stage (post_rope | pre_rope), learned_clip (true). The step's targets/ignore regexes
// match the block's attention, "model.layers.<b>.self_attn" (e.g. ignore:
// ["model\\.layers\\.0\\..*"] keeps block 0's cache exact).
#pragma once

namespace ql {
class AlgorithmRegistry;
void register_kv_rtn(AlgorithmRegistry& registry);
}  // namespace ql
