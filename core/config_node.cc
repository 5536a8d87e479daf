#include "core/config_node.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include <yaml-cpp/yaml.h>

namespace ql {

// ---------------------------------------------------------------------------------------------
// Loading from yaml-cpp

namespace {

bool mark_known(const YAML::Mark& m) { return m.line >= 0 && m.column >= 0; }

SourceLoc loc_of(const YAML::Mark& m, const std::string& file) {
  SourceLoc loc;
  loc.file = file;
  if (mark_known(m)) {
    loc.line = m.line + 1;
    loc.column = m.column + 1;
  }
  return loc;
}

}  // namespace

// Has access to ConfigNode's private members (declared a friend in the header).
struct ConfigNodeBuilder {
  const std::string& file;

  // `fallback` locates values yaml-cpp gives no useful mark for (an empty value after a key).
  ConfigNode build(const YAML::Node& y, const SourceLoc& fallback) const {
    ConfigNode n;
    n.loc_ = loc_of(y.Mark(), file);
    if (n.loc_.line == 0) n.loc_ = fallback;
    switch (y.Type()) {
      case YAML::NodeType::Undefined:
      case YAML::NodeType::Null:
        n.kind_ = ConfigNode::Kind::Null;
        break;
      case YAML::NodeType::Scalar: {
        n.kind_ = ConfigNode::Kind::Scalar;
        n.value_ = y.Scalar();
        // yaml-cpp tags every non-plain scalar (single/double quoted, literal, folded) with
        // "!"; an explicit !!str means the same thing to us: "this is text, not a number".
        const std::string& tag = y.Tag();
        n.quoted_ = tag == "!" || tag == "tag:yaml.org,2002:str";
        break;
      }
      case YAML::NodeType::Sequence:
        n.kind_ = ConfigNode::Kind::Sequence;
        for (const auto& child : y) n.items_.push_back(build(child, n.loc_));
        break;
      case YAML::NodeType::Map:
        n.kind_ = ConfigNode::Kind::Map;
        for (auto it = y.begin(); it != y.end(); ++it) {
          // Copies: the iterator's arrow yields a temporary proxy.
          const YAML::Node k = (*it).first;
          SourceLoc kloc = loc_of(k.Mark(), file);
          if (!k.IsScalar())
            throw ConfigError(kloc, "", "a map key must be a plain string, found a " +
                                            std::string(k.IsNull() ? "null" : "collection") +
                                            " key");
          const std::string key = k.Scalar();
          for (std::size_t i = 0; i < n.entries_.size(); ++i)
            if (n.entries_[i].first == key)
              throw ConfigError(kloc, key,
                                "duplicate key (first defined at " + n.key_locs_[i].str() + ")");
          const YAML::Node v = (*it).second;
          // An empty value ("key:" then a newline) carries the mark of the next token, which
          // may be lines later; point at the key instead.
          SourceLoc vfallback = kloc;
          ConfigNode value = build(v, vfallback);
          if (value.is_null() && value.loc_.line != kloc.line) value.loc_ = kloc;
          n.entries_.emplace_back(key, std::move(value));
          n.key_locs_.push_back(kloc);
        }
        break;
    }
    return n;
  }
};

ConfigNode ConfigNode::scalar(std::string value, SourceLoc loc) {
  ConfigNode n;
  n.kind_ = Kind::Scalar;
  n.value_ = std::move(value);
  n.loc_ = std::move(loc);
  return n;
}

ConfigNode ConfigNode::sequence(SourceLoc loc) {
  ConfigNode n;
  n.kind_ = Kind::Sequence;
  n.loc_ = std::move(loc);
  return n;
}

ConfigNode ConfigNode::map(SourceLoc loc) {
  ConfigNode n;
  n.kind_ = Kind::Map;
  n.loc_ = std::move(loc);
  return n;
}

ConfigNode ConfigNode::parse(const std::string& text, const std::string& file) {
  std::vector<YAML::Node> docs;
  try {
    docs = YAML::LoadAll(text);
  } catch (const YAML::ParserException& e) {
    throw ConfigError(loc_of(e.mark, file), "", "YAML syntax error: " + e.msg);
  } catch (const YAML::Exception& e) {
    throw ConfigError(loc_of(e.mark, file), "", "YAML error: " + e.msg);
  }
  SourceLoc start{file, 1, 1};
  if (docs.empty()) {
    ConfigNode n;
    n.loc_ = start;
    return n;
  }
  // A second document would be silently ignored by a single-document load; refuse it.
  if (docs.size() > 1)
    throw ConfigError(loc_of(docs[1].Mark(), file), "",
                      "a config file must hold one YAML document, found " +
                          std::to_string(docs.size()));
  ConfigNodeBuilder b{file};
  try {
    return b.build(docs[0], start);
  } catch (const YAML::Exception& e) {
    throw ConfigError(loc_of(e.mark, file), "", "YAML error: " + e.msg);
  }
}

ConfigNode ConfigNode::load_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError("cannot open config file '" + path + "'");
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw IoError("cannot read config file '" + path + "'");
  return parse(ss.str(), path);
}

// ---------------------------------------------------------------------------------------------
// Containers

std::size_t ConfigNode::size() const {
  if (kind_ == Kind::Sequence) return items_.size();
  if (kind_ == Kind::Map) return entries_.size();
  return 0;
}

void ConfigNode::push_back(ConfigNode n) {
  if (kind_ == Kind::Null) kind_ = Kind::Sequence;
  if (kind_ != Kind::Sequence) throw std::logic_error("ConfigNode::push_back on a non-sequence");
  items_.push_back(std::move(n));
}

const ConfigNode* ConfigNode::find(const std::string& key) const {
  if (kind_ != Kind::Map) return nullptr;
  for (auto& e : entries_)
    if (e.first == key) return &e.second;
  return nullptr;
}

ConfigNode* ConfigNode::find(const std::string& key) {
  if (kind_ != Kind::Map) return nullptr;
  for (auto& e : entries_)
    if (e.first == key) return &e.second;
  return nullptr;
}

SourceLoc ConfigNode::key_loc(const std::string& key) const {
  for (std::size_t i = 0; i < entries_.size(); ++i)
    if (entries_[i].first == key && i < key_locs_.size() && key_locs_[i].line > 0)
      return key_locs_[i];
  return loc_;
}

void ConfigNode::set(const std::string& key, ConfigNode value, SourceLoc key_loc) {
  if (kind_ == Kind::Null) kind_ = Kind::Map;
  if (kind_ != Kind::Map) throw std::logic_error("ConfigNode::set on a non-map");
  // Keep entries_ and key_locs_ parallel even if a caller edited entries() directly.
  key_locs_.resize(entries_.size());
  const bool have_loc = key_loc.line > 0 || !key_loc.file.empty();
  for (std::size_t i = 0; i < entries_.size(); ++i) {
    if (entries_[i].first == key) {
      entries_[i].second = std::move(value);
      if (have_loc) key_locs_[i] = std::move(key_loc);
      return;
    }
  }
  if (!have_loc) key_loc = value.loc();
  entries_.emplace_back(key, std::move(value));
  key_locs_.push_back(std::move(key_loc));
}

bool ConfigNode::erase(const std::string& key) {
  key_locs_.resize(entries_.size());
  for (std::size_t i = 0; i < entries_.size(); ++i) {
    if (entries_[i].first == key) {
      entries_.erase(entries_.begin() + static_cast<std::ptrdiff_t>(i));
      key_locs_.erase(key_locs_.begin() + static_cast<std::ptrdiff_t>(i));
      return true;
    }
  }
  return false;
}

void ConfigNode::merge_from(const ConfigNode& other) {
  if (kind_ != Kind::Map || other.kind_ != Kind::Map) {
    *this = other;
    return;
  }
  for (std::size_t i = 0; i < other.entries_.size(); ++i) {
    const auto& [key, value] = other.entries_[i];
    SourceLoc kloc = i < other.key_locs_.size() ? other.key_locs_[i] : SourceLoc{};
    ConfigNode* mine = find(key);
    if (mine && mine->is_map() && value.is_map()) {
      mine->merge_from(value);
    } else {
      set(key, value, kloc);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Dotted paths

std::vector<std::string> split_dotted(const std::string& dotted) {
  std::vector<std::string> parts;
  std::string cur;
  for (char c : dotted) {
    if (c == '.') {
      parts.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  parts.push_back(cur);
  return parts;
}

namespace {


// A sequence index: decimal digits only, so "01" and "+1" are not indices.
bool parse_index(const std::string& s, std::size_t& out) {
  if (s.empty() || s.size() > 9) return false;
  if (s.size() > 1 && s[0] == '0') return false;
  for (char c : s)
    if (c < '0' || c > '9') return false;
  out = static_cast<std::size_t>(std::stoul(s));
  return true;
}

std::string prefix_of(const std::vector<std::string>& parts, std::size_t n) {
  std::string p;
  for (std::size_t i = 0; i < n; ++i) p += (i ? "." : "") + parts[i];
  return p;
}

std::string kind_name(ConfigNode::Kind k) {
  switch (k) {
    case ConfigNode::Kind::Null: return "empty";
    case ConfigNode::Kind::Scalar: return "a scalar";
    case ConfigNode::Kind::Sequence: return "a list";
    case ConfigNode::Kind::Map: return "a map";
  }
  return "?";
}

}  // namespace

void ConfigNode::set_path(const std::string& dotted, ConfigNode value) {
  const SourceLoc where = value.loc();
  std::vector<std::string> parts = split_dotted(dotted);
  for (std::size_t i = 0; i < parts.size(); ++i)
    if (parts[i].empty())
      throw ConfigError(where, dotted, "malformed key path (empty component)");

  ConfigNode* cur = this;
  for (std::size_t i = 0; i < parts.size(); ++i) {
    const std::string& part = parts[i];
    const bool last = i + 1 == parts.size();
    const std::string here = prefix_of(parts, i);
    if (cur->is_null() && i > 0) cur->kind_ = Kind::Map;  // "key:" with no value yet
    if (cur->is_sequence()) {
      std::size_t idx = 0;
      if (!parse_index(part, idx))
        throw ConfigError(where, dotted,
                          "'" + here + "' is a list, so '" + part + "' must be an index");
      if (idx >= cur->items_.size())
        throw ConfigError(where, dotted,
                          "index " + part + " is out of range: '" + here + "' has " +
                              std::to_string(cur->items_.size()) + " element" +
                              (cur->items_.size() == 1 ? "" : "s"));
      if (last) {
        cur->items_[idx] = std::move(value);
        return;
      }
      cur = &cur->items_[idx];
    } else if (cur->is_map() || (cur->is_null() && i == 0)) {
      if (last) {
        cur->set(part, std::move(value), where);
        return;
      }
      ConfigNode* next = cur->find(part);
      if (!next) {
        cur->set(part, ConfigNode::map(where), where);
        next = cur->find(part);
      }
      cur = next;
    } else {
      throw ConfigError(where, dotted,
                        "cannot descend into '" + here + "': it is " + kind_name(cur->kind_) +
                            ", not a map or list");
    }
  }
}

const ConfigNode* ConfigNode::get_path(const std::string& dotted) const {
  if (dotted.empty()) return this;
  const ConfigNode* cur = this;
  for (const std::string& part : split_dotted(dotted)) {
    if (cur->is_sequence()) {
      std::size_t idx = 0;
      if (!parse_index(part, idx) || idx >= cur->items_.size()) return nullptr;
      cur = &cur->items_[idx];
    } else if (cur->is_map()) {
      cur = cur->find(part);
      if (!cur) return nullptr;
    } else {
      return nullptr;
    }
  }
  return cur;
}

// ---------------------------------------------------------------------------------------------
// Emission

namespace {

bool is_null_word(const std::string& s) {
  return s == "~" || s == "null" || s == "Null" || s == "NULL";
}

// Whether `s` written as a plain (unquoted) scalar reads back as exactly `s`. In flow context
// the flow indicators end a plain scalar too.
bool plain_safe(const std::string& s, bool flow) {
  if (s.empty() || is_null_word(s)) return false;
  const char first = s[0];
  if (first == ' ' || first == '\t' || s.back() == ' ' || s.back() == '\t') return false;
  if (s.compare(0, 3, "---") == 0 || s.compare(0, 3, "...") == 0) return false;
  static const std::string always_bad_first = ",[]{}#&*!|>'\"%@`";
  if (always_bad_first.find(first) != std::string::npos) return false;
  // "-", "?" and ":" start a plain scalar only when followed by a non-space ("-1", "-x").
  if (first == '-' || first == '?' || first == ':') {
    if (s.size() == 1 || s[1] == ' ' || s[1] == '\t') return false;
  }
  if (s.back() == ':') return false;
  for (std::size_t i = 0; i < s.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7f) return false;  // control characters, newlines
    if (c == ':' && i + 1 < s.size() && (s[i + 1] == ' ' || s[i + 1] == '\t')) return false;
    if (c == '#' && i > 0 && (s[i - 1] == ' ' || s[i - 1] == '\t')) return false;
    if (flow && (c == ',' || c == '[' || c == ']' || c == '{' || c == '}')) return false;
    if (flow && c == ':' && i + 1 < s.size() &&
        (s[i + 1] == ',' || s[i + 1] == ']' || s[i + 1] == '}'))
      return false;
  }
  return true;
}

std::string double_quoted(const std::string& s) {
  std::string out = "\"";
  for (char ch : s) {
    const unsigned char c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default:
        if (c < 0x20 || c == 0x7f) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\x%02x", c);
          out += buf;
        } else {
          out += ch;
        }
    }
  }
  return out + "\"";
}

std::string scalar_text(const ConfigNode& n, bool flow) {
  if (!n.quoted() && plain_safe(n.value(), flow)) return n.value();
  return double_quoted(n.value());
}

// Keys are always strings in a ConfigNode; quote them whenever plain text would not be read
// back as that same string key.
std::string key_text(const std::string& k, bool flow) {
  return plain_safe(k, flow) ? k : double_quoted(k);
}

bool is_block_container(const ConfigNode& n) {
  return (n.is_map() || n.is_sequence()) && n.size() > 0;
}

std::string inline_text(const ConfigNode& n) {
  switch (n.kind()) {
    case ConfigNode::Kind::Null: return "null";
    case ConfigNode::Kind::Scalar: return scalar_text(n, false);
    case ConfigNode::Kind::Sequence: return "[]";
    case ConfigNode::Kind::Map: return "{}";
  }
  return "";
}

// Appends the block form of a non-empty container, each line prefixed by `indent`.
void emit_block(const ConfigNode& n, const std::string& indent, std::string& out) {
  if (n.is_map()) {
    for (auto& [k, v] : n.entries()) {
      out += indent + key_text(k, false) + ":";
      if (is_block_container(v)) {
        out += "\n";
        emit_block(v, indent + "  ", out);
      } else {
        out += " " + inline_text(v) + "\n";
      }
    }
  } else {
    for (auto& item : n.items()) {
      if (is_block_container(item)) {
        // Emit the child at two extra spaces, then fold its first line onto the "- ".
        std::string child;
        emit_block(item, indent + "  ", child);
        out += indent + "- " + child.substr(indent.size() + 2);
      } else {
        out += indent + "- " + inline_text(item) + "\n";
      }
    }
  }
}

void emit_flow(const ConfigNode& n, std::string& out) {
  switch (n.kind()) {
    case ConfigNode::Kind::Null: out += "null"; break;
    case ConfigNode::Kind::Scalar: out += scalar_text(n, true); break;
    case ConfigNode::Kind::Sequence: {
      out += "[";
      bool first = true;
      for (auto& item : n.items()) {
        if (!first) out += ", ";
        first = false;
        emit_flow(item, out);
      }
      out += "]";
      break;
    }
    case ConfigNode::Kind::Map: {
      out += "{";
      bool first = true;
      for (auto& [k, v] : n.entries()) {
        if (!first) out += ", ";
        first = false;
        out += key_text(k, true) + ": ";
        emit_flow(v, out);
      }
      out += "}";
      break;
    }
  }
}

}  // namespace

std::string ConfigNode::to_yaml() const {
  if (!is_block_container(*this)) return inline_text(*this) + "\n";
  std::string out;
  emit_block(*this, "", out);
  return out;
}

std::string ConfigNode::to_flow() const {
  std::string out;
  emit_flow(*this, out);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Suggestions

int edit_distance(const std::string& a, const std::string& b) {
  std::vector<int> prev(b.size() + 1), cur(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) prev[j] = static_cast<int>(j);
  for (std::size_t i = 1; i <= a.size(); ++i) {
    cur[0] = static_cast<int>(i);
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const int sub = prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, sub});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string closest_match(const std::string& word, const std::vector<std::string>& candidates) {
  const int limit = std::max(2, static_cast<int>(word.size()) / 3);
  std::string best;
  int best_d = limit + 1;
  for (const auto& c : candidates) {
    const int d = edit_distance(word, c);
    // A candidate that differs in every character is no misspelling ("ab" vs "xy").
    const int longest = static_cast<int>(std::max(word.size(), c.size()));
    if (d < best_d && d < longest) {
      best_d = d;
      best = c;
    }
  }
  return best;
}

}  // namespace ql
