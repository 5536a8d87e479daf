// A YAML document as a tree that remembers where every value came from (file:line:column),
// so that errors found after includes, overrides and sweep expansion still point at the line
// the user wrote. Maps keep their key order. Loading uses yaml-cpp; everything after loading
// (merge, dotted-path set, canonical emission) works on this tree.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"

namespace ql {

class ConfigNode {
 public:
  enum class Kind { Null, Scalar, Sequence, Map };

  ConfigNode() = default;
  static ConfigNode scalar(std::string value, SourceLoc loc = {});
  static ConfigNode sequence(SourceLoc loc = {});
  static ConfigNode map(SourceLoc loc = {});

  /// Parse YAML text; `file` names the source in locations and errors. A syntax error is a
  /// ConfigError at the offending line.
  static ConfigNode parse(const std::string& text, const std::string& file);
  /// Read and parse a file (IoError if it cannot be read).
  static ConfigNode load_file(const std::string& path);

  Kind kind() const { return kind_; }
  bool is_null() const { return kind_ == Kind::Null; }
  bool is_scalar() const { return kind_ == Kind::Scalar; }
  bool is_sequence() const { return kind_ == Kind::Sequence; }
  bool is_map() const { return kind_ == Kind::Map; }
  const SourceLoc& loc() const { return loc_; }
  void set_loc(SourceLoc loc) { loc_ = std::move(loc); }
  /// True for a scalar that was written quoted in YAML ("8" is a string, 8 is a number).
  bool quoted() const { return quoted_; }

  // Scalars.
  const std::string& value() const { return value_; }

  // Sequences.
  std::size_t size() const;  // elements of a sequence or entries of a map
  const ConfigNode& at(std::size_t i) const { return items_.at(i); }
  ConfigNode& at(std::size_t i) { return items_.at(i); }
  void push_back(ConfigNode n);
  const std::vector<ConfigNode>& items() const { return items_; }

  // Maps (ordered).
  using Entry = std::pair<std::string, ConfigNode>;
  const std::vector<Entry>& entries() const { return entries_; }
  std::vector<Entry>& entries() { return entries_; }
  const ConfigNode* find(const std::string& key) const;
  ConfigNode* find(const std::string& key);
  /// Location of a key itself (for "unknown key" errors); the map's location if unknown.
  SourceLoc key_loc(const std::string& key) const;
  /// Insert or replace.
  void set(const std::string& key, ConfigNode value, SourceLoc key_loc = {});
  bool erase(const std::string& key);

  /// Deep merge: maps merge key by key (other wins), everything else is replaced by other.
  void merge_from(const ConfigNode& other);

  /// Set a value at a dotted path such as "quant.0.bits" (numeric components index
  /// sequences, which must already have that element; missing map keys are created).
  /// Throws ConfigError naming the path when a component does not exist or is not a container.
  void set_path(const std::string& dotted, ConfigNode value);
  const ConfigNode* get_path(const std::string& dotted) const;

  /// Canonical YAML (block style, keys in stored order, scalars quoted where YAML would
  /// misread them). Equal trees give equal text.
  std::string to_yaml() const;
  /// One-line flow form for labels and messages, e.g. "{bits: 4, scheme: sym}".
  std::string to_flow() const;

 private:
  Kind kind_ = Kind::Null;
  std::string value_;
  bool quoted_ = false;
  std::vector<ConfigNode> items_;
  std::vector<Entry> entries_;
  std::vector<SourceLoc> key_locs_;  // parallel to entries_
  SourceLoc loc_;
  friend struct ConfigNodeBuilder;
};

/// Split "quant.0.bits" into {"quant", "0", "bits"} (empty components kept).
std::vector<std::string> split_dotted(const std::string& dotted);

/// Levenshtein distance; used to suggest the closest valid key.
int edit_distance(const std::string& a, const std::string& b);
/// The candidate closest to `word` if it is close enough to be a plausible misspelling.
std::string closest_match(const std::string& word, const std::vector<std::string>& candidates);

}  // namespace ql
