#include "core/model/text_data.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <sstream>
#include <tuple>

#include "core/error.h"
#include "core/hash.h"
#include "core/rng.h"

namespace ql {

namespace {

bool is_ascii_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

std::string strip(const std::string& s) {
  size_t a = 0, b = s.size();
  while (a < b && is_ascii_space(s[a])) ++a;
  while (b > a && is_ascii_space(s[b - 1])) --b;
  return s.substr(a, b - a);
}

std::string crlf_to_lf(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i)
    if (!(text[i] == '\r' && i + 1 < text.size() && text[i + 1] == '\n')) out.push_back(text[i]);
  return out;
}

void check_seq(int seq, const char* fn) {
  if (seq < 2)
    throw ShapeError(std::string(fn) + ": seq must be >= 2 (one context and one scored token), got " +
                     std::to_string(seq));
}

/// [BOS], or nothing for a tokenizer without one (Qwen's bos_token is null: its models are
/// evaluated from the first text token, as transformers encodes them).
std::vector<int32_t> bos_prefix(const Tokenizer& tokenizer) {
  const int bos = tokenizer.bos_id();
  return bos < 0 ? std::vector<int32_t>{} : std::vector<int32_t>{bos};
}

}  // namespace

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError(path + ": cannot open text file");
  std::ostringstream buf;
  buf << in.rdbuf();
  if (in.bad()) throw IoError(path + ": cannot read text file");
  return buf.str();
}

std::vector<std::string> split_documents(const std::string& raw) {
  const std::string text = crlf_to_lf(raw);
  std::vector<std::string> docs;
  std::string current;  // lines of the document being collected, joined by '\n'
  bool open = false;
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    const bool blank = std::all_of(text.begin() + static_cast<std::ptrdiff_t>(pos),
                                   text.begin() + static_cast<std::ptrdiff_t>(end), is_ascii_space);
    if (blank) {
      if (open) docs.push_back(strip(current));
      current.clear();
      open = false;
    } else {
      if (open) current.push_back('\n');
      current.append(text, pos, end - pos);
      open = true;
    }
    pos = end + 1;
  }
  if (open) docs.push_back(strip(current));
  return docs;
}

std::string stream_text(const std::string& text) {
  std::string joined;
  for (const std::string& d : split_documents(text)) {
    if (!joined.empty()) joined += "\n\n";
    joined += d;
  }
  return joined;
}

std::vector<int32_t> encode_stream(const std::string& text, const Tokenizer& tokenizer) {
  std::vector<int32_t> ids = bos_prefix(tokenizer);
  const std::vector<int32_t> body = tokenizer.encode(stream_text(text));
  ids.insert(ids.end(), body.begin(), body.end());
  return ids;
}

std::vector<int32_t> stream_ids(const std::string& text_path, const Tokenizer& tokenizer) {
  return encode_stream(read_text_file(text_path), tokenizer);
}

std::vector<Document> jsonl_documents(const std::string& path, const Tokenizer& tokenizer) {
  using nlohmann::json;
  const std::vector<int32_t> bos = bos_prefix(tokenizer);
  const std::string text = read_text_file(path);
  std::vector<Document> docs;
  std::map<std::string, int> id_line;  // document id -> line that defined it
  size_t pos = 0;
  int line_no = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    ++line_no;
    const std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    if (strip(line).empty()) continue;
    const std::string where = path + ":" + std::to_string(line_no) + ": ";

    json j;
    try {
      j = json::parse(line);
    } catch (const json::parse_error& e) {
      throw IoError(where + "invalid JSON at byte " + std::to_string(e.byte) + " of the line: " +
                    e.what());
    }
    if (!j.is_object())
      throw IoError(where + "expected a JSON object {\"text\": ..., \"slice\": {...}}, found " +
                    std::string(j.type_name()));
    for (auto it = j.begin(); it != j.end(); ++it)
      if (it.key() != "text" && it.key() != "slice" && it.key() != "id")
        throw IoError(where + "unknown field '" + it.key() + "' (expected text, slice, id)");

    Document doc;
    const auto t = j.find("text");
    if (t == j.end()) throw IoError(where + "field 'text' is missing");
    if (!t->is_string())
      throw IoError(where + "field 'text': expected a string, found " + std::string(t->type_name()));

    const auto s = j.find("slice");
    if (s != j.end()) {
      if (!s->is_object())
        throw IoError(where + "field 'slice': expected an object of slice values, found " +
                      std::string(s->type_name()));
      for (auto it = s->begin(); it != s->end(); ++it) {  // nlohmann objects iterate sorted by key
        const json& v = it.value();
        std::string value;
        if (v.is_string())
          value = v.get<std::string>();
        else if (v.is_boolean())
          value = v.get<bool>() ? "true" : "false";
        else if (v.is_number_integer() || v.is_number_unsigned() || v.is_number_float())
          value = v.dump();
        else
          throw IoError(where + "field 'slice." + it.key() +
                        "': expected a string, number or boolean, found " + std::string(v.type_name()));
        doc.attrs.emplace_back(it.key(), std::move(value));
      }
    }

    const auto id = j.find("id");
    if (id == j.end())
      doc.id = "line" + std::to_string(line_no);
    else if (id->is_string())
      doc.id = id->get<std::string>();
    else if (id->is_number_integer() || id->is_number_unsigned())
      doc.id = id->dump();
    else
      throw IoError(where + "field 'id': expected a string or an integer, found " +
                    std::string(id->type_name()));
    const auto seen = id_line.emplace(doc.id, line_no);
    if (!seen.second)
      throw IoError(where + "field 'id': document id '" + doc.id + "' was already used on line " +
                    std::to_string(seen.first->second));

    doc.ids = bos;
    const std::vector<int32_t> body = tokenizer.encode(t->get<std::string>());
    doc.ids.insert(doc.ids.end(), body.begin(), body.end());
    docs.push_back(std::move(doc));
  }
  return docs;
}

std::vector<Document> token_id_documents(const std::string& path, int vocab) {
  std::vector<std::vector<int32_t>> lines = read_token_id_file(path);
  std::vector<Document> docs(lines.size());
  for (size_t i = 0; i < lines.size(); ++i) {
    check_ids(lines[i], vocab, path + ":" + std::to_string(i + 1));
    docs[i].id = "line" + std::to_string(i + 1);
    docs[i].ids = std::move(lines[i]);
  }
  return docs;
}

std::vector<Window> stream_windows(const std::vector<int32_t>& ids, int seq) {
  check_seq(seq, "stream_windows");
  const int64_t n = static_cast<int64_t>(ids.size()) / seq;
  std::vector<Window> windows(static_cast<size_t>(n));
  for (int64_t w = 0; w < n; ++w) {
    Window& win = windows[static_cast<size_t>(w)];
    win.doc = static_cast<int>(w);
    win.start = w * seq;
    win.ids.assign(ids.begin() + win.start, ids.begin() + win.start + seq);
  }
  return windows;
}

std::vector<Window> document_windows(const std::vector<Document>& docs, int seq,
                                     int64_t* n_skipped) {
  check_seq(seq, "document_windows");
  std::vector<Window> windows;
  int64_t skipped = 0;
  for (size_t d = 0; d < docs.size(); ++d) {
    const std::vector<int32_t>& ids = docs[d].ids;
    const int64_t len = static_cast<int64_t>(ids.size());
    if (len < 2) {
      ++skipped;
      continue;
    }
    for (int64_t start = 0; start < len; start += seq) {
      const int64_t take = std::min<int64_t>(seq, len - start);
      if (take < 2) break;  // a lone trailing token has no in-window prefix to be scored from
      Window win;
      win.doc = static_cast<int>(d);
      win.start = start;
      win.ids.assign(ids.begin() + start, ids.begin() + start + take);
      windows.push_back(std::move(win));
    }
  }
  if (n_skipped) *n_skipped = skipped;
  return windows;
}

int64_t scored_tokens(const std::vector<Window>& windows) {
  int64_t n = 0;
  for (const Window& w : windows)
    if (!w.ids.empty()) n += static_cast<int64_t>(w.ids.size()) - 1;
  return n;
}

const char* calib_rule_name(CalibRule rule) {
  switch (rule) {
    case CalibRule::Strided: return "strided";
    case CalibRule::Random: return "random";
  }
  return "?";
}

std::vector<int64_t> calibration_offsets(int64_t n_ids, int n, int seq, CalibRule rule,
                                         uint64_t seed, CalibDraw draw) {
  if (n < 1) throw ShapeError("calibration windows: n must be >= 1, got " + std::to_string(n));
  if (draw.count < 1 || draw.index < 0 || draw.index >= draw.count)
    throw ShapeError("calibration windows: draw " + std::to_string(draw.index) + " of " +
                     std::to_string(draw.count) + " is outside [0, draws)");
  if (seq < 1) throw ShapeError("calibration windows: seq must be >= 1, got " + std::to_string(seq));
  if (n_ids < seq)
    throw ShapeError("calibration windows: the calibration text has " + std::to_string(n_ids) +
                     " tokens, fewer than one window of seq = " + std::to_string(seq));
  const int64_t span = n_ids - seq;  // last valid start
  std::vector<int64_t> starts(static_cast<size_t>(n));
  if (rule == CalibRule::Strided) {
    const int64_t stride = span / n;
    if (stride == 0 && n > 1)
      throw ShapeError("calibration windows: " + std::to_string(n) + " strided windows of " +
                       std::to_string(seq) + " tokens need at least " + std::to_string(seq + n) +
                       " tokens, the text has " + std::to_string(n_ids) +
                       " (stride would be 0: every window the same tokens)");
    const int64_t step = stride / draw.count;
    if (draw.count > 1 && step == 0)
      throw ShapeError("calibration windows: " + std::to_string(draw.count) + " draws of " +
                       std::to_string(n) + " strided windows need a stride of at least " +
                       std::to_string(draw.count) + " tokens, the stride is " +
                       std::to_string(stride) + " (the draws would be the same windows)");
    // o + (n-1)*stride + seq <= n_ids since o < stride and n*stride <= span.
    const int64_t offset = static_cast<int64_t>(draw.index) * step;
    for (int i = 0; i < n; ++i) starts[static_cast<size_t>(i)] = offset + i * stride;
  } else {
    // Draw 0 keeps the historical stream, so configs without draws keep their windows.
    const CounterRng rng(seed, fnv1a64(draw.index == 0 ? std::string("calibration_windows.random")
                                                        : "calibration_windows.random/draw" +
                                                              std::to_string(draw.index)));
    for (int i = 0; i < n; ++i)
      starts[static_cast<size_t>(i)] =
          static_cast<int64_t>(rng.below(static_cast<uint64_t>(i), static_cast<uint64_t>(span + 1)));
  }
  return starts;
}

std::vector<std::vector<int32_t>> calibration_windows(const std::vector<int32_t>& ids, int n,
                                                      int seq, CalibRule rule, uint64_t seed,
                                                      CalibDraw draw) {
  const std::vector<int64_t> starts =
      calibration_offsets(static_cast<int64_t>(ids.size()), n, seq, rule, seed, draw);
  std::vector<std::vector<int32_t>> windows;
  windows.reserve(starts.size());
  for (int64_t s : starts) windows.emplace_back(ids.begin() + s, ids.begin() + s + seq);
  return windows;
}

std::vector<int> mixture_counts(const std::vector<double>& shares, int n) {
  if (shares.empty()) throw ShapeError("calibration mixture: no sources");
  double total = 0;
  for (double s : shares) {
    if (!(s > 0) || !std::isfinite(s)) throw ShapeError("calibration mixture: shares must be positive and finite");
    total += s;
  }
  std::vector<int> counts(shares.size());
  std::vector<std::pair<double, std::size_t>> rest;
  int used = 0;
  for (std::size_t k = 0; k < shares.size(); ++k) {
    const double exact = static_cast<double>(n) * shares[k] / total;
    counts[k] = static_cast<int>(std::floor(exact));
    used += counts[k];
    rest.push_back({exact - counts[k], k});
  }
  std::stable_sort(rest.begin(), rest.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  for (int i = 0; i < n - used; ++i) ++counts[rest[static_cast<std::size_t>(i)].second];
  return counts;
}

std::vector<int> mixture_order(const std::vector<int>& counts) {
  std::vector<std::tuple<double, int, int>> pos;  // (fraction through, source, index)
  for (std::size_t s = 0; s < counts.size(); ++s)
    for (int j = 0; j < counts[s]; ++j)
      pos.emplace_back((j + 0.5) / counts[s], static_cast<int>(s), j);
  std::sort(pos.begin(), pos.end());
  std::vector<int> order;
  order.reserve(pos.size());
  for (auto& p : pos) order.push_back(std::get<1>(p));
  return order;
}

namespace {
std::string edge_text(int64_t e) {
  if (e % 1000000 == 0) return std::to_string(e / 1000000) + "M";
  if (e % 1000 == 0) return std::to_string(e / 1000) + "k";
  return std::to_string(e);
}
}  // namespace

TokenBuckets TokenBuckets::from_corpus(const std::vector<int32_t>& ids, int vocab,
                                       std::vector<int64_t> rank_edges) {
  if (vocab < 1) throw ShapeError("TokenBuckets: vocab must be >= 1, got " + std::to_string(vocab));
  if (rank_edges.empty()) throw ShapeError("TokenBuckets: rank_edges must not be empty");
  for (size_t i = 0; i < rank_edges.size(); ++i)
    if (rank_edges[i] < 1 || (i > 0 && rank_edges[i] <= rank_edges[i - 1]))
      throw ShapeError("TokenBuckets: rank_edges must be strictly increasing positive ranks; edge " +
                       std::to_string(i) + " is " + std::to_string(rank_edges[i]));
  check_ids(ids, vocab, "TokenBuckets corpus");

  TokenBuckets b;
  b.edges_ = std::move(rank_edges);
  b.counts_.assign(static_cast<size_t>(vocab), 0);
  std::string bytes;
  bytes.reserve(ids.size() * 4);
  for (int32_t t : ids) {
    ++b.counts_[static_cast<size_t>(t)];
    const uint32_t u = static_cast<uint32_t>(t);
    for (int k = 0; k < 4; ++k) bytes.push_back(static_cast<char>((u >> (8 * k)) & 0xffu));
  }
  b.corpus_hash_ = fnv1a64(bytes);
  b.corpus_tokens_ = static_cast<int64_t>(ids.size());

  const int n_edges = static_cast<int>(b.edges_.size());
  const int unseen = n_edges + 1;
  b.names_.push_back("top" + edge_text(b.edges_[0]));
  for (int i = 1; i < n_edges; ++i)
    b.names_.push_back(edge_text(b.edges_[i - 1]) + "-" + edge_text(b.edges_[i]));
  b.names_.push_back(">" + edge_text(b.edges_.back()));
  b.names_.push_back("unseen");

  std::vector<int32_t> order;
  for (int t = 0; t < vocab; ++t)
    if (b.counts_[static_cast<size_t>(t)] > 0) order.push_back(t);
  std::sort(order.begin(), order.end(), [&](int32_t x, int32_t y) {
    const int64_t cx = b.counts_[static_cast<size_t>(x)], cy = b.counts_[static_cast<size_t>(y)];
    return cx != cy ? cx > cy : x < y;
  });
  b.bucket_.assign(static_cast<size_t>(vocab), unseen);
  for (size_t r = 0; r < order.size(); ++r) {
    const int64_t rank = static_cast<int64_t>(r);
    int k = 0;
    while (k < n_edges && rank >= b.edges_[static_cast<size_t>(k)]) ++k;
    b.bucket_[static_cast<size_t>(order[r])] = k;
  }
  return b;
}

int TokenBuckets::bucket_of(int32_t token) const {
  if (token < 0 || token >= vocab())
    throw ShapeError("TokenBuckets::bucket_of: token id " + std::to_string(token) +
                     " is outside the vocabulary [0, " + std::to_string(vocab()) + ")");
  return bucket_[static_cast<size_t>(token)];
}

int position_bucket(int64_t pos) {
  if (pos < 0) throw ShapeError("position_bucket: negative position " + std::to_string(pos));
  if (pos < 16) return 0;
  if (pos < 64) return 1;
  if (pos < 256) return 2;
  if (pos < 1024) return 3;
  return 4;
}

const std::vector<std::string>& position_bucket_names() {
  static const std::vector<std::string> names{"0-15", "16-63", "64-255", "256-1023", "1024+"};
  return names;
}

}  // namespace ql
