// The numeric mode of result computations and the numeric environment that produced them.
//
// Two modes (config key `numerics`, CLI `--portable`):
//   fast      every matrix product runs on the system OpenBLAS. OpenBLAS picks its kernels for
//             the CPU at load time (or as OPENBLAS_CORETYPE says), and kernels differ in their
//             summation order and in fusing multiply-adds, so results are bitwise reproducible
//             for one machine, one BLAS build and one kernel choice only (any thread count).
//   portable  every product on a result path runs on quantlab's own kernels
//             (core/portable_blas.h), whose per-element arithmetic is fixed by their contract
//             (a sequential k-sum of separately rounded products, no FMA) and does not depend on
//             the instruction set they are vectorised for. With the elementary functions of
//             core/detmath.h (used in both modes instead of the C library's, whose results
//             depend on the CPU's FMA support), results are bitwise identical across x86-64
//             machines running the same build.
// The mode is process-wide state like the OpenMP thread count: the runner sets it for each run
// with a NumericsScope; core/linalg.h reads it on every call. Set it only outside parallel
// regions.
#pragma once
#include <string>
#include <utility>
#include <vector>

namespace ql {

enum class Numerics { Fast, Portable };

const char* numerics_name(Numerics n);  ///< "fast" / "portable"
/// Parses "fast" / "portable"; throws ql::Error naming the valid values otherwise.
Numerics parse_numerics(const std::string& name);

/// The mode products use now (Fast unless a NumericsScope says otherwise).
Numerics current_numerics();

/// Sets the mode for its lifetime and restores the previous one.
class NumericsScope {
 public:
  explicit NumericsScope(Numerics n);
  ~NumericsScope();
  NumericsScope(const NumericsScope&) = delete;
  NumericsScope& operator=(const NumericsScope&) = delete;

 private:
  Numerics saved_;
};

/// What a result depends on beyond the config and the code revision: the BLAS library and the
/// kernels it chose, the CPU and its vector extensions, the C library, the compiler and its
/// flags, Eigen, the portable kernels' instruction set, the thread count and the mode.
/// Recorded with every run (HDF5 attributes `numerics.*`) and printed by `quantlab --version`.
struct NumericEnvironment {
  std::vector<std::pair<std::string, std::string>> fields;  ///< (key, value), stable order
  /// The value of `key`, or "" when absent.
  std::string get(const std::string& key) const;
  /// "key: value" lines.
  std::string to_text() const;
};

/// The environment of this process now, with the given mode and thread count.
NumericEnvironment numeric_environment(Numerics mode, int threads);

}  // namespace ql
