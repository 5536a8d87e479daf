#include "core/quant_spec.h"

#include <cmath>
#include <limits>
#include <sstream>

namespace ql {

int QuantSpec::qmin() const {
  if (!quantized()) return 0;
  return scheme == QuantScheme::Sym ? -(1 << (bits - 1)) : 0;
}

int QuantSpec::qmax() const {
  if (!quantized()) return 0;
  return scheme == QuantScheme::Sym ? (1 << (bits - 1)) - 1 : (1 << bits) - 1;
}

namespace {


std::vector<std::pair<std::string, QuantScheme>> scheme_names() {
  return {{"asym", QuantScheme::Asym}, {"sym", QuantScheme::Sym},
          {"sym_offset", QuantScheme::SymOffset}};
}

// bits is the one key whose valid set is not an interval (2..8 or 16), so it is parsed by hand
// to report the value's own line and the exact expectation.
template <class T>
void add_bits(OptionSchema<T>& s, int T::*field, const std::string& doc) {
  s.add_custom(
      "bits", "int", doc,
      [field](T& t, const ConfigNode& n, const std::string& p) {
        long long b = read_int(n, p, std::numeric_limits<long long>::min(),
                               std::numeric_limits<long long>::max());
        if (!((b >= 2 && b <= 8) || b == 16))
          throw ConfigError(n.loc(), p, "expected 2..8 or 16, found '" + n.value() + "'");
        t.*field = static_cast<int>(b);
      },
      [field](const T& t) { return ConfigNode::scalar(std::to_string(t.*field)); });
}

// A float option on an interval whose ends may be open ("(0, 100]"); read_double only knows
// closed intervals.
template <class T>
void add_interval(OptionSchema<T>& s, const std::string& name, double T::*field,
                  const std::string& doc, double lo, bool lo_open, double hi, bool hi_open) {
  std::string text = std::string(lo_open ? "(" : "[") + format_double(lo) + ", " +
                     format_double(hi) + (hi_open ? ")" : "]");
  if (std::isinf(hi)) text = std::string(lo_open ? "> " : ">= ") + format_double(lo);
  s.add_custom(
      name, "float", doc,
      [=](T& t, const ConfigNode& n, const std::string& p) {
        double v = read_double(n, p, -std::numeric_limits<double>::infinity(),
                               std::numeric_limits<double>::infinity());
        bool ok = (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi);
        if (!ok) throw ConfigError(n.loc(), p, "expected a number " + (std::isinf(hi) ? text : "in " + text) +
                                                   ", found '" + n.value() + "'");
        t.*field = v;
      },
      [=](const T& t) { return ConfigNode::scalar(format_double(t.*field)); });
}

}  // namespace

std::string QuantSpec::str() const {
  std::ostringstream o;
  o << "w" << bits;
  if (!quantized()) return o.str();
  o << " " << scheme_name(scheme) << " ";
  switch (granularity) {
    case Granularity::PerTensor: o << "per-tensor"; break;
    case Granularity::PerChannel: o << "per-channel"; break;
    case Granularity::PerGroup: o << "g" << group_size; break;
  }
  switch (range) {
    case RangeMethod::MinMax: o << " minmax"; break;
    case RangeMethod::Percentile: o << " p" << format_double(percentile); break;
    case RangeMethod::Mse: o << (mse_weights == MseWeights::Imatrix ? " mse-imatrix" : " mse"); break;
  }
  if (scale_dtype == ScaleDtype::F32) o << " fp32-scale";
  return o.str();
}

std::string ActQuantSpec::str() const {
  std::ostringstream o;
  o << "a" << bits;
  if (!quantized()) return o.str();
  o << " " << scheme_name(scheme)
    << (granularity == ActGranularity::PerToken ? " per-token" : " per-tensor")
    << (mode == ActRangeMode::Dynamic ? " dynamic" : " static");
  if (clip_ratio != 1.0) o << " clip" << format_double(clip_ratio);
  return o.str();
}

const OptionSchema<QuantSpec>& quant_spec_schema() {
  static const OptionSchema<QuantSpec> schema = [] {
    OptionSchema<QuantSpec> s;
    add_bits(s, &QuantSpec::bits, "weight bits: 2..8, or 16 = keep float (required in a quant step)");
    s.add_enum("scheme", &QuantSpec::scheme,
               "asym: zero-point grid; sym: signed grid, zero 0; sym_offset: GPTQ reference's "
               "sym (unsigned grid, zero 2^(b-1))",
               scheme_names());
    s.add_enum("granularity", &QuantSpec::granularity,
               "weights sharing one scale: whole tensor, output channel (row), or group of "
               "group_size input columns within a row",
               std::vector<std::pair<std::string, Granularity>>{
                   {"tensor", Granularity::PerTensor},
                   {"channel", Granularity::PerChannel},
                   {"group", Granularity::PerGroup}});
    s.add("group_size", &QuantSpec::group_size,
          "input columns per group (granularity group); a shorter last group gets its own scale",
          {1, 1 << 30});
    s.add_enum("range", &QuantSpec::range,
               "range calibration per slice: min-max, |x| percentile clip, or MSE shrink search",
               std::vector<std::pair<std::string, RangeMethod>>{
                   {"minmax", RangeMethod::MinMax},
                   {"percentile", RangeMethod::Percentile},
                   {"mse", RangeMethod::Mse}});
    add_interval(s, "percentile", &QuantSpec::percentile,
                 "clip at this percentile of |x| (range percentile)", 0.0, true, 100.0, false);
    s.add("mse_grid", &QuantSpec::mse_grid, "shrink steps: p = 1 - i/mse_grid (range mse)",
          {1, 1 << 20});
    add_interval(s, "mse_maxshrink", &QuantSpec::mse_maxshrink,
                 "largest shrink searched: i < mse_maxshrink*mse_grid (range mse)", 0.0, true, 1.0,
                 true);
    add_interval(s, "mse_norm", &QuantSpec::mse_norm,
                 "exponent of the MSE search objective sum |x^ - x|^norm (range mse)", 0.0, true,
                 std::numeric_limits<double>::infinity(), true);
    s.add_enum("mse_weights", &QuantSpec::mse_weights,
               "weights of the MSE search's objective: none, or imatrix (each input column by the "
               "calibration mean x^2 of the layer's input, llama.cpp's importance matrix)",
               std::vector<std::pair<std::string, MseWeights>>{{"none", MseWeights::None},
                                                               {"imatrix", MseWeights::Imatrix}});
    s.validator([](const QuantSpec& q, const ConfigNode& map, const std::string& path) {
      if (q.mse_weights != MseWeights::None && q.range != RangeMethod::Mse) {
        const ConfigNode* k = map.find("mse_weights");
        throw ConfigError(k ? k->loc() : map.loc(), join_path(path, "mse_weights"),
                          "weights the MSE range search: set range: mse with mse_weights: imatrix");
      }
    });
    s.add_enum("scale_dtype", &QuantSpec::scale_dtype,
               "storage type of scales; fp16 rounds each scale as stored",
               std::vector<std::pair<std::string, ScaleDtype>>{{"fp16", ScaleDtype::F16},
                                                               {"fp32", ScaleDtype::F32}});
    return s;
  }();
  return schema;
}

const OptionSchema<ActQuantSpec>& act_quant_spec_schema() {
  static const OptionSchema<ActQuantSpec> schema = [] {
    OptionSchema<ActQuantSpec> s;
    add_bits(s, &ActQuantSpec::bits, "activation bits: 2..8, or 16 = keep float");
    s.add_enum("scheme", &ActQuantSpec::scheme, "grid scheme, as for weights", scheme_names());
    s.add_enum("granularity", &ActQuantSpec::granularity,
               "one grid per token (row of X) or one for the whole input matrix",
               std::vector<std::pair<std::string, ActGranularity>>{
                   {"token", ActGranularity::PerToken}, {"tensor", ActGranularity::PerTensor}});
    s.add_enum("mode", &ActQuantSpec::mode,
               "dynamic: range from the activations themselves; static: calibrated range",
               std::vector<std::pair<std::string, ActRangeMode>>{
                   {"dynamic", ActRangeMode::Dynamic}, {"static", ActRangeMode::Static}});
    add_interval(s, "clip_ratio", &ActQuantSpec::clip_ratio,
                 "range multiplier (1 = plain absmax / min-max)", 0.0, true, 1.0, false);
    s.validator([](const ActQuantSpec& a, const ConfigNode& map, const std::string& path) {
      if (a.mode == ActRangeMode::Static && a.granularity != ActGranularity::PerTensor) {
        const ConfigNode* g = map.find("granularity");
        const ConfigNode* m = map.find("mode");
        SourceLoc loc = g ? g->loc() : (m ? m->loc() : map.loc());
        throw ConfigError(loc, join_path(path, "granularity"),
                          "expected 'tensor' with mode static (one calibrated range per linear "
                          "input), found 'token'");
      }
    });
    return s;
  }();
  return schema;
}

const char* scheme_name(QuantScheme s) {
  switch (s) {
    case QuantScheme::Asym: return "asym";
    case QuantScheme::Sym: return "sym";
    case QuantScheme::SymOffset: return "sym_offset";
  }
  return "?";
}

}  // namespace ql
