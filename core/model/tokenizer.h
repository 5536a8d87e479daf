// Text -> token ids for real checkpoints: a sentencepiece tokenizer.model read through
// libsentencepiece, or pre-tokenized token-id files for models that ship only a Hugging Face
// tokenizer.json (which quantlab does not read).
//
// Thread safety: a Tokenizer is immutable after load(); copies share one processor, and
// concurrent calls of its const methods are safe (sentencepiece's maintainers state that
// encoding may be called from several threads at once: google/sentencepiece issues 207, 657).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace ql {

class Tokenizer {
 public:
  /// Loads `model_dir`/tokenizer.model (or `model_dir` itself when it is a regular file).
  /// Throws IoError when the directory holds only tokenizer.json (saying that quantlab does
  /// not read it and that pre-tokenized token-id files are the alternative), when there is no
  /// tokenizer at all (naming the directory), or when sentencepiece rejects the file.
  static Tokenizer load(const std::string& model_dir);

  /// Token ids of `text` as the tokenizer's own normalizer and pieces give them; no BOS or EOS
  /// is added (the evaluation protocols in core/model/text_data.h add BOS themselves).
  std::vector<int32_t> encode(const std::string& text) const;
  /// Text of one id (byte-fallback pieces of a multi-byte character decode to partial UTF-8).
  /// Throws ShapeError when id is outside [0, vocab_size()).
  std::string decode(int32_t id) const;
  /// Text of a sequence of ids; same range check.
  std::string decode(const std::vector<int32_t>& ids) const;
  /// The raw piece string of one id (e.g. "▁the", "<0x0A>"); same range check.
  std::string piece(int32_t id) const;

  int bos_id() const;  ///< -1 when the tokenizer defines no BOS piece
  int eos_id() const;  ///< -1 when the tokenizer defines no EOS piece
  int vocab_size() const;
  /// The tokenizer.model file this was loaded from.
  const std::string& path() const { return path_; }

 private:
  Tokenizer() = default;
  std::shared_ptr<const sentencepiece::SentencePieceProcessor> sp_;
  std::string path_;
};

/// Reads a pre-tokenized token-id file: UTF-8 text, one document per line ("\n" or "\r\n"
/// line ends), whitespace-separated decimal non-negative integers fitting int32. Every line is
/// one document, so line N is document N-1; an empty line is an empty document; a final line
/// end does not start another document. Ids are taken verbatim (no BOS is added). Throws
/// IoError "file:line:column: ..." naming the offending token (1-based byte column).
std::vector<std::vector<int32_t>> read_token_id_file(const std::string& path);

/// Throws ShapeError "<what>: token id X at position P is outside the vocabulary [0, vocab)"
/// for the first id that an embedding of `vocab` rows could not look up.
void check_ids(const std::vector<int32_t>& ids, int vocab, const std::string& what);
/// The same for every document; positions are reported as "document D position P".
void check_ids(const std::vector<std::vector<int32_t>>& docs, int vocab, const std::string& what);

}  // namespace ql
