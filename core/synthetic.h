// Synthetic layer-suite workload: independent named linear layers, each with a weight matrix
// and its own calibration and evaluation inputs, for experiments that need no checkpoint.
//
// Why not white noise (ALGORITHMS.md §2.6): with x ~ N(0, I) the Hessian XᵀX is isotropic and
// GPTQ, AWQ and SmoothQuant all collapse onto RTN (RTN/GPTQ error ratio 1.05x instead of
// ~10x). Inputs here are correlated with a power-law spectrum and carry outlier channels:
//
//   x = M_p U_l D_p z + shift_p * sqrt(d_in) * v_l,     z ~ N(0, I_{d_in})
//
//   U_l   per-layer Gaussian d_in x d_in matrix / sqrt(d_in) (the §2.6 toy's mixing matrix A;
//         being a square Gaussian matrix it is itself ill-conditioned, as real H's are)
//   D_p   diag((1 + j)^-input_decay_p), j = 0 .. d_in-1 (mixing column scales)
//   M_p   diag with outlier_magnitude_p on the first outlier_channels_p entries of the layer's
//         one seeded channel permutation, 1 elsewhere. Populations share the permutation, so a
//         population with more outliers has the others' outlier channels plus extra ones.
//   v_l   per-layer random unit vector; the shift is added after the outlier scaling (a pure
//         mean shift of the population).
//
// Evaluation tokens come in units (document-like groups of unit_tokens tokens; the bootstrap
// of core/slices.h resamples units), each drawn from one labelled population, which becomes
// the `population` slice. Weights are gaussian or student_t with std 1/sqrt(d_in).
//
// Determinism: every random element is a pure function of (seed, stream, index) through
// CounterRng; streams are keyed by (layer name, purpose, population name), so a layer's data do
// not depend on which other layers or populations exist. U D z is a float GEMM computed over
// fixed 256-row chunks whose boundaries do not depend on the thread count (each chunk one
// single-threaded tile call of core/linalg.h inside the OpenMP loop), so the suite is bitwise
// identical for any thread count (and, in portable numerics, on any x86-64 machine). generate_suite is thread-safe (no shared mutable state).
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/options.h"
#include "core/tensor.h"

namespace ql {

/// One `layers:` entry. count > 1 expands to name.0 .. name.{count-1}.
struct SyntheticLayerSpec {
  std::string name;
  int d_in = 256;
  int d_out = 256;
  int count = 1;
};

/// One `populations:` entry. Unset overrides take the suite-level value.
struct SyntheticPopulationSpec {
  std::string name;
  double share = 1.0;                      ///< in (0, 1]; all shares sum to 1
  std::optional<double> input_decay;
  std::optional<int> outlier_channels;
  std::optional<double> outlier_magnitude;
  double shift = 0.0;                      ///< mean shift along v_l, in units of sqrt(d_in)
};

enum class WeightDist { Gaussian, StudentT };

/// The `workload:` section of kind synthetic (defaults give a small transformer-like suite).
struct SyntheticSpec {
  std::vector<SyntheticLayerSpec> layers = {{"attn.qkv", 256, 768, 1},
                                            {"attn.o", 256, 256, 1},
                                            {"mlp.up", 256, 1024, 1},
                                            {"mlp.down", 1024, 256, 1}};
  WeightDist weight_dist = WeightDist::StudentT;
  double weight_df = 5.0;           ///< student_t degrees of freedom, > 2
  double input_decay = 0.7;
  int outlier_channels = 4;
  double outlier_magnitude = 10.0;
  // Data sizes. Not workload keys: the experiment config sets them from its `calib:` (tokens,
  // populations) and `eval:` (units, unit_tokens) sections before parsing the workload, so the
  // validator sees the real values.
  int calib_tokens = 1024;
  int eval_units = 128;
  int unit_tokens = 32;
  std::vector<SyntheticPopulationSpec> populations = {
      {"majority", 0.8, std::nullopt, std::nullopt, std::nullopt, 0.0},
      {"minority", 0.2, 0.4, 8, 25.0, 0.0}};
  /// Populations calibration draws from, split by renormalised share in this order;
  /// empty = all populations in declaration order.
  std::vector<std::string> calib_populations;
};

/// Parses, validates and emits SyntheticSpec. emit() writes the canonical resolved form:
/// every key, calib_populations spelled out, and every population's input_decay /
/// outlier_channels / outlier_magnitude resolved against the suite-level values, so equal
/// workloads emit (and hash) equally and parse(emit(x)) emits emit(x) again.
/// Validation (ConfigError at the offending key): unique non-empty layer names after count
/// expansion; non-empty unique population names; shares summing to 1 (error at the list);
/// weight_df > 2; every outlier count (suite or population) <= the smallest d_in; known and
/// unique calib_populations (closest name suggested); every population gets >= 1 evaluation
/// unit and every calibration population >= 1 calibration token.
const OptionSchema<SyntheticSpec>& synthetic_spec_schema();

/// Same checks as the schema's validator for a spec built in code (ConfigError with key paths
/// relative to `path`, no file location).
void validate_synthetic_spec(const SyntheticSpec& spec, const std::string& path = "workload");

/// Layer names after count expansion, in suite order.
std::vector<std::string> synthetic_layer_names(const SyntheticSpec& spec);

/// Index of the population of each evaluation unit: unit u belongs to population k when
/// round(c_{k-1} * eval_units) <= u < round(c_k * eval_units), c_k the cumulative share (so the
/// first round(share_0 * eval_units) units go to population 0 and the last takes the rest).
std::vector<int> synthetic_unit_populations(const SyntheticSpec& spec);

/// The layer's seeded channel permutation (length d_in); a population with k outlier channels
/// scales channels order[0 .. k-1]. Depends only on (seed, layer name, d_in).
std::vector<Index> synthetic_outlier_order(uint64_t seed, const std::string& layer_name,
                                           Index d_in);

struct SyntheticLayer {
  std::string name;
  Matrix W;        ///< d_out x d_in
  Matrix X_calib;  ///< calib_tokens x d_in, population blocks in calib_populations order
  Matrix X_eval;   ///< (eval_units * unit_tokens) x d_in, unit-major: row u*unit_tokens + t
};

struct SyntheticSuite {
  std::vector<SyntheticLayer> layers;          ///< in synthetic_layer_names order
  std::vector<std::string> unit_ids;           ///< "u0000", "u0001", ...
  std::vector<std::string> unit_population;    ///< population name of each unit
  Index unit_tokens = 0;
  std::vector<std::string> population_names;  ///< declaration order
  /// The calibration rows' population blocks: names in calib_populations order and row counts.
  std::vector<std::string> calib_population_names;
  std::vector<Index> calib_population_rows;
};

/// Generate the suite (validates `spec` first). Memory: per layer d_out*d_in +
/// (calib_tokens + eval_units*unit_tokens)*d_in floats, plus a d_in^2 scratch.
SyntheticSuite generate_suite(const SyntheticSpec& spec, uint64_t seed);

}  // namespace ql
