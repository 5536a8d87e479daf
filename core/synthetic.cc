#include "core/synthetic.h"

#include "core/detmath.h"
#include "core/hash.h"
#include "core/linalg.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <set>

#include "core/parallel.h"
#include "core/rng.h"

namespace ql {
namespace {

constexpr int kMaxDim = 1 << 16;
constexpr int kMaxTokens = 1 << 24;
constexpr double kShareTolerance = 1e-6;
// Rows per GEMM chunk. Fixed so that chunk boundaries, hence every BLAS call's shape and
// summation order, do not depend on the thread count.
constexpr Index kChunkRows = 256;

// Purposes: one CounterRng stream each per layer (and per population where noted).
enum Purpose : uint64_t {
  kWeightNormal = 1,
  kWeightChi2 = 2,
  kBasis = 3,
  kOutlierPerm = 4,
  kShiftDir = 5,
  kCalibZ = 6,  // per population
  kEvalZ = 7,   // per population
};

// Streams are keyed by names (FNV-1a) so a layer's or population's data do not change when
// other layers or populations are added, removed or reordered.
inline uint64_t name_key(const std::string& s) { return fnv1a64(s); }

uint64_t layer_stream(const std::string& layer, Purpose p) {
  return mix_stream(name_key(layer), p);
}
uint64_t population_stream(const std::string& layer, Purpose p, const std::string& pop) {
  return mix_stream(layer_stream(layer, p), name_key(pop));
}

// ---- resolved per-population parameters ----
struct PopParams {
  double decay;
  int outliers;
  double magnitude;
  double shift;
};
PopParams resolve(const SyntheticSpec& s, const SyntheticPopulationSpec& p) {
  return {p.input_decay.value_or(s.input_decay), p.outlier_channels.value_or(s.outlier_channels),
          p.outlier_magnitude.value_or(s.outlier_magnitude), p.shift};
}

// Cumulative-rounding split of `total` items by `weights` (normalised here): block k is
// [b[k], b[k+1]) with b[k] = round(c_k * total), the last block ending at total.
std::vector<long long> split_bounds(const std::vector<double>& weights, long long total) {
  double sum = 0;
  for (double w : weights) sum += w;
  std::vector<long long> b(weights.size() + 1, 0);
  double c = 0;
  for (std::size_t k = 0; k + 1 < weights.size(); ++k) {
    c += weights[k];
    b[k + 1] = std::min<long long>(total, std::llround(c / sum * static_cast<double>(total)));
    b[k + 1] = std::max(b[k + 1], b[k]);
  }
  b[weights.size()] = total;
  return b;
}

std::vector<std::string> resolved_calib_names(const SyntheticSpec& s) {
  if (!s.calib_populations.empty()) return s.calib_populations;
  std::vector<std::string> all;
  for (auto& p : s.populations) all.push_back(p.name);
  return all;
}

int population_index(const SyntheticSpec& s, const std::string& name) {
  for (std::size_t i = 0; i < s.populations.size(); ++i)
    if (s.populations[i].name == name) return static_cast<int>(i);
  return -1;
}

std::string join_names(const std::vector<std::string>& v) {
  std::string out;
  for (auto& s : v) out += (out.empty() ? "" : ", ") + s;
  return out;
}

// Locates keys of the section for validation errors; with no map (spec built in code) every
// location is unknown and only the key path is reported.
class Locator {
 public:
  Locator(const ConfigNode* map, std::string path) : map_(map), path_(std::move(path)) {}
  std::string path(const std::string& key) const { return join_path(path_, key); }
  std::string path(const std::string& key, std::size_t i) const {
    return join_path(path(key), std::to_string(i));
  }
  std::string path(const std::string& key, std::size_t i, const std::string& sub) const {
    return join_path(path(key, i), sub);
  }
  SourceLoc loc(const std::string& key) const {
    if (!map_ || !map_->is_map()) return map_ ? map_->loc() : SourceLoc{};
    const ConfigNode* n = map_->find(key);
    return n ? n->loc() : map_->loc();
  }
  SourceLoc loc(const std::string& key, std::size_t i) const {
    const ConfigNode* item = item_node(key, i);
    return item ? item->loc() : loc(key);
  }
  SourceLoc loc(const std::string& key, std::size_t i, const std::string& sub) const {
    const ConfigNode* item = item_node(key, i);
    if (!item) return loc(key);
    if (item->is_map())
      if (const ConfigNode* n = item->find(sub)) return n->loc();
    return item->loc();
  }

 private:
  const ConfigNode* item_node(const std::string& key, std::size_t i) const {
    if (!map_ || !map_->is_map()) return nullptr;
    const ConfigNode* n = map_->find(key);
    if (!n || !n->is_sequence() || i >= n->size()) return nullptr;
    return &n->at(i);
  }
  const ConfigNode* map_;
  std::string path_;
};

void check_spec(const SyntheticSpec& s, const Locator& at) {
  // Layers: names unique after count expansion.
  if (s.layers.empty())
    throw ConfigError(at.loc("layers"), at.path("layers"), "expected at least one layer");
  std::set<std::string> seen;
  int min_d_in = kMaxDim;
  std::string min_d_in_layer;
  for (std::size_t i = 0; i < s.layers.size(); ++i) {
    const auto& L = s.layers[i];
    if (L.name.empty())
      throw ConfigError(at.loc("layers", i, "name"), at.path("layers", i, "name"),
                        "expected a non-empty layer name");
    if (L.d_in < 1 || L.d_out < 1 || L.count < 1)
      throw ConfigError(at.loc("layers", i), at.path("layers", i),
                        "d_in, d_out and count must be >= 1");
    if (L.d_in < min_d_in) {
      min_d_in = L.d_in;
      min_d_in_layer = L.name;
    }
    for (int c = 0; c < L.count; ++c) {
      std::string name = L.count == 1 ? L.name : L.name + "." + std::to_string(c);
      if (!seen.insert(name).second)
        throw ConfigError(at.loc("layers", i, "name"), at.path("layers", i, "name"),
                          "layer name '" + name + "' is not unique after count expansion");
    }
  }

  if (!(s.weight_df > 2.0) || !std::isfinite(s.weight_df))
    throw ConfigError(at.loc("weight_df"), at.path("weight_df"),
                      "expected a number > 2 (finite weight variance), found '" +
                          format_double(s.weight_df) + "'");
  if (s.outlier_channels < 0 || s.outlier_channels > min_d_in)
    throw ConfigError(at.loc("outlier_channels"), at.path("outlier_channels"),
                      "outlier_channels " + std::to_string(s.outlier_channels) +
                          " must be in [0, d_in]; layer '" + min_d_in_layer + "' has d_in " +
                          std::to_string(min_d_in));
  if (!(s.outlier_magnitude >= 1.0))
    throw ConfigError(at.loc("outlier_magnitude"), at.path("outlier_magnitude"),
                      "expected a number >= 1, found '" + format_double(s.outlier_magnitude) + "'");
  if (s.calib_tokens < 1 || s.unit_tokens < 1 || s.eval_units < 2)
    throw ConfigError(at.loc("eval_units"), at.path("eval_units"),
                      "need calib_tokens >= 1, unit_tokens >= 1 and eval_units >= 2");
  if (static_cast<long long>(s.eval_units) * s.unit_tokens > kMaxTokens)
    throw ConfigError(at.loc("unit_tokens"), at.path("unit_tokens"),
                      "eval_units * unit_tokens = " +
                          std::to_string(static_cast<long long>(s.eval_units) * s.unit_tokens) +
                          " evaluation tokens per layer exceeds " + std::to_string(kMaxTokens));

  // Populations.
  if (s.populations.empty())
    throw ConfigError(at.loc("populations"), at.path("populations"),
                      "expected at least one population");
  std::set<std::string> pop_names;
  double share_sum = 0;
  for (std::size_t i = 0; i < s.populations.size(); ++i) {
    const auto& p = s.populations[i];
    if (p.name.empty())
      throw ConfigError(at.loc("populations", i, "name"), at.path("populations", i, "name"),
                        "expected a non-empty population name");
    if (!pop_names.insert(p.name).second)
      throw ConfigError(at.loc("populations", i, "name"), at.path("populations", i, "name"),
                        "population name '" + p.name + "' is not unique");
    if (!(p.share > 0.0 && p.share <= 1.0))
      throw ConfigError(at.loc("populations", i, "share"), at.path("populations", i, "share"),
                        "expected a share in (0, 1], found '" + format_double(p.share) + "'");
    share_sum += p.share;
    PopParams r = resolve(s, p);
    if (r.outliers < 0 || r.outliers > min_d_in) {
      bool own = p.outlier_channels.has_value();
      throw ConfigError(
          own ? at.loc("populations", i, "outlier_channels") : at.loc("outlier_channels"),
          own ? at.path("populations", i, "outlier_channels") : at.path("outlier_channels"),
          "outlier_channels " + std::to_string(r.outliers) + " of population '" + p.name +
              "' must be in [0, d_in]; layer '" + min_d_in_layer + "' has d_in " +
              std::to_string(min_d_in));
    }
    if (!(r.magnitude >= 1.0))
      throw ConfigError(at.loc("populations", i, "outlier_magnitude"),
                        at.path("populations", i, "outlier_magnitude"),
                        "expected a number >= 1, found '" + format_double(r.magnitude) + "'");
    if (!(r.decay >= 0.0) || !std::isfinite(r.decay) || !std::isfinite(r.shift))
      throw ConfigError(at.loc("populations", i), at.path("populations", i),
                        "input_decay must be >= 0 and shift finite");
  }
  if (std::fabs(share_sum - 1.0) > kShareTolerance)
    throw ConfigError(at.loc("populations"), at.path("populations"),
                      "population shares must sum to 1, found " + format_double(share_sum));

  std::vector<double> shares;
  for (auto& p : s.populations) shares.push_back(p.share);
  auto ub = split_bounds(shares, s.eval_units);
  for (std::size_t k = 0; k < s.populations.size(); ++k)
    if (ub[k + 1] == ub[k])
      throw ConfigError(at.loc("eval_units"), at.path("eval_units"),
                        std::to_string(s.eval_units) + " evaluation units leave population '" +
                            s.populations[k].name + "' (share " +
                            format_double(s.populations[k].share) +
                            ") with no unit; raise eval_units");

  // Calibration populations: known, unique, each getting at least one token.
  std::vector<std::string> known(pop_names.begin(), pop_names.end());
  std::set<std::string> calib_seen;
  for (std::size_t i = 0; i < s.calib_populations.size(); ++i) {
    const std::string& n = s.calib_populations[i];
    if (!pop_names.count(n)) {
      std::string msg = "unknown population '" + n + "'";
      std::string near = closest_match(n, known);
      if (!near.empty()) msg += "; did you mean '" + near + "'?";
      std::vector<std::string> decl;
      for (auto& p : s.populations) decl.push_back(p.name);
      msg += " (populations: " + join_names(decl) + ")";
      throw ConfigError(at.loc("calib_populations", i), at.path("calib_populations", i), msg);
    }
    if (!calib_seen.insert(n).second)
      throw ConfigError(at.loc("calib_populations", i), at.path("calib_populations", i),
                        "population '" + n + "' is listed twice");
  }
  std::vector<std::string> cnames = resolved_calib_names(s);
  std::vector<double> cshares;
  for (auto& n : cnames) cshares.push_back(s.populations[population_index(s, n)].share);
  auto cb = split_bounds(cshares, s.calib_tokens);
  for (std::size_t k = 0; k < cnames.size(); ++k)
    if (cb[k + 1] == cb[k])
      throw ConfigError(at.loc("calib_tokens"), at.path("calib_tokens"),
                        std::to_string(s.calib_tokens) + " calibration tokens leave population '" +
                            cnames[k] + "' with none; raise calib_tokens");
}

// ---- parsing of the list-valued keys ----
void expect_map_item(const ConfigNode& item, const std::string& path, const char* what) {
  if (!item.is_map())
    throw ConfigError(item.loc(), path,
                      std::string("expected a map describing a ") + what + ", found '" +
                          item.to_flow() + "'");
}

void parse_layers(SyntheticSpec& t, const ConfigNode& n, const std::string& path) {
  if (!n.is_sequence())
    throw ConfigError(n.loc(), path, "expected a list of layers, found '" + n.to_flow() + "'");
  if (n.size() == 0) throw ConfigError(n.loc(), path, "expected at least one layer");
  static const std::vector<std::string> keys = {"name", "d_in", "d_out", "count"};
  std::vector<SyntheticLayerSpec> out;
  for (std::size_t i = 0; i < n.size(); ++i) {
    const ConfigNode& item = n.at(i);
    std::string ip = join_path(path, std::to_string(i));
    expect_map_item(item, ip, "layer");
    SyntheticLayerSpec L;
    bool has_name = false;
    for (auto& [k, v] : item.entries()) {
      std::string kp = join_path(ip, k);
      if (k == "name") {
        L.name = read_string(v, kp);
        has_name = true;
      } else if (k == "d_in") {
        L.d_in = static_cast<int>(read_int(v, kp, 1, kMaxDim));
      } else if (k == "d_out") {
        L.d_out = static_cast<int>(read_int(v, kp, 1, kMaxDim));
      } else if (k == "count") {
        L.count = static_cast<int>(read_int(v, kp, 1, 1 << 16));
      } else {
        throw_unknown_key(item, k, ip, keys);
      }
    }
    if (!has_name) throw ConfigError(item.loc(), ip, "missing required key 'name'");
    out.push_back(L);
  }
  t.layers = std::move(out);
}

void parse_populations(SyntheticSpec& t, const ConfigNode& n, const std::string& path) {
  if (!n.is_sequence())
    throw ConfigError(n.loc(), path,
                      "expected a list of populations, found '" + n.to_flow() + "'");
  if (n.size() == 0) throw ConfigError(n.loc(), path, "expected at least one population");
  static const std::vector<std::string> keys = {"name",           "share",
                                                "input_decay",    "outlier_channels",
                                                "outlier_magnitude", "shift"};
  std::vector<SyntheticPopulationSpec> out;
  for (std::size_t i = 0; i < n.size(); ++i) {
    const ConfigNode& item = n.at(i);
    std::string ip = join_path(path, std::to_string(i));
    expect_map_item(item, ip, "population");
    SyntheticPopulationSpec p;
    bool has_name = false;
    for (auto& [k, v] : item.entries()) {
      std::string kp = join_path(ip, k);
      if (k == "name") {
        p.name = read_string(v, kp);
        has_name = true;
      } else if (k == "share") {
        p.share = read_double(v, kp, 0.0, 1.0);
        if (!(p.share > 0.0))
          throw ConfigError(v.loc(), kp, "expected a share in (0, 1], found '" + v.value() + "'");
      } else if (k == "input_decay") {
        p.input_decay = read_double(v, kp, 0.0, 8.0);
      } else if (k == "outlier_channels") {
        p.outlier_channels = static_cast<int>(read_int(v, kp, 0, kMaxDim));
      } else if (k == "outlier_magnitude") {
        p.outlier_magnitude = read_double(v, kp, 1.0, 1e6);
      } else if (k == "shift") {
        p.shift = read_double(v, kp, -1e6, 1e6);
      } else {
        throw_unknown_key(item, k, ip, keys);
      }
    }
    if (!has_name) throw ConfigError(item.loc(), ip, "missing required key 'name'");
    out.push_back(p);
  }
  t.populations = std::move(out);
}

ConfigNode emit_layers(const SyntheticSpec& t) {
  ConfigNode seq = ConfigNode::sequence();
  for (auto& L : t.layers) {
    ConfigNode m = ConfigNode::map();
    m.set("name", ConfigNode::scalar(L.name));
    m.set("d_in", ConfigNode::scalar(std::to_string(L.d_in)));
    m.set("d_out", ConfigNode::scalar(std::to_string(L.d_out)));
    m.set("count", ConfigNode::scalar(std::to_string(L.count)));
    seq.push_back(std::move(m));
  }
  return seq;
}

ConfigNode emit_populations(const SyntheticSpec& t) {
  ConfigNode seq = ConfigNode::sequence();
  for (auto& p : t.populations) {
    PopParams r = resolve(t, p);
    ConfigNode m = ConfigNode::map();
    m.set("name", ConfigNode::scalar(p.name));
    m.set("share", ConfigNode::scalar(format_double(p.share)));
    m.set("input_decay", ConfigNode::scalar(format_double(r.decay)));
    m.set("outlier_channels", ConfigNode::scalar(std::to_string(r.outliers)));
    m.set("outlier_magnitude", ConfigNode::scalar(format_double(r.magnitude)));
    m.set("shift", ConfigNode::scalar(format_double(r.shift)));
    seq.push_back(std::move(m));
  }
  return seq;
}


OptionSchema<SyntheticSpec> build_schema() {
  using S = SyntheticSpec;
  OptionSchema<S> s;
  s.add_custom("layers", "list of {name, d_in, d_out, count}",
               "independent linear layers; count > 1 expands to name.0 .. name.{count-1}",
               parse_layers, emit_layers)
      .add_enum("weight_dist", &S::weight_dist, "weight distribution (std 1/sqrt(d_in))",
                {{"gaussian", WeightDist::Gaussian}, {"student_t", WeightDist::StudentT}})
      .add("weight_df", &S::weight_df, "student_t degrees of freedom (> 2)", {2.0, 1e6})
      .add("input_decay", &S::input_decay,
           "power-law exponent: mixing column j scaled by (1+j)^-input_decay", {0.0, 8.0})
      .add("outlier_channels", &S::outlier_channels, "input channels scaled by outlier_magnitude",
           {0, kMaxDim})
      .add("outlier_magnitude", &S::outlier_magnitude, "scale of the outlier channels",
           {1.0, 1e6})
      .add_custom("populations",
                  "list of {name, share, input_decay, outlier_channels, outlier_magnitude, shift}",
                  "labelled token populations (the `population` slice); shares sum to 1",
                  parse_populations, emit_populations)
      .validator([](const S& t, const ConfigNode& map, const std::string& path) {
        check_spec(t, Locator(&map, path));
      });
  return s;
}

// ---- generation ----

// Gamma(a, 1) for a > 1 by Marsaglia & Tsang (2000); attempt k uses counters 2k and 2k+1 of
// the element's own stream, so the value is a pure function of (seed, stream) however many
// rejections occur.
double gamma_draw(const CounterRng& rng, double a) {
  const double d = a - 1.0 / 3.0;
  const double c = 1.0 / std::sqrt(9.0 * d);
  for (uint64_t k = 0;; ++k) {
    double x = rng.normal(2 * k);
    double v = 1.0 + c * x;
    if (v <= 0.0) continue;
    v = v * v * v;
    double u = rng.uniform(2 * k + 1);
    if (detmath::log(u) < 0.5 * x * x + d - d * v + d * detmath::log(v)) return d * v;
  }
}

Matrix make_weights(const SyntheticSpec& s, const std::string& name, Index d_out, Index d_in,
                    uint64_t seed) {
  Matrix W(d_out, d_in);
  const CounterRng zr(seed, layer_stream(name, kWeightNormal));
  const uint64_t chi_stream = layer_stream(name, kWeightChi2);
  const bool student = s.weight_dist == WeightDist::StudentT;
  const double df = s.weight_df;
  // Var(t_df) = df/(df-2); rescale to unit variance, then to std 1/sqrt(d_in).
  const double scale =
      (student ? std::sqrt((df - 2.0) / df) : 1.0) / std::sqrt(static_cast<double>(d_in));
#pragma omp parallel for schedule(static)
  for (Index r = 0; r < d_out; ++r) {
    for (Index c = 0; c < d_in; ++c) {
      uint64_t i = static_cast<uint64_t>(r * d_in + c);
      double v = zr.normal(i);
      if (student) {
        double chi2 = 2.0 * gamma_draw(CounterRng(seed, mix_stream(chi_stream, i)), 0.5 * df);
        v /= std::sqrt(chi2 / df);
      }
      W(r, c) = static_cast<float>(v * scale);
    }
  }
  return W;
}

// B_p = D_p U^T (d x d), so that a token row is x^T = z^T B_p (x = U D z).
Matrix make_mixing(const CounterRng& basis, Index d, double decay) {
  Matrix B(d, d);
  const double inv_sqrt_d = 1.0 / std::sqrt(static_cast<double>(d));
#pragma omp parallel for schedule(static)
  for (Index j = 0; j < d; ++j) {
    const double dj = detmath::pow(1.0 + static_cast<double>(j), -decay) * inv_sqrt_d;
    for (Index c = 0; c < d; ++c)
      B(j, c) = static_cast<float>(basis.normal(static_cast<uint64_t>(c * d + j)) * dj);
  }
  return B;
}

struct PopulationMaps {
  Matrix B;       // d x d
  Vector scale;   // per-channel outlier multiplier
  Vector offset;  // shift * sqrt(d) * v
};

// One contiguous block of rows of a target matrix drawn from one population.
struct RowBlock {
  Matrix* X;
  Index row0, rows;
  int pop;
  uint64_t z_stream;
};

void fill_blocks(const std::vector<RowBlock>& blocks, const std::vector<PopulationMaps>& maps,
                 uint64_t seed, Index d) {
  struct Chunk {
    const RowBlock* b;
    Index r0, n;  // rows relative to the block
  };
  std::vector<Chunk> chunks;
  for (auto& b : blocks)
    for (Index r = 0; r < b.rows; r += kChunkRows)
      chunks.push_back({&b, r, std::min(kChunkRows, b.rows - r)});
  ParallelErrors errs;
  const long n_chunks = static_cast<long>(chunks.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (long ci = 0; ci < n_chunks; ++ci) {
    errs.run(ci, [&] {
      const Chunk& ch = chunks[ci];
      const RowBlock& b = *ch.b;
      const PopulationMaps& m = maps[b.pop];
      const CounterRng zr(seed, b.z_stream);
      Matrix Z(ch.n, d);
      for (Index i = 0; i < ch.n; ++i)
        for (Index j = 0; j < d; ++j)
          Z(i, j) = static_cast<float>(zr.normal(static_cast<uint64_t>((ch.r0 + i) * d + j)));
      // One tile call (single-threaded) on a chunk of fixed shape: the same bits whichever
      // thread computes it (core/linalg.h).
      auto out = b.X->middleRows(b.row0 + ch.r0, ch.n);
      gemm(Trans::No, Trans::No, ch.n, d, d, 1.0f, Z.data(), d, m.B.data(), d, 0.0f,
           out.data(), b.X->cols());
      for (Index i = 0; i < ch.n; ++i)
        out.row(i) = out.row(i).cwiseProduct(m.scale.transpose()) + m.offset.transpose();
    });
  }
  errs.rethrow();
}

}  // namespace

const OptionSchema<SyntheticSpec>& synthetic_spec_schema() {
  static const OptionSchema<SyntheticSpec> schema = build_schema();
  return schema;
}

void validate_synthetic_spec(const SyntheticSpec& spec, const std::string& path) {
  check_spec(spec, Locator(nullptr, path));
}

std::vector<std::string> synthetic_layer_names(const SyntheticSpec& spec) {
  std::vector<std::string> names;
  for (auto& L : spec.layers)
    for (int c = 0; c < L.count; ++c)
      names.push_back(L.count == 1 ? L.name : L.name + "." + std::to_string(c));
  return names;
}

std::vector<int> synthetic_unit_populations(const SyntheticSpec& spec) {
  std::vector<double> shares;
  for (auto& p : spec.populations) shares.push_back(p.share);
  auto b = split_bounds(shares, spec.eval_units);
  std::vector<int> pop(static_cast<std::size_t>(std::max(spec.eval_units, 0)), 0);
  for (std::size_t k = 0; k < spec.populations.size(); ++k)
    for (long long u = b[k]; u < b[k + 1]; ++u)
      pop[static_cast<std::size_t>(u)] = static_cast<int>(k);
  return pop;
}

std::vector<Index> synthetic_outlier_order(uint64_t seed, const std::string& layer_name,
                                           Index d_in) {
  std::vector<Index> order(static_cast<std::size_t>(d_in));
  for (Index i = 0; i < d_in; ++i) order[i] = i;
  const CounterRng rng(seed, layer_stream(layer_name, kOutlierPerm));
  // Fisher-Yates, draw i from counter i.
  for (Index i = d_in - 1; i > 0; --i) {
    Index j = static_cast<Index>(rng.below(static_cast<uint64_t>(i), static_cast<uint64_t>(i + 1)));
    std::swap(order[i], order[j]);
  }
  return order;
}

SyntheticSuite generate_suite(const SyntheticSpec& spec, uint64_t seed) {
  validate_synthetic_spec(spec);
  SyntheticSuite suite;
  suite.unit_tokens = spec.unit_tokens;
  for (auto& p : spec.populations) suite.population_names.push_back(p.name);

  const std::vector<int> unit_pop = synthetic_unit_populations(spec);
  for (int u = 0; u < spec.eval_units; ++u) {
    char id[32];
    std::snprintf(id, sizeof id, "u%04d", u);
    suite.unit_ids.push_back(id);
    suite.unit_population.push_back(spec.populations[unit_pop[u]].name);
  }

  // Row blocks shared by all layers: calibration populations in calib order, evaluation
  // populations in declaration order (units of one population are contiguous).
  const std::vector<std::string> cnames = resolved_calib_names(spec);
  std::vector<double> cshares;
  for (auto& n : cnames) cshares.push_back(spec.populations[population_index(spec, n)].share);
  const auto cb = split_bounds(cshares, spec.calib_tokens);
  suite.calib_population_names = cnames;
  for (std::size_t k = 0; k + 1 < cb.size(); ++k) suite.calib_population_rows.push_back(static_cast<Index>(cb[k + 1] - cb[k]));
  std::vector<double> shares;
  for (auto& p : spec.populations) shares.push_back(p.share);
  const auto ub = split_bounds(shares, spec.eval_units);
  const Index T = spec.unit_tokens;

  std::vector<std::pair<const SyntheticLayerSpec*, std::string>> layers;
  for (auto& L : spec.layers)
    for (int c = 0; c < L.count; ++c)
      layers.emplace_back(&L, L.count == 1 ? L.name : L.name + "." + std::to_string(c));

  for (auto& [Ls, name] : layers) {
    const Index d = Ls->d_in;
    SyntheticLayer layer;
    layer.name = name;
    layer.W = make_weights(spec, name, Ls->d_out, d, seed);

    const std::vector<Index> order = synthetic_outlier_order(seed, name, d);
    // Unit shift direction v_l (normalised in double, sequentially).
    const CounterRng vr(seed, layer_stream(name, kShiftDir));
    VectorD v(d);
    for (Index j = 0; j < d; ++j) v(j) = vr.normal(static_cast<uint64_t>(j));
    v /= v.norm();

    const CounterRng basis(seed, layer_stream(name, kBasis));
    std::vector<PopulationMaps> maps(spec.populations.size());
    for (std::size_t p = 0; p < spec.populations.size(); ++p) {
      PopParams r = resolve(spec, spec.populations[p]);
      maps[p].B = make_mixing(basis, d, r.decay);
      maps[p].scale = Vector::Ones(d);
      for (int k = 0; k < r.outliers; ++k)
        maps[p].scale(order[k]) = static_cast<float>(r.magnitude);
      maps[p].offset = (v * (r.shift * std::sqrt(static_cast<double>(d)))).cast<float>();
    }

    layer.X_calib.resize(spec.calib_tokens, d);
    layer.X_eval.resize(static_cast<Index>(spec.eval_units) * T, d);
    std::vector<RowBlock> blocks;
    for (std::size_t k = 0; k < cnames.size(); ++k) {
      int p = population_index(spec, cnames[k]);
      blocks.push_back({&layer.X_calib, static_cast<Index>(cb[k]),
                        static_cast<Index>(cb[k + 1] - cb[k]), p,
                        population_stream(name, kCalibZ, cnames[k])});
    }
    for (std::size_t p = 0; p < spec.populations.size(); ++p)
      blocks.push_back({&layer.X_eval, static_cast<Index>(ub[p]) * T,
                        static_cast<Index>(ub[p + 1] - ub[p]) * T, static_cast<int>(p),
                        population_stream(name, kEvalZ, spec.populations[p].name)});
    fill_blocks(blocks, maps, seed, d);
    suite.layers.push_back(std::move(layer));
  }
  return suite;
}

}  // namespace ql
