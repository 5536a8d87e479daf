// A Hugging Face tokenizer.json, encoded as the `tokenizers` library does, for the byte-level BPE
// tokenizers of Llama 3 and Qwen2/2.5/3 and the Metaspace / byte-fallback BPE files of
// Llama-2-style and Mistral models:
//   1. added tokens (special or not) are cut out of the raw text first (leftmost, then longest;
//      lstrip / rstrip absorb the adjacent whitespace; single_word needs non-word neighbours);
//   2. every other stretch is normalized (NFC, NFD, NFKC, NFKD through utf8proc; Prepend;
//      Replace of a literal string; Sequence),
//   3. pre-tokenized (Split by a regex with Unicode properties through PCRE2, behaviours
//      Isolated, Removed, MergedWithPrevious, MergedWithNext, Contiguous; ByteLevel, with
//      GPT-2's regex when use_regex; Metaspace; Digits; Sequence),
//   4. each piece is encoded by BPE: the byte-level alphabet when a ByteLevel pre-tokenizer is
//      present, ignore_merges (a piece in the vocabulary is one token), merges by rank, then
//      byte fallback (<0xXX>) or unk for symbols outside the vocabulary;
//   5. with special tokens, the post-processor adds its template (TemplateProcessing; ByteLevel
//      adds nothing to ids; Sequence of both).
// Anything else (another model type, normalizer, pre-tokenizer or post-processor, BPE dropout,
// subword prefixes) is rejected at load with its JSON path and type name.
//
// Thread safety: immutable after load; encode() may be called from several threads (the BPE
// cache is per call).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace ql {

class HfTokenizer {
 public:
  /// Parses tokenizer.json at `path`; IoError naming the file and the JSON path of the first
  /// unsupported or malformed component.
  static std::shared_ptr<const HfTokenizer> load(const std::string& path);
  ~HfTokenizer();

  /// Token ids of `text` (UTF-8); with add_special_tokens the post-processor's template (e.g.
  /// BOS) is applied, as tokenizers' encode(text, add_special_tokens=True).
  std::vector<int32_t> encode(const std::string& text, bool add_special_tokens = false) const;
  /// Text of ids (byte-level pieces mapped back to bytes; Metaspace's ▁ to spaces; <0xXX>
  /// pieces to their byte). ShapeError for an id outside the vocabulary.
  std::string decode(const std::vector<int32_t>& ids) const;
  /// The vocabulary string of one id (e.g. "Ġthe", "<|begin_of_text|>").
  std::string piece(int32_t id) const;
  /// Id of a token string (vocabulary or added token); -1 when absent.
  int32_t token_to_id(const std::string& token) const;
  /// Largest id + 1 over the vocabulary and the added tokens.
  int vocab_size() const;
  const std::string& path() const;

  struct Impl;

 private:
  HfTokenizer() = default;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ql
