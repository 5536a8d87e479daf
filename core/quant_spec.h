// QuantSpec: the one description of a quantization grid used by every algorithm (ALGORITHMS.md
// §0.1, §1). Weights and activations share the scheme/range vocabulary; an activation spec adds
// per-token/per-tensor and dynamic/static.
#pragma once
#include <string>

#include "core/options.h"

namespace ql {

/// How integers map to reals for one slice x with range [lo, hi] (lo <= 0 <= hi always):
/// - Asym: scale = (hi - lo)/(2^b - 1), zero = round(-lo/scale), q in [0, 2^b - 1],
///   x^ = scale*(q - zero).
/// - Sym (true symmetric, signed grid): scale = max|x|/(2^(b-1) - 1), zero = 0,
///   q in [-2^(b-1), 2^(b-1) - 1].
/// - SymOffset (the GPTQ reference's "sym"): lo = -max|x|, scale = 2 max|x|/(2^b - 1), zero =
///   2^(b-1) on the unsigned grid q in [0, 2^b - 1]; offset by half a step from Sym. Unlike
///   the reference, a slice with no negative value still gets lo = -max|x| (the reference keeps
///   lo = 0 there and then clips every value above max|x|/2).
/// An all-zero slice uses the range [-1, 1] so the scale is never 0.
enum class QuantScheme { Asym, Sym, SymOffset };
/// The YAML name: "asym", "sym" or "sym_offset".
const char* scheme_name(QuantScheme s);

/// Which weights share one (scale, zero):
/// - PerTensor: the whole matrix;
/// - PerChannel: one output row;
/// - PerGroup: one row and group_size consecutive input columns. When group_size does not
///   divide d_in, the last group of each row is shorter (d_in mod group_size columns) and has
///   its own scale and zero; bits_per_weight() counts it exactly.
enum class Granularity { PerTensor, PerChannel, PerGroup };

/// How [lo, hi] is chosen for a slice:
/// - MinMax: lo = min(min x, 0), hi = max(max x, 0).
/// - Percentile: c = the `percentile`-th percentile of |x| in the slice (linear interpolation
///   between order statistics); range = [max(lo, -c), min(hi, c)] of MinMax's range.
/// - Mse: shrink the MinMax range by p = 1 - i/mse_grid, i = 0 .. floor(mse_maxshrink*mse_grid)-1
///   (at least i = 0; the reference's int(maxshrink*grid)),
///   and keep the p minimising sum |x^ - x|^mse_norm over the slice (IST-DASLab/gptq quant.py
///   recipe; norm 2.4). Asym recomputes the zero-point for each p; Sym/SymOffset keep theirs.
///   Each candidate is scored with its stored (e.g. fp16-rounded) scale. p = 1 is always a
///   candidate and ties keep the larger p, so Mse is never worse than MinMax on that objective.
/// Whatever the method, a final range [0, 0] becomes [-1, 1] (see QuantScheme).
enum class RangeMethod { MinMax, Percentile, Mse };

/// Per-element weights of the Mse search's objective: none, or llama.cpp's importance matrix
/// (input column j of a weight row weighs by the calibration mean x_j² of the layer's input:
/// the diagonal of the Hessian, so the search minimises the diagonal-H output error).
enum class MseWeights { None, Imatrix };

/// Storage type of scales (and float zero-points): F16 rounds every scale to IEEE half on
/// fitting, exactly as it would be stored; F32 keeps float (what the PyTorch references do).
enum class ScaleDtype { F16, F32 };

struct QuantSpec {
  int bits = 16;  ///< 2..8, or 16 = unquantized (no grid; fake_quant is the identity)
  QuantScheme scheme = QuantScheme::Asym;
  Granularity granularity = Granularity::PerChannel;
  int group_size = 128;  ///< used only with PerGroup
  RangeMethod range = RangeMethod::MinMax;
  double percentile = 99.9;  ///< with Percentile, in (0, 100]
  int mse_grid = 100;
  double mse_maxshrink = 0.8;
  double mse_norm = 2.4;
  MseWeights mse_weights = MseWeights::None;  ///< with range Mse only
  ScaleDtype scale_dtype = ScaleDtype::F16;

  bool quantized() const { return bits < 16; }
  int qmin() const;  ///< smallest code (negative for Sym)
  int qmax() const;  ///< largest code
  /// Short human-readable form, e.g. "w4 asym g128 minmax".
  std::string str() const;
};

/// The YAML keys of a QuantSpec (bits, scheme, granularity, group_size, range, percentile,
/// mse_grid, mse_maxshrink, mse_norm, mse_weights, scale_dtype), with the cross-field checks
/// (bits in 2..8 or 16, group_size >= 1 with granularity group, mse_weights only with range
/// mse, ...).
const OptionSchema<QuantSpec>& quant_spec_schema();

/// Activation quantization at a linear's input (SmoothQuant/FlatQuant use these).
enum class ActGranularity { PerToken, PerTensor };
enum class ActRangeMode { Dynamic, Static };

struct ActQuantSpec {
  int bits = 16;  ///< 16 = activations stay float
  QuantScheme scheme = QuantScheme::Sym;
  ActGranularity granularity = ActGranularity::PerToken;
  ActRangeMode mode = ActRangeMode::Dynamic;
  /// Every range (dynamic, or the static calibrated one) is multiplied by this clip ratio
  /// (1 = plain absmax / min-max).
  double clip_ratio = 1.0;

  bool quantized() const { return bits < 16; }
  std::string str() const;  ///< e.g. "a8 sym per-token dynamic"
};

/// Keys: bits, scheme, granularity (token|tensor), mode (dynamic|static), clip_ratio.
/// Static mode requires granularity tensor (one calibrated range per linear input).
const OptionSchema<ActQuantSpec>& act_quant_spec_schema();

}  // namespace ql
