#include "core/options.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>

namespace ql {

namespace {

// What a reader found, for the "found ..." half of a message.
std::string found_text(const ConfigNode& n) {
  if (n.is_null()) return "an empty value";
  if (n.is_scalar()) return "'" + n.value() + "'";
  return (n.is_map() ? "a map '" : "a list '") + n.to_flow() + "'";
}

[[noreturn]] void fail(const ConfigNode& n, const std::string& path, const std::string& expected) {
  throw ConfigError(n.loc(), path, "expected " + expected + ", found " + found_text(n));
}

std::string lower(std::string s) {
  for (char& c : s)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return s;
}

// "[lo, hi]", ">= lo", "<= hi" or "" for an unbounded range.
template <class V>
std::string range_text(V lo, V hi, bool bounded_lo, bool bounded_hi,
                       std::string (*fmt)(V)) {
  if (bounded_lo && bounded_hi) return " in [" + fmt(lo) + ", " + fmt(hi) + "]";
  if (bounded_lo) return " >= " + fmt(lo);
  if (bounded_hi) return " <= " + fmt(hi);
  return "";
}

std::string ll_text(long long v) { return std::to_string(v); }

// YAML 1.2 core-schema integer in decimal (optionally signed); no octal/hex, no "4.0".
bool parse_ll(const std::string& s, long long& out) {
  std::size_t i = 0;
  if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
  if (i == s.size()) return false;
  for (std::size_t j = i; j < s.size(); ++j)
    if (s[j] < '0' || s[j] > '9') return false;
  errno = 0;
  char* end = nullptr;
  long long v = std::strtoll(s.c_str(), &end, 10);
  if (errno == ERANGE || end != s.c_str() + s.size()) return false;
  out = v;
  return true;
}

// YAML 1.2 core-schema float: [-+]?(.[0-9]+|[0-9]+(.[0-9]*)?)([eE][-+]?[0-9]+)? or .inf
// (any sign, .inf/.Inf/.INF). strtod alone would also take "nan", "0x1p3", "infinity".
bool parse_double(const std::string& s, double& out) {
  std::size_t i = 0;
  bool neg = false;
  if (i < s.size() && (s[i] == '+' || s[i] == '-')) neg = s[i++] == '-';
  const std::string rest = s.substr(i);
  if (rest == ".inf" || rest == ".Inf" || rest == ".INF") {
    out = neg ? -std::numeric_limits<double>::infinity() : std::numeric_limits<double>::infinity();
    return true;
  }
  std::size_t digits = 0;
  while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i, ++digits;
  if (i < s.size() && s[i] == '.') {
    ++i;
    while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i, ++digits;
  }
  if (digits == 0) return false;
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    ++i;
    if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
    std::size_t exp_digits = 0;
    while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i, ++exp_digits;
    if (exp_digits == 0) return false;
  }
  if (i != s.size()) return false;
  errno = 0;
  char* end = nullptr;
  double v = std::strtod(s.c_str(), &end);
  if (end != s.c_str() + s.size()) return false;
  if (errno == ERANGE && std::isinf(v)) return false;  // "1e999" is not a number we can hold
  out = v;
  return true;
}

}  // namespace

long long read_int(const ConfigNode& n, const std::string& path, long long lo, long long hi) {
  const bool blo = lo != std::numeric_limits<long long>::min();
  const bool bhi = hi != std::numeric_limits<long long>::max();
  const std::string expected = "an integer" + range_text<long long>(lo, hi, blo, bhi, ll_text);
  long long v = 0;
  if (!n.is_scalar() || !parse_ll(n.value(), v)) fail(n, path, expected);
  if (v < lo || v > hi) fail(n, path, expected);
  return v;
}

double read_double(const ConfigNode& n, const std::string& path, double lo, double hi) {
  const bool blo = lo != -std::numeric_limits<double>::infinity();
  const bool bhi = hi != std::numeric_limits<double>::infinity();
  const std::string expected = "a number" + range_text<double>(lo, hi, blo, bhi, format_double);
  double v = 0;
  if (!n.is_scalar() || !parse_double(n.value(), v)) fail(n, path, expected);
  if (!(v >= lo && v <= hi)) fail(n, path, expected);
  return v;
}

std::vector<double> read_double_list(const ConfigNode& n, const std::string& path, double lo, double hi) {
  if (!n.is_sequence() || n.size() == 0)
    fail(n, path, "a non-empty list of numbers" + range_text<double>(lo, hi, true, true, format_double));
  std::vector<double> v;
  for (std::size_t i = 0; i < n.size(); ++i) v.push_back(read_double(n.at(i), join_path(path, std::to_string(i)), lo, hi));
  return v;
}

ConfigNode double_list_node(const std::vector<double>& v) {
  ConfigNode seq = ConfigNode::sequence();
  for (double x : v) seq.push_back(ConfigNode::scalar(format_double(x)));
  return seq;
}

std::optional<double> read_auto_or_double(const ConfigNode& n, const std::string& path, double lo, double hi) {
  if (n.is_scalar() && n.value() == "auto") return std::nullopt;
  double v = 0;
  if (!n.is_scalar() || !parse_double(n.value(), v) || !(v >= lo && v <= hi))
    fail(n, path, "'auto' or a number" + range_text<double>(lo, hi, true, true, format_double));
  return v;
}

bool read_bool(const ConfigNode& n, const std::string& path) {
  const std::string expected = "true or false";
  if (!n.is_scalar()) fail(n, path, expected);
  const std::string s = lower(n.value());
  if (s == "true" || s == "yes" || s == "on") return true;
  if (s == "false" || s == "no" || s == "off") return false;
  fail(n, path, expected);
}

std::string read_string(const ConfigNode& n, const std::string& path) {
  if (!n.is_scalar()) fail(n, path, "a string");
  return n.value();
}

std::string read_choice(const ConfigNode& n, const std::string& path,
                        const std::vector<std::string>& choices) {
  std::string listed;
  for (const auto& c : choices) listed += (listed.empty() ? "" : ", ") + c;
  const std::string expected = "one of {" + listed + "}";
  if (!n.is_scalar()) fail(n, path, expected);
  for (const auto& c : choices)
    if (c == n.value()) return c;
  std::string msg = "expected " + expected + ", found '" + n.value() + "'";
  const std::string near = closest_match(n.value(), choices);
  if (!near.empty()) msg += "; did you mean '" + near + "'?";
  throw ConfigError(n.loc(), path, msg);
}

std::vector<std::string> read_string_list(const ConfigNode& n, const std::string& path) {
  // A single string stands for a one-element list ("include: base.yaml").
  if (n.is_scalar()) return {n.value()};
  if (!n.is_sequence()) fail(n, path, "a list of strings");
  std::vector<std::string> out;
  for (std::size_t i = 0; i < n.size(); ++i)
    out.push_back(read_string(n.at(i), join_path(path, std::to_string(i))));
  return out;
}

std::string join_path(const std::string& parent, const std::string& key) {
  if (parent.empty()) return key;
  if (key.empty()) return parent;
  return parent + "." + key;
}

void throw_unknown_key(const ConfigNode& map, const std::string& key,
                       const std::string& parent_path, const std::vector<std::string>& valid) {
  std::string msg = "unknown key '" + key + "'";
  const std::string near = closest_match(key, valid);
  if (!near.empty()) msg += "; did you mean '" + near + "'?";
  if (valid.empty()) {
    msg += " (no keys are valid here)";
  } else {
    std::string listed;
    for (const auto& v : valid) listed += (listed.empty() ? "" : ", ") + v;
    msg += " (valid: " + listed + ")";
  }
  throw ConfigError(map.key_loc(key), join_path(parent_path, key), msg);
}

std::string format_double(double v) {
  if (std::isnan(v)) return ".nan";
  if (std::isinf(v)) return v > 0 ? ".inf" : "-.inf";
  char buf[40];
  // The shortest %g precision that reads back bit-identically.
  for (int prec = 1; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*g", prec, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

}  // namespace ql
