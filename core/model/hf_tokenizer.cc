#include "core/model/hf_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace ql {

namespace {

using Json = nlohmann::json;

/// Length of the UTF-8 sequence starting with byte c (1 for a stray continuation byte).
int utf8_len(unsigned char c) { return c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1; }

std::string utf8_encode(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    s += static_cast<char>(0xE0 | (cp >> 12));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    s += static_cast<char>(0xF0 | (cp >> 18));
    s += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

/// Offset of the first byte that does not start a valid UTF-8 sequence, or npos.
std::size_t invalid_utf8_at(const std::string& s) {
  for (std::size_t i = 0; i < s.size();) {
    utf8proc_int32_t cp;
    const utf8proc_ssize_t n = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + i),
                                                static_cast<utf8proc_ssize_t>(s.size() - i), &cp);
    if (n <= 0) return i;
    i += static_cast<std::size_t>(n);
  }
  return std::string::npos;
}

/// GPT-2's byte -> printable code point table (bytes_to_unicode): printable Latin-1 bytes map
/// to themselves, the other 68 to 256, 257, ... in byte order.
struct ByteAlphabet {
  std::string of_byte[256];
  std::unordered_map<std::string, unsigned char> to_byte;
  ByteAlphabet() {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      of_byte[b] = utf8_encode(printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++));
      to_byte[of_byte[b]] = static_cast<unsigned char>(b);
    }
  }
};
const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet a;
  return a;
}

/// GPT-2's pre-tokenization regex (ByteLevel with use_regex).
const char* const kGpt2Regex = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

class Regex {
 public:
  Regex(const std::string& pattern, const std::string& where) {
    int err = 0;
    PCRE2_SIZE off = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP, &err,
                          &off, nullptr);
    if (!code_) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      throw IoError(where + ": regex does not compile at offset " + std::to_string(off) + ": " +
                    reinterpret_cast<const char*>(msg));
    }
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // falls back to the interpreter if JIT is unavailable
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  /// [begin, end) of every non-overlapping match in s, left to right.
  std::vector<std::pair<std::size_t, std::size_t>> find_all(const std::string& s) const {
    std::vector<std::pair<std::size_t, std::size_t>> out;
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
    std::size_t pos = 0;
    while (pos <= s.size()) {
      const int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos, PCRE2_NO_UTF_CHECK, md,
                                 nullptr);
      if (rc < 0) break;
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      if (ov[1] == ov[0]) {  // empty match: step over one character
        pos = ov[0] + (ov[0] < s.size() ? utf8_len(static_cast<unsigned char>(s[ov[0]])) : 1);
        continue;
      }
      out.emplace_back(ov[0], ov[1]);
      pos = ov[1];
    }
    pcre2_match_data_free(md);
    return out;
  }

 private:
  pcre2_code* code_ = nullptr;
};

enum class SplitBehavior { Isolated, Removed, MergedWithPrevious, MergedWithNext, Contiguous };

/// Pieces of s around the matches [b, e) per behaviour (tokenizers' SplitDelimiterBehavior).
std::vector<std::string> split_by(const std::string& s, const std::vector<std::pair<std::size_t, std::size_t>>& m,
                                  SplitBehavior how) {
  std::vector<std::string> out;
  std::size_t prev = 0;
  bool pending_next = false;  // MergedWithNext: the last match waits for the following gap
  for (std::size_t i = 0; i < m.size(); ++i) {
    const auto [b, e] = m[i];
    std::string gap = s.substr(prev, b - prev), hit = s.substr(b, e - b);
    if (pending_next) {
      gap = out.back() + gap;
      out.pop_back();
      pending_next = false;
    }
    switch (how) {
      case SplitBehavior::Isolated:
        if (!gap.empty()) out.push_back(gap);
        out.push_back(hit);
        break;
      case SplitBehavior::Removed:
        if (!gap.empty()) out.push_back(gap);
        break;
      case SplitBehavior::MergedWithPrevious:
        out.push_back(gap + hit);
        break;
      case SplitBehavior::MergedWithNext:
        if (!gap.empty()) out.push_back(gap);
        out.push_back(hit);
        pending_next = true;
        break;
      case SplitBehavior::Contiguous:
        if (!gap.empty()) out.push_back(gap);
        if (gap.empty() && i > 0 && m[i - 1].second == b && !out.empty()) out.back() += hit;
        else out.push_back(hit);
        break;
    }
    prev = e;
  }
  std::string tail = s.substr(prev);
  if (pending_next) {
    tail = out.back() + tail;
    out.pop_back();
  }
  if (!tail.empty()) out.push_back(tail);
  return out;
}

struct Normalizer {
  enum Kind { Nfc, Nfd, Nfkc, Nfkd, Prepend, Replace } kind;
  std::string a, b;  // Prepend: a; Replace: a -> b
};

struct PreTokenizer {
  enum Kind { Split, ByteLevel, Metaspace, Digits } kind;
  std::shared_ptr<Regex> re;  // Split (regex or escaped literal), ByteLevel with use_regex
  SplitBehavior behavior = SplitBehavior::Isolated;
  bool add_prefix_space = false;
  std::string replacement;          // Metaspace
  std::string prepend_scheme;       // Metaspace: always | first | never
  bool split = true;                // Metaspace
  bool individual_digits = false;   // Digits
};

struct AddedToken {
  int32_t id;
  std::string content;
  bool lstrip, rstrip, single_word;
};

[[noreturn]] void bad(const std::string& file, const std::string& jpath, const std::string& what) {
  throw IoError(file + ": " + jpath + ": " + what);
}

std::string type_of(const std::string& file, const Json& j, const std::string& jpath) {
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string()) bad(file, jpath, "expected an object with a 'type'");
  return j["type"].get<std::string>();
}

std::string escape_regex(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (std::string("\\^$.|?*+()[]{}").find(c) != std::string::npos) out += '\\';
    out += c;
  }
  return out;
}

}  // namespace

struct HfTokenizer::Impl {
  std::string path;
  std::vector<Normalizer> normalizers;
  std::vector<PreTokenizer> pre;
  bool byte_level = false;  // a ByteLevel pre-tokenizer: BPE runs on the byte alphabet
  std::unordered_map<std::string, int32_t> vocab;
  std::vector<std::string> id_to_token;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (left id, right id) -> (rank, merged id)
  bool ignore_merges = false, byte_fallback = false;
  int32_t unk_id = -1;
  std::vector<AddedToken> added;
  std::vector<int32_t> template_before, template_after;  // post-processor ids around the sequence
  bool metaspace_decode = false;

  void load_normalizer(const Json& j, const std::string& jp);
  void load_pre_tokenizer(const Json& j, const std::string& jp);
  void load_model(const Json& j);
  void load_post_processor(const Json& j, const std::string& jp);
  int32_t id_of(const std::string& tok) const {
    auto it = vocab.find(tok);
    return it == vocab.end() ? -1 : it->second;
  }
  std::string normalize(std::string s) const;
  std::vector<std::string> pre_tokenize(const std::string& s, bool at_text_start) const;
  void bpe(const std::string& piece, std::vector<int32_t>& out,
           std::unordered_map<std::string, std::vector<int32_t>>& cache) const;
  /// Added-token occurrences: (begin, end, token index) of the raw text, left to right,
  /// ends widened by lstrip / rstrip.
  std::vector<std::array<std::size_t, 3>> find_added(const std::string& text) const;
};

void HfTokenizer::Impl::load_normalizer(const Json& j, const std::string& jp) {
  if (j.is_null()) return;
  const std::string t = type_of(path, j, jp);
  if (t == "Sequence") {
    for (std::size_t i = 0; i < j["normalizers"].size(); ++i)
      load_normalizer(j["normalizers"][i], jp + ".normalizers[" + std::to_string(i) + "]");
  } else if (t == "NFC") {
    normalizers.push_back({Normalizer::Nfc, "", ""});
  } else if (t == "NFD") {
    normalizers.push_back({Normalizer::Nfd, "", ""});
  } else if (t == "NFKC") {
    normalizers.push_back({Normalizer::Nfkc, "", ""});
  } else if (t == "NFKD") {
    normalizers.push_back({Normalizer::Nfkd, "", ""});
  } else if (t == "Prepend") {
    normalizers.push_back({Normalizer::Prepend, j.value("prepend", ""), ""});
  } else if (t == "Replace") {
    if (!j["pattern"].contains("String")) bad(path, jp + ".pattern", "only a String pattern is supported in Replace");
    normalizers.push_back({Normalizer::Replace, j["pattern"]["String"].get<std::string>(), j.value("content", "")});
  } else {
    bad(path, jp, "normalizer type '" + t + "' is not supported (supported: NFC, NFD, NFKC, NFKD, Prepend, Replace, Sequence)");
  }
}

void HfTokenizer::Impl::load_pre_tokenizer(const Json& j, const std::string& jp) {
  if (j.is_null()) return;
  const std::string t = type_of(path, j, jp);
  PreTokenizer p{};
  if (t == "Sequence") {
    for (std::size_t i = 0; i < j["pretokenizers"].size(); ++i)
      load_pre_tokenizer(j["pretokenizers"][i], jp + ".pretokenizers[" + std::to_string(i) + "]");
    return;
  }
  if (t == "Split") {
    p.kind = PreTokenizer::Split;
    const Json& pat = j["pattern"];
    if (pat.contains("Regex")) p.re = std::make_shared<Regex>(pat["Regex"].get<std::string>(), path + ": " + jp + ".pattern");
    else if (pat.contains("String")) p.re = std::make_shared<Regex>(escape_regex(pat["String"].get<std::string>()), path + ": " + jp);
    else bad(path, jp + ".pattern", "expected {Regex: ...} or {String: ...}");
    if (j.value("invert", false)) bad(path, jp + ".invert", "inverted Split is not supported");
    const std::string b = j.value("behavior", "Isolated");
    if (b == "Isolated") p.behavior = SplitBehavior::Isolated;
    else if (b == "Removed") p.behavior = SplitBehavior::Removed;
    else if (b == "MergedWithPrevious") p.behavior = SplitBehavior::MergedWithPrevious;
    else if (b == "MergedWithNext") p.behavior = SplitBehavior::MergedWithNext;
    else if (b == "Contiguous") p.behavior = SplitBehavior::Contiguous;
    else bad(path, jp + ".behavior", "unknown behavior '" + b + "'");
  } else if (t == "ByteLevel") {
    p.kind = PreTokenizer::ByteLevel;
    p.add_prefix_space = j.value("add_prefix_space", false);
    if (j.value("use_regex", true)) p.re = std::make_shared<Regex>(kGpt2Regex, "GPT-2 regex");
    byte_level = true;
  } else if (t == "Metaspace") {
    p.kind = PreTokenizer::Metaspace;
    p.replacement = j.value("replacement", "\xE2\x96\x81");
    p.prepend_scheme = j.value("prepend_scheme", j.value("add_prefix_space", true) ? "always" : "never");
    p.split = j.value("split", true);
    metaspace_decode = true;
  } else if (t == "Digits") {
    p.kind = PreTokenizer::Digits;
    p.individual_digits = j.value("individual_digits", false);
    p.re = std::make_shared<Regex>(p.individual_digits ? "\\p{Nd}" : "\\p{Nd}+", "Digits");
  } else {
    bad(path, jp, "pre-tokenizer type '" + t + "' is not supported (supported: Split, ByteLevel, Metaspace, Digits, Sequence)");
  }
  pre.push_back(std::move(p));
}

void HfTokenizer::Impl::load_model(const Json& m) {
  if (type_of(path, m, "model") != "BPE") bad(path, "model.type", "'" + m["type"].get<std::string>() + "' is not supported (only BPE)");
  if (!m["dropout"].is_null() && m["dropout"].get<double>() != 0.0) bad(path, "model.dropout", "BPE dropout is not supported");
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (m.contains(k) && m[k].is_string() && !m[k].get<std::string>().empty())
      bad(path, std::string("model.") + k, "a non-empty value is not supported");
  ignore_merges = m.value("ignore_merges", false);
  byte_fallback = m.value("byte_fallback", false);
  if (!m["vocab"].is_object()) bad(path, "model.vocab", "expected an object of token -> id");
  for (auto it = m["vocab"].begin(); it != m["vocab"].end(); ++it) {
    const int32_t id = it.value().get<int32_t>();
    vocab[it.key()] = id;
    if (id >= static_cast<int32_t>(id_to_token.size())) id_to_token.resize(static_cast<std::size_t>(id) + 1);
    id_to_token[static_cast<std::size_t>(id)] = it.key();
  }
  if (m.contains("unk_token") && m["unk_token"].is_string()) unk_id = id_of(m["unk_token"].get<std::string>());
  const Json& ms = m["merges"];
  for (std::size_t r = 0; r < ms.size(); ++r) {
    std::string a, b;
    if (ms[r].is_string()) {  // "a b" (older files)
      const std::string s = ms[r].get<std::string>();
      const std::size_t sp = s.find(' ', 1);
      if (sp == std::string::npos) bad(path, "model.merges[" + std::to_string(r) + "]", "expected 'left right'");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else {
      a = ms[r][0].get<std::string>();
      b = ms[r][1].get<std::string>();
    }
    const int32_t ia = id_of(a), ib = id_of(b), im = id_of(a + b);
    if (ia < 0 || ib < 0 || im < 0) continue;  // a merge whose parts are not tokens never applies
    const uint64_t key = (static_cast<uint64_t>(ia) << 32) | static_cast<uint32_t>(ib);
    merges.emplace(key, std::make_pair(static_cast<int32_t>(r), im));
  }
}

void HfTokenizer::Impl::load_post_processor(const Json& j, const std::string& jp) {
  if (j.is_null()) return;
  const std::string t = type_of(path, j, jp);
  if (t == "ByteLevel") return;  // trims offsets only; ids unchanged
  if (t == "Sequence") {
    for (std::size_t i = 0; i < j["processors"].size(); ++i)
      load_post_processor(j["processors"][i], jp + ".processors[" + std::to_string(i) + "]");
    return;
  }
  if (t != "TemplateProcessing")
    bad(path, jp, "post-processor type '" + t + "' is not supported (supported: TemplateProcessing, ByteLevel, Sequence)");
  bool seen_sequence = false;
  for (const Json& item : j["single"]) {
    if (item.contains("Sequence")) {
      seen_sequence = true;
    } else if (item.contains("SpecialToken")) {
      const std::string name = item["SpecialToken"]["id"].get<std::string>();
      if (!j["special_tokens"].contains(name)) bad(path, jp + ".special_tokens", "'" + name + "' is not defined");
      for (const Json& id : j["special_tokens"][name]["ids"])
        (seen_sequence ? template_after : template_before).push_back(id.get<int32_t>());
    } else {
      bad(path, jp + ".single", "expected Sequence or SpecialToken items");
    }
  }
}

std::shared_ptr<const HfTokenizer> HfTokenizer::load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError(path + ": cannot open for reading (tokenizer.json)");
  Json j;
  try {
    j = Json::parse(in);
  } catch (const std::exception& e) {
    throw IoError(path + ": invalid JSON: " + e.what());
  }
  std::shared_ptr<HfTokenizer> t(new HfTokenizer());
  t->impl_ = std::make_unique<Impl>();
  Impl& m = *t->impl_;
  m.path = path;
  try {
    if (!j.is_object() || !j.contains("model")) bad(path, "model", "missing");
    m.load_model(j["model"]);
    m.load_normalizer(j.value("normalizer", Json()), "normalizer");
    m.load_pre_tokenizer(j.value("pre_tokenizer", Json()), "pre_tokenizer");
    m.load_post_processor(j.value("post_processor", Json()), "post_processor");
    if (j.contains("decoder") && j["decoder"].is_object() && j["decoder"].dump().find("\"Metaspace\"") != std::string::npos)
      m.metaspace_decode = true;
    for (std::size_t i = 0; i < j.value("added_tokens", Json::array()).size(); ++i) {
      const Json& a = j["added_tokens"][i];
      AddedToken at{a["id"].get<int32_t>(), a["content"].get<std::string>(), a.value("lstrip", false),
                    a.value("rstrip", false), a.value("single_word", false)};
      if (at.content.empty()) bad(path, "added_tokens[" + std::to_string(i) + "].content", "empty");
      if (at.id >= static_cast<int32_t>(m.id_to_token.size())) m.id_to_token.resize(static_cast<std::size_t>(at.id) + 1);
      m.id_to_token[static_cast<std::size_t>(at.id)] = at.content;
      m.added.push_back(std::move(at));
    }
  } catch (const nlohmann::json::exception& e) {
    throw IoError(path + ": unexpected structure: " + e.what());
  }
  return t;
}

HfTokenizer::~HfTokenizer() = default;

std::string HfTokenizer::Impl::normalize(std::string s) const {
  for (const Normalizer& n : normalizers) {
    if (n.kind == Normalizer::Prepend) {
      if (!s.empty()) s = n.a + s;
    } else if (n.kind == Normalizer::Replace) {
      std::string out;
      for (std::size_t i = 0; i < s.size();) {
        if (!n.a.empty() && s.compare(i, n.a.size(), n.a) == 0) {
          out += n.b;
          i += n.a.size();
        } else {
          out += s[i++];
        }
      }
      s = std::move(out);
    } else if (std::any_of(s.begin(), s.end(), [](char c) { return static_cast<unsigned char>(c) >= 0x80; })) {
      // (ASCII is its own normal form in all four: skipped.)
      const int opts = UTF8PROC_STABLE | (n.kind == Normalizer::Nfc || n.kind == Normalizer::Nfkc ? UTF8PROC_COMPOSE : UTF8PROC_DECOMPOSE) |
                       (n.kind == Normalizer::Nfkc || n.kind == Normalizer::Nfkd ? UTF8PROC_COMPAT : 0);
      utf8proc_uint8_t* dst = nullptr;
      const utf8proc_ssize_t len = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                                                static_cast<utf8proc_ssize_t>(s.size()), &dst,
                                                static_cast<utf8proc_option_t>(opts));
      if (len < 0) throw Error(std::string("tokenizer: Unicode normalization failed: ") + utf8proc_errmsg(len));
      s.assign(reinterpret_cast<const char*>(dst), static_cast<std::size_t>(len));
      std::free(dst);
    }
  }
  return s;
}

std::vector<std::string> HfTokenizer::Impl::pre_tokenize(const std::string& s, bool at_text_start) const {
  std::vector<std::string> pieces = {s};
  for (const PreTokenizer& p : pre) {
    std::vector<std::string> next;
    for (std::size_t k = 0; k < pieces.size(); ++k) {
      std::string x = pieces[k];
      if (p.kind == PreTokenizer::ByteLevel && p.add_prefix_space && x.compare(0, 1, " ") != 0) x = " " + x;
      if (p.kind == PreTokenizer::Metaspace) {
        std::string r;
        for (char c : x) r += c == ' ' ? p.replacement : std::string(1, c);
        const bool first = at_text_start && k == 0;
        if ((p.prepend_scheme == "always" || (p.prepend_scheme == "first" && first)) && r.compare(0, p.replacement.size(), p.replacement) != 0)
          r = p.replacement + r;
        if (!p.split) {
          next.push_back(r);
          continue;
        }
        std::vector<std::pair<std::size_t, std::size_t>> m;
        for (std::size_t i = r.find(p.replacement); i != std::string::npos; i = r.find(p.replacement, i + 1))
          m.emplace_back(i, i + p.replacement.size());
        for (std::string& piece : split_by(r, m, SplitBehavior::MergedWithNext)) next.push_back(std::move(piece));
        continue;
      }
      if (!p.re) {  // ByteLevel without its regex
        next.push_back(x);
        continue;
      }
      const SplitBehavior how = p.kind == PreTokenizer::Split ? p.behavior : SplitBehavior::Isolated;
      for (std::string& piece : split_by(x, p.re->find_all(x), how)) next.push_back(std::move(piece));
    }
    pieces = std::move(next);
  }
  return pieces;
}

void HfTokenizer::Impl::bpe(const std::string& piece, std::vector<int32_t>& out,
                            std::unordered_map<std::string, std::vector<int32_t>>& cache) const {
  if (piece.empty()) return;
  auto hit = cache.find(piece);
  if (hit != cache.end()) {
    out.insert(out.end(), hit->second.begin(), hit->second.end());
    return;
  }
  std::string word;
  std::vector<std::string> chars;  // the piece's symbols before merging
  if (byte_level) {
    for (unsigned char c : piece) chars.push_back(byte_alphabet().of_byte[c]);
  } else {
    for (std::size_t i = 0; i < piece.size();) {
      const int n = utf8_len(static_cast<unsigned char>(piece[i]));
      chars.push_back(piece.substr(i, static_cast<std::size_t>(n)));
      i += static_cast<std::size_t>(n);
    }
  }
  for (const std::string& c : chars) word += c;
  std::vector<int32_t> ids;
  const int32_t whole = ignore_merges ? id_of(word) : -1;
  if (whole >= 0) {
    ids.push_back(whole);
  } else {
    std::vector<int32_t> sym;
    std::vector<std::size_t> unknown;  // symbols that are not tokens: index into chars
    for (std::size_t i = 0; i < chars.size(); ++i) sym.push_back(id_of(chars[i]));
    std::vector<std::size_t> origin(chars.size());
    for (std::size_t i = 0; i < origin.size(); ++i) origin[i] = i;
    while (sym.size() > 1) {  // merge the lowest-ranked pair, every occurrence left to right
      int32_t best = INT32_MAX, merged = -1;
      for (std::size_t i = 0; i + 1 < sym.size(); ++i) {
        if (sym[i] < 0 || sym[i + 1] < 0) continue;
        auto it = merges.find((static_cast<uint64_t>(sym[i]) << 32) | static_cast<uint32_t>(sym[i + 1]));
        if (it != merges.end() && it->second.first < best) {
          best = it->second.first;
          merged = it->second.second;
        }
      }
      if (merged < 0) break;
      std::vector<int32_t> ns;
      std::vector<std::size_t> no;
      for (std::size_t i = 0; i < sym.size(); ++i) {
        if (i + 1 < sym.size() && sym[i] >= 0 && sym[i + 1] >= 0) {
          auto it = merges.find((static_cast<uint64_t>(sym[i]) << 32) | static_cast<uint32_t>(sym[i + 1]));
          if (it != merges.end() && it->second.first == best) {
            ns.push_back(merged);
            no.push_back(origin[i]);
            ++i;
            continue;
          }
        }
        ns.push_back(sym[i]);
        no.push_back(origin[i]);
      }
      sym = std::move(ns);
      origin = std::move(no);
    }
    for (std::size_t i = 0; i < sym.size(); ++i) {
      if (sym[i] >= 0) {
        ids.push_back(sym[i]);
        continue;
      }
      const std::string& c = chars[origin[i]];  // an unmerged symbol outside the vocabulary
      bool done = false;
      if (byte_fallback) {
        std::vector<int32_t> bytes;
        for (unsigned char b : c) {
          char name[8];
          std::snprintf(name, sizeof name, "<0x%02X>", b);
          bytes.push_back(id_of(name));
        }
        done = std::find(bytes.begin(), bytes.end(), -1) == bytes.end();
        if (done) ids.insert(ids.end(), bytes.begin(), bytes.end());
      }
      if (!done) {
        if (unk_id < 0) throw Error("tokenizer " + path + ": symbol '" + c + "' is not in the vocabulary and there is no unk_token");
        if (ids.empty() || ids.back() != unk_id) ids.push_back(unk_id);  // fuse_unk-like: one unk per run
      }
    }
  }
  out.insert(out.end(), ids.begin(), ids.end());
  cache.emplace(piece, std::move(ids));
}

std::vector<std::array<std::size_t, 3>> HfTokenizer::Impl::find_added(const std::string& text) const {
  std::vector<std::array<std::size_t, 3>> out;
  if (added.empty()) return out;
  bool first_byte[256] = {};
  for (const AddedToken& a : added) first_byte[static_cast<unsigned char>(a.content[0])] = true;
  auto is_space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; };
  auto is_word = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; };
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (!first_byte[static_cast<unsigned char>(text[i])]) continue;
    std::size_t best = SIZE_MAX;
    for (std::size_t k = 0; k < added.size(); ++k) {
      const AddedToken& a = added[k];
      if (text.compare(i, a.content.size(), a.content) != 0) continue;
      const std::size_t e = i + a.content.size();
      if (a.single_word && ((i > 0 && is_word(text[i - 1])) || (e < text.size() && is_word(text[e])))) continue;
      if (best == SIZE_MAX || a.content.size() > added[best].content.size()) best = k;
    }
    if (best == SIZE_MAX) continue;
    const AddedToken& a = added[best];
    std::size_t b = i, e = i + a.content.size();
    const std::size_t floor = out.empty() ? 0 : out.back()[1];
    if (a.lstrip)
      while (b > floor && is_space(text[b - 1])) --b;
    if (a.rstrip)
      while (e < text.size() && is_space(text[e])) ++e;
    out.push_back({b, e, best});
    i = e - 1;
  }
  return out;
}

std::vector<int32_t> HfTokenizer::encode(const std::string& text, bool add_special_tokens) const {
  const Impl& m = *impl_;
  const std::size_t bad_at = invalid_utf8_at(text);
  if (bad_at != std::string::npos) throw Error("tokenizer: text is not valid UTF-8 at byte offset " + std::to_string(bad_at));
  std::vector<int32_t> ids;
  if (add_special_tokens) ids = m.template_before;
  std::unordered_map<std::string, std::vector<int32_t>> cache;
  auto encode_stretch = [&](const std::string& s, bool at_start) {
    if (s.empty()) return;
    for (const std::string& piece : m.pre_tokenize(m.normalize(s), at_start)) m.bpe(piece, ids, cache);
  };
  std::size_t prev = 0;
  for (const auto& occ : m.find_added(text)) {
    encode_stretch(text.substr(prev, occ[0] - prev), prev == 0);
    ids.push_back(m.added[occ[2]].id);
    prev = occ[1];
  }
  encode_stretch(text.substr(prev), prev == 0);
  if (add_special_tokens) ids.insert(ids.end(), m.template_after.begin(), m.template_after.end());
  return ids;
}

std::string HfTokenizer::piece(int32_t id) const {
  if (id < 0 || id >= static_cast<int32_t>(impl_->id_to_token.size()))
    throw ShapeError("tokenizer: id " + std::to_string(id) + " is outside the vocabulary [0, " +
                     std::to_string(impl_->id_to_token.size()) + ")");
  return impl_->id_to_token[static_cast<std::size_t>(id)];
}

std::string HfTokenizer::decode(const std::vector<int32_t>& ids) const {
  const Impl& m = *impl_;
  std::string out;
  for (int32_t id : ids) {
    const std::string p = piece(id);
    bool is_added = false;
    for (const AddedToken& a : m.added) is_added = is_added || a.id == id;
    if (is_added) {
      out += p;
    } else if (m.byte_level) {
      for (std::size_t i = 0; i < p.size();) {
        const std::size_t n = static_cast<std::size_t>(utf8_len(static_cast<unsigned char>(p[i])));
        auto it = byte_alphabet().to_byte.find(p.substr(i, n));
        if (it != byte_alphabet().to_byte.end()) out += static_cast<char>(it->second);
        else out += p.substr(i, n);
        i += n;
      }
    } else if (p.size() == 6 && p.compare(0, 3, "<0x") == 0 && p[5] == '>') {
      out += static_cast<char>(std::stoi(p.substr(3, 2), nullptr, 16));
    } else {
      out += p;
    }
  }
  if (m.metaspace_decode) {
    std::string r;
    const std::string meta = "\xE2\x96\x81";
    for (std::size_t i = 0; i < out.size();) {
      if (out.compare(i, meta.size(), meta) == 0) {
        r += ' ';
        i += meta.size();
      } else {
        r += out[i++];
      }
    }
    if (!r.empty() && r[0] == ' ') r.erase(0, 1);
    out = std::move(r);
  }
  return out;
}

int32_t HfTokenizer::token_to_id(const std::string& token) const {
  for (const AddedToken& a : impl_->added)
    if (a.content == token) return a.id;
  return impl_->id_of(token);
}

int HfTokenizer::vocab_size() const { return static_cast<int>(impl_->id_to_token.size()); }
const std::string& HfTokenizer::path() const { return impl_->path; }

}  // namespace ql
