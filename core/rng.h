// Counter-based random numbers (Random123 Philox4x32-10). A value is a pure function of
// (seed, stream, index), so any element of any random array can be produced by any thread in
// any order: generated data and bootstrap replicates are identical for every thread count.
#pragma once
#include <Random123/philox.h>

#include <cmath>
#include <cstdint>
#include "core/detmath.h"

namespace ql {

class CounterRng {
 public:
  /// `seed` is the user's seed; `stream` separates independent uses (a layer, a population,
  /// a bootstrap replicate, ...).
  CounterRng(uint64_t seed, uint64_t stream) {
    key_ = {{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)}};
    stream_ = stream;
  }
  /// Four independent 32-bit words for counter `index`.
  r123::Philox4x32::ctr_type words(uint64_t index) const {
    r123::Philox4x32::ctr_type c = {{static_cast<uint32_t>(index),
                                     static_cast<uint32_t>(index >> 32),
                                     static_cast<uint32_t>(stream_),
                                     static_cast<uint32_t>(stream_ >> 32)}};
    return r123::Philox4x32()(c, key_);
  }
  /// Uniform in the open interval (0, 1), 53 bits.
  double uniform(uint64_t index) const {
    auto w = words(index);
    uint64_t bits = (static_cast<uint64_t>(w[0]) << 21) ^ (static_cast<uint64_t>(w[1]) >> 11);
    bits &= (uint64_t(1) << 53) - 1;
    return (static_cast<double>(bits) + 0.5) * (1.0 / 9007199254740992.0);
  }
  /// Standard normal (Box-Muller on two 53-bit uniforms from the same counter).
  double normal(uint64_t index) const {
    auto w = words(index);
    uint64_t a = ((static_cast<uint64_t>(w[0]) << 21) ^ (w[1] >> 11)) & ((uint64_t(1) << 53) - 1);
    uint64_t b = ((static_cast<uint64_t>(w[2]) << 21) ^ (w[3] >> 11)) & ((uint64_t(1) << 53) - 1);
    double u1 = (static_cast<double>(a) + 0.5) / 9007199254740992.0;
    double u2 = (static_cast<double>(b) + 0.5) / 9007199254740992.0;
    return std::sqrt(-2.0 * detmath::log(u1)) * detmath::cos(6.283185307179586 * u2);
  }
  /// Uniform integer in [0, n) (n >= 1), by 64-bit multiply-shift (bias < 2^-32 for n < 2^32).
  uint64_t below(uint64_t index, uint64_t n) const {
    auto w = words(index);
    uint64_t x = (static_cast<uint64_t>(w[0]) << 32) | w[1];
    return static_cast<uint64_t>((static_cast<unsigned __int128>(x) * n) >> 64);
  }

 private:
  r123::Philox4x32::key_type key_;
  uint64_t stream_;
};

/// Mix several integers into one stream id (splitmix64 steps), for nested streams such as
/// (layer, population, purpose).
inline uint64_t mix_stream(uint64_t a, uint64_t b) {
  uint64_t z = a * 0x9E3779B97F4A7C15ull + b + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace ql
