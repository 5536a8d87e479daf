// Text -> token ids for real checkpoints: a sentencepiece tokenizer.model read through
// libsentencepiece, or a Hugging Face tokenizer.json (core/model/hf_tokenizer.h: the byte-level
// BPE of Llama 3 and Qwen, Metaspace BPE of Llama-2-style files), whichever the model directory
// has (tokenizer.model first); or pre-tokenized token-id files.
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

class HfTokenizer;

class Tokenizer {
 public:
  /// Loads `model_dir`/tokenizer.model, else `model_dir`/tokenizer.json (or `model_dir` itself
  /// when it is a regular file: *.json is read as tokenizer.json). With tokenizer.json, BOS and
  /// EOS are tokenizer_config.json's bos_token / eos_token beside it (-1 when absent or null).
  /// Throws IoError when there is no tokenizer (naming the directory) or the file is rejected
  /// (sentencepiece's message; tokenizer.json: the JSON path of the unsupported component).
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
  /// With tokenizer.json: the ids with its post-processor's special tokens (e.g. BOS), as
  /// encode(text, add_special_tokens=True); sentencepiece: BOS + encode(text) when it has a BOS.
  std::vector<int32_t> encode_with_special_tokens(const std::string& text) const;
  /// The tokenizer file this was loaded from.
  const std::string& path() const { return path_; }

 private:
  Tokenizer() = default;
  std::shared_ptr<const sentencepiece::SentencePieceProcessor> sp_;
  std::shared_ptr<const HfTokenizer> hf_;  // set instead of sp_ for tokenizer.json
  int hf_bos_ = -1, hf_eos_ = -1;
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
