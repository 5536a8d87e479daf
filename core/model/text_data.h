// Evaluation and calibration text: the reference protocols of
// ../shared/data/austen-llama-7m/golden/golden.json ("protocol") turned into token windows,
// per-document inputs for slice metrics, calibration windows, and the built-in token slices
// (frequency-rank buckets, position buckets).
//
// Window convention (every evaluator uses it): a Window's ids are fed as one causal sequence
// and positions 1..ids.size()-1 are scored, each from its prefix inside the window; position 0
// is context only. So a window of L tokens contributes L-1 scored tokens.
//
// All functions are pure (no global state) and deterministic; none is parallel internally.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/model/tokenizer.h"

namespace ql {

// ---- stream protocol ---------------------------------------------------------------------

/// The whole file as bytes. Throws IoError naming the path.
std::string read_text_file(const std::string& path);

/// Documents of a plain-text file for the stream protocol ("file split on blank lines (CRLF->LF),
/// stripped"): after CRLF -> LF, a blank line is a line that is empty or holds only ASCII
/// whitespace (space, \t, \r, \v, \f); each maximal run of non-blank lines is one document
/// (its lines joined by "\n"), stripped of leading and trailing ASCII whitespace. This is
/// Python's `[d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]` for ASCII text.
std::vector<std::string> split_documents(const std::string& text);
/// split_documents(text) joined with "\n\n": the text the stream protocol encodes.
std::string stream_text(const std::string& text);
/// [BOS] + tokenizer.encode(stream_text(text)); without BOS when the tokenizer defines none
/// (Qwen: tokenizer_config.json's bos_token is null, and transformers adds nothing either).
std::vector<int32_t> encode_stream(const std::string& text, const Tokenizer& tokenizer);
/// encode_stream of the file at text_path.
std::vector<int32_t> stream_ids(const std::string& text_path, const Tokenizer& tokenizer);

// ---- per-document inputs ----------------------------------------------------------------

struct Document {
  std::string id;  ///< the JSONL "id" field, else "line<N>" (1-based line of the file)
  std::vector<std::pair<std::string, std::string>> attrs;  ///< slice family -> value, sorted by family
  std::vector<int32_t> ids;  ///< [BOS] + encode(text) for JSONL (no BOS if the tokenizer has none); verbatim for token-id files
};

/// One document per non-blank line of a JSONL file: {"text": string, "slice": {family: value,
/// ...}, "id": string or integer}. "text" is required; "slice" and "id" are optional; any other
/// field is an error (a misspelt "slices" must not silently drop the attributes). Slice values
/// may be strings, integers, floats (shortest round-trip text) or booleans ("true"/"false").
/// ids = [BOS] + encode(text). Throws IoError "file:line: field 'slice.register': ..." for
/// invalid JSON, missing or mistyped fields and duplicate document ids.
std::vector<Document> jsonl_documents(const std::string& path, const Tokenizer& tokenizer);

/// Documents of a pre-tokenized token-id file (read_token_id_file): id "line<N>", no attrs,
/// ids verbatim (no BOS added; include it in the file if the protocol needs one). Checks every
/// id against `vocab` (check_ids).
std::vector<Document> token_id_documents(const std::string& path, int vocab);

// ---- windows ------------------------------------------------------------------------------

struct Window {
  int doc = 0;          ///< resampling unit: document index, or window index for a stream
  int64_t start = 0;    ///< offset of ids[0] in its document or stream
  std::vector<int32_t> ids;  ///< 1..seq tokens; positions 1..len-1 are scored
};

/// Stream protocol: non-overlapping windows of exactly `seq` ids starting at 0; the last
/// partial window is dropped. Document boundaries are not tracked inside a stream, so each
/// window is its own bootstrap unit: Window::doc = window index. Throws ShapeError if seq < 2.
std::vector<Window> stream_windows(const std::vector<int32_t>& ids, int seq);

/// Slice protocol: per document, windows as in the stream, except that the last partial window
/// is kept when it has >= 2 tokens. Documents with fewer than 2 ids are skipped and counted in
/// *n_skipped (when given). Window::doc is the index into `docs` (skipped documents keep their
/// index, so unit tables can list them with zero tokens). Throws ShapeError if seq < 2.
std::vector<Window> document_windows(const std::vector<Document>& docs, int seq,
                                     int64_t* n_skipped = nullptr);

/// Sum over windows of (ids.size() - 1).
int64_t scored_tokens(const std::vector<Window>& windows);

// ---- calibration windows --------------------------------------------------------------------

enum class CalibRule {
  /// The reference's rule (gptq_smoothquant.json "calibration"): window i = ids[o + i*stride,
  /// o + i*stride+seq), stride = (len-seq) / n (integer division). Draw k of K shifts every
  /// window by o = k * (stride / K) (integer division); draw 0 is the plain rule.
  Strided,
  /// n starts drawn independently and uniformly in [0, len-seq] (with replacement):
  /// start_i = CounterRng(seed, fnv1a64("calibration_windows.random")).below(i, len-seq+1) for
  /// draw 0; draw k > 0 keys the stream on k as well (an independent set of starts).
  Random,
};

/// Which of K calibration draws (sets of windows) to take: index in [0, count). Several draws
/// of one setting measure how much a result owes to the particular calibration windows (and to
/// the rounding path they start), so results can be compared as distributions.
struct CalibDraw {
  int index = 0;
  int count = 1;
};
const char* calib_rule_name(CalibRule rule);  ///< "strided" / "random"

/// The n starting offsets of the calibration windows (see CalibRule). Throws ShapeError when
/// n < 1, seq < 1, n_ids < seq (text shorter than one window), or, for Strided with n > 1,
/// when stride is 0 (every window would be the same tokens); when the draw is outside
/// [0, count) or count < 1; and, for Strided with count > 1, when stride / count is 0 (the
/// draws would not differ).
std::vector<int64_t> calibration_offsets(int64_t n_ids, int n, int seq, CalibRule rule,
                                         uint64_t seed, CalibDraw draw = {});
/// n windows of exactly seq ids: ids[start, start+seq) for each calibration offset. A pure
/// function of (ids, n, seq, rule, seed, draw).
std::vector<std::vector<int32_t>> calibration_windows(const std::vector<int32_t>& ids, int n,
                                                      int seq, CalibRule rule, uint64_t seed,
                                                      CalibDraw draw = {});

/// A calibration mixture (windows from several sources in given proportions): how many of n
/// windows each source gets. Shares must be positive and finite (ShapeError); they are
/// normalised to sum 1, each source gets floor(n·share) and the remaining windows go to the
/// largest fractional parts (ties: the earlier source), so the counts sum to n and are a pure
/// function of (shares, n).
std::vector<int> mixture_counts(const std::vector<double>& shares, int n);
/// The order in which the sources' windows are interleaved: window j of source s (of counts[s])
/// sits at (j + 0.5) / counts[s] of the way through, merged in that order (ties: the earlier
/// source), so every stretch of consecutive windows (FlatQuant's batches) holds the mixture's
/// proportions. Returns the source of each position; within a source windows keep their order.
std::vector<int> mixture_order(const std::vector<int>& counts);

// ---- built-in token slices ------------------------------------------------------------------

/// Frequency-rank buckets of token ids, counted on a reference corpus (the calibration text).
/// Seen tokens are ranked by count, descending, ties broken by smaller token id first; rank r
/// (0-based) falls in the first bucket i with r < rank_edges[i], else in the ">last" bucket.
/// Tokens with count 0 are "unseen" whatever their rank. With the default edges the names are
/// "top100", "100-1k", "1k-10k", ">10k", "unseen" (edges print as 1k / 1M when divisible).
struct TokenBuckets {
  /// Throws ShapeError if vocab < 1, an id is outside [0, vocab) or rank_edges are not
  /// strictly increasing positive numbers.
  static TokenBuckets from_corpus(const std::vector<int32_t>& ids, int vocab,
                                  std::vector<int64_t> rank_edges = {100, 1000, 10000});

  /// Bucket index of a token id in [0, vocab()); throws ShapeError otherwise.
  int bucket_of(int32_t token) const;
  /// Bucket names, indexed by bucket_of; "unseen" is always last.
  const std::vector<std::string>& names() const { return names_; }
  int vocab() const { return static_cast<int>(bucket_.size()); }
  /// Corpus occurrences of a token id (unchecked index).
  int64_t count(int32_t token) const { return counts_[static_cast<size_t>(token)]; }
  const std::vector<int64_t>& rank_edges() const { return edges_; }
  /// 64-bit FNV-1a (core/hash.h) of the corpus ids as little-endian int32 bytes: recorded with
  /// results so a reader knows which corpus defined the buckets.
  uint64_t corpus_hash() const { return corpus_hash_; }
  int64_t corpus_tokens() const { return corpus_tokens_; }

 private:
  std::vector<int> bucket_;
  std::vector<int64_t> counts_;
  std::vector<int64_t> edges_;
  std::vector<std::string> names_;
  uint64_t corpus_hash_ = 0;
  int64_t corpus_tokens_ = 0;
};

/// Position bucket of a scored token, by its 0-based index in its Window (= the length of its
/// context): 0 "0-15", 1 "16-63", 2 "64-255", 3 "256-1023", 4 "1024+". Throws ShapeError if
/// pos < 0.
int position_bucket(int64_t pos);
const std::vector<std::string>& position_bucket_names();

}  // namespace ql
