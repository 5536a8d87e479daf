// Typed options parsed from a ConfigNode. A plugin (or any config section) declares its
// options once, bound to the members of a plain struct with defaults:
//
//   struct GptqOptions { double percdamp = 0.01; int blocksize = 128; bool act_order = false; };
//   OptionSchema<GptqOptions> s;
//   s.add("percdamp", &GptqOptions::percdamp, "dampening as a fraction of mean diag(H)", {0, 1})
//    .add("blocksize", &GptqOptions::blocksize, "lazy-update block size B", {1, 1 << 20});
//
// The same declaration parses YAML (with range checks and errors at file:line:column plus the
// key path), emits the canonical resolved form (defaults included, used for run hashes), and
// documents the options for `quantlab list`. Numeric code receives the struct, never a map.
#pragma once
#include <algorithm>
#include <any>
#include <type_traits>
#include <functional>
#include <limits>
#include <memory>
#include <sstream>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/config_node.h"

namespace ql {

// ---- scalar readers: each throws ConfigError(node.loc(), path, "expected ..., found ...") ----
long long read_int(const ConfigNode& n, const std::string& path, long long lo, long long hi);
double read_double(const ConfigNode& n, const std::string& path, double lo, double hi);
bool read_bool(const ConfigNode& n, const std::string& path);
std::string read_string(const ConfigNode& n, const std::string& path);
/// One of `choices`; the error lists them and suggests the closest.
std::string read_choice(const ConfigNode& n, const std::string& path,
                        const std::vector<std::string>& choices);
std::vector<std::string> read_string_list(const ConfigNode& n, const std::string& path);
/// A non-empty list of numbers in [lo, hi] (each item's error at its own index path), and its
/// canonical node.
std::vector<double> read_double_list(const ConfigNode& n, const std::string& path, double lo, double hi);
ConfigNode double_list_node(const std::vector<double>& v);
/// `auto` (nullopt) or a number in [lo, hi]: a hyperparameter a plugin can also search.
std::optional<double> read_auto_or_double(const ConfigNode& n, const std::string& path, double lo, double hi);
/// Join a parent path and a key: join_path("quant.0", "bits") == "quant.0.bits".
std::string join_path(const std::string& parent, const std::string& key);
/// Error for a key that no schema knows, suggesting the closest valid one.
[[noreturn]] void throw_unknown_key(const ConfigNode& map, const std::string& key,
                                    const std::string& parent_path,
                                    const std::vector<std::string>& valid);
/// Canonical text of a double (shortest form that round-trips).
std::string format_double(double v);

/// One option's documentation for `quantlab list`.
struct OptionDoc {
  std::string name, type, default_value, doc;
};

/// Type-erased view of an OptionSchema: what the registry and the config parser use.
class AnyOptionSchema {
 public:
  virtual ~AnyOptionSchema() = default;
  virtual std::any defaults() const = 0;
  virtual bool has(const std::string& key) const = 0;
  virtual std::vector<std::string> keys() const = 0;
  /// Parse one key's value into `out` (which holds the schema's struct type).
  virtual void parse_key(std::any& out, const std::string& key, const ConfigNode& value,
                         const std::string& path) const = 0;
  /// Cross-field checks after all keys are parsed; `map` locates the section for errors.
  virtual void validate(const std::any& value, const ConfigNode& map,
                        const std::string& path) const = 0;
  /// Canonical resolved values, in declaration order.
  virtual void emit(const std::any& value, ConfigNode& out_map) const = 0;
  virtual std::vector<OptionDoc> docs() const = 0;
};

template <class T>
class OptionSchema : public AnyOptionSchema {
 public:
  struct Range {
    double lo = -std::numeric_limits<double>::infinity();
    double hi = std::numeric_limits<double>::infinity();
  };

  /// Any integer member (int, int64_t, ...), range-checked.
  template <class I, std::enable_if_t<std::is_integral_v<I> && !std::is_same_v<I, bool>, int> = 0>
  OptionSchema& add(const std::string& name, I T::*field, const std::string& doc, Range r = {}) {
    const long long lo = std::max(clamp_ll(r.lo), static_cast<long long>(std::numeric_limits<I>::min()));
    const long long hi = std::min(clamp_ll(r.hi), clamp_ll(static_cast<double>(std::numeric_limits<I>::max())));
    entries_.push_back(
        {name, "int", doc,
         [=](T& t, const ConfigNode& n, const std::string& p) {
           t.*field = static_cast<I>(read_int(n, p, lo, hi));
         },
         [=](const T& t) { return ConfigNode::scalar(std::to_string(t.*field)); }});
    return *this;
  }
  OptionSchema& add(const std::string& name, double T::*field, const std::string& doc,
                    Range r = {}) {
    entries_.push_back({name, "float", doc,
                        [=](T& t, const ConfigNode& n, const std::string& p) {
                          t.*field = read_double(n, p, r.lo, r.hi);
                        },
                        [=](const T& t) { return ConfigNode::scalar(format_double(t.*field)); }});
    return *this;
  }
  OptionSchema& add(const std::string& name, bool T::*field, const std::string& doc) {
    entries_.push_back({name, "bool", doc,
                        [=](T& t, const ConfigNode& n, const std::string& p) {
                          t.*field = read_bool(n, p);
                        },
                        [=](const T& t) { return ConfigNode::scalar(t.*field ? "true" : "false"); }});
    return *this;
  }
  OptionSchema& add(const std::string& name, std::string T::*field, const std::string& doc) {
    entries_.push_back({name, "string", doc,
                        [=](T& t, const ConfigNode& n, const std::string& p) {
                          t.*field = read_string(n, p);
                        },
                        [=](const T& t) { return ConfigNode::scalar(t.*field); }});
    return *this;
  }
  /// An enum member written as one of the names in `names`.
  template <class E>
  OptionSchema& add_enum(const std::string& name, E T::*field, const std::string& doc,
                         std::vector<std::pair<std::string, E>> names) {
    std::string type;
    std::vector<std::string> choices;
    for (auto& [s, e] : names) {
      choices.push_back(s);
      type += (type.empty() ? "" : "|") + s;
    }
    entries_.push_back({name, type, doc,
                        [=](T& t, const ConfigNode& n, const std::string& p) {
                          std::string s = read_choice(n, p, choices);
                          for (auto& [k, e] : names)
                            if (k == s) t.*field = e;
                        },
                        [=](const T& t) {
                          for (auto& [k, e] : names)
                            if (t.*field == e) return ConfigNode::scalar(k);
                          return ConfigNode::scalar("?");
                        }});
    return *this;
  }
  /// Anything else (lists, nested maps): the caller supplies parse and emit.
  OptionSchema& add_custom(const std::string& name, const std::string& type,
                           const std::string& doc,
                           std::function<void(T&, const ConfigNode&, const std::string&)> parse,
                           std::function<ConfigNode(const T&)> emit) {
    entries_.push_back({name, type, doc, std::move(parse), std::move(emit)});
    return *this;
  }
  /// Cross-field validation, run once after parsing; throw ConfigError via the given map.
  OptionSchema& validator(std::function<void(const T&, const ConfigNode&, const std::string&)> v) {
    validators_.push_back(std::move(v));
    return *this;
  }

  /// Parse a whole map section into a fresh T (defaults for absent keys); unknown keys are
  /// rejected with the closest valid key suggested.
  T parse(const ConfigNode& map, const std::string& path) const {
    T t{};
    parse_into(t, map, path);
    return t;
  }
  void parse_into(T& t, const ConfigNode& map, const std::string& path) const {
    if (map.is_null()) return;
    if (!map.is_map())
      throw ConfigError(map.loc(), path, "expected a map of options, found '" + map.to_flow() + "'");
    for (auto& [key, value] : map.entries()) {
      const Entry* e = find_entry(key);
      if (!e) throw_unknown_key(map, key, path, keys());
      e->parse(t, value, join_path(path, key));
    }
    for (auto& v : validators_) v(t, map, path);
  }
  ConfigNode emit(const T& t) const {
    ConfigNode m = ConfigNode::map();
    for (auto& e : entries_) m.set(e.name, e.emit(t));
    return m;
  }

  // AnyOptionSchema
  std::any defaults() const override { return T{}; }
  bool has(const std::string& key) const override { return find_entry(key) != nullptr; }
  std::vector<std::string> keys() const override {
    std::vector<std::string> k;
    for (auto& e : entries_) k.push_back(e.name);
    return k;
  }
  void parse_key(std::any& out, const std::string& key, const ConfigNode& value,
                 const std::string& path) const override {
    find_entry(key)->parse(std::any_cast<T&>(out), value, path);
  }
  void validate(const std::any& value, const ConfigNode& map,
                const std::string& path) const override {
    for (auto& v : validators_) v(std::any_cast<const T&>(value), map, path);
  }
  void emit(const std::any& value, ConfigNode& out_map) const override {
    for (auto& e : entries_) out_map.set(e.name, e.emit(std::any_cast<const T&>(value)));
  }
  std::vector<OptionDoc> docs() const override {
    std::vector<OptionDoc> d;
    T t{};
    for (auto& e : entries_) d.push_back({e.name, e.type, e.emit(t).to_flow(), e.doc});
    return d;
  }

 private:
  struct Entry {
    std::string name, type, doc;
    std::function<void(T&, const ConfigNode&, const std::string&)> parse;
    std::function<ConfigNode(const T&)> emit;
  };
  static long long clamp_ll(double v) {
    if (v <= -9.2e18) return std::numeric_limits<long long>::min();
    if (v >= 9.2e18) return std::numeric_limits<long long>::max();
    return static_cast<long long>(v);
  }
  const Entry* find_entry(const std::string& key) const {
    for (auto& e : entries_)
      if (e.name == key) return &e;
    return nullptr;
  }
  std::vector<Entry> entries_;
  std::vector<std::function<void(const T&, const ConfigNode&, const std::string&)>> validators_;
};

}  // namespace ql
