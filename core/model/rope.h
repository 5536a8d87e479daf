// RoPE frequency settings of a model (config.json's rope_theta and rope_scaling): data shared by
// the loader, the forward pass (core/model/ops.h computes the frequencies) and the architecture
// table.
#pragma once
#include <cstdint>
#include <string>

namespace ql {

/// RoPE's frequencies: rope_theta and config.json's rope_scaling, as transformers'
/// ROPE_INIT_FUNCTIONS compute them (every type here keeps attention_factor 1):
///   default  inv_freq_i = 1 / theta^(2i/d)
///   linear   inv_freq_i / factor                       (position interpolation)
///   dynamic  theta' = theta (factor L / L0 − (factor − 1))^(d/(d−2)) when the forward's length
///            L = max position + 1 exceeds L0 = max_position_embeddings, else theta (NTK-aware;
///            transformers recomputes per forward from the largest position id, so keys cached by
///            an earlier, shorter forward keep their old angles there too)
///   llama3   wavelength λ_i = 2π / inv_freq_i, L0 = original_max_position_embeddings:
///            λ > L0/low → inv_freq/factor; λ < L0/high → inv_freq; between: (1 − σ) inv_freq /
///            factor + σ inv_freq with σ = (L0/λ − low) / (high − low)
/// ("yarn" and "longrope" change the attention scale as well and are rejected by the loader.)
struct RopeSpec {
  enum class Scaling { None, Linear, Dynamic, Llama3 };
  double theta = 10000.0;
  Scaling scaling = Scaling::None;
  double factor = 1.0;
  double low_freq_factor = 1.0, high_freq_factor = 4.0;  ///< llama3
  int64_t original_max_position = 0;  ///< L0: llama3's original_max_position_embeddings, dynamic's max_position_embeddings
  RopeSpec() = default;
  RopeSpec(double theta_) : theta(theta_) {}  // NOLINT: plain RoPE from a theta is the common case
  /// "default", "linear", "dynamic", "llama3".
  std::string type_name() const;
};

}  // namespace ql
