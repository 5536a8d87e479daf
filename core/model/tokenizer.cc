#include "core/model/tokenizer.h"

#include <sentencepiece_processor.h>

#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include "core/error.h"
#include "core/model/hf_tokenizer.h"

#include <nlohmann/json.hpp>

namespace ql {

namespace fs = std::filesystem;

namespace {

/// tokenizer_config.json's `key` (a string or {"content": ...}) as an id of tok, -1 if absent.
int special_id(const fs::path& config, const char* key, const HfTokenizer& tok) {
  std::error_code ec;
  if (!fs::exists(config, ec)) return -1;
  std::ifstream in(config);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const std::exception& e) {
    throw IoError(config.string() + ": invalid JSON: " + e.what());
  }
  if (!j.is_object() || !j.contains(key) || j[key].is_null()) return -1;
  const nlohmann::json& v = j[key];
  const std::string s = v.is_string() ? v.get<std::string>() : v.is_object() ? v.value("content", "") : "";
  return tok.token_to_id(s);
}

}  // namespace

Tokenizer Tokenizer::load(const std::string& model_dir) {
  std::error_code ec;
  fs::path file;
  if (fs::is_regular_file(model_dir, ec)) {
    file = model_dir;
  } else {
    if (!fs::is_directory(model_dir, ec))
      throw IoError(model_dir + ": no such directory (expected a model directory with tokenizer.model or tokenizer.json)");
    file = fs::path(model_dir) / "tokenizer.model";
    if (!fs::exists(file, ec)) file = fs::path(model_dir) / "tokenizer.json";
    if (!fs::exists(file, ec))
      throw IoError(model_dir + ": no tokenizer found (neither tokenizer.model nor tokenizer.json)");
  }
  if (file.extension() == ".json") {
    Tokenizer t;
    t.hf_ = HfTokenizer::load(file.string());
    t.hf_bos_ = special_id(file.parent_path() / "tokenizer_config.json", "bos_token", *t.hf_);
    t.hf_eos_ = special_id(file.parent_path() / "tokenizer_config.json", "eos_token", *t.hf_);
    t.path_ = file.string();
    return t;
  }
  auto sp = std::make_shared<sentencepiece::SentencePieceProcessor>();
  const auto status = sp->Load(file.string());
  if (!status.ok())
    throw IoError(file.string() + ": sentencepiece cannot load the tokenizer: " + status.ToString());
  Tokenizer t;
  t.sp_ = std::move(sp);
  t.path_ = file.string();
  return t;
}

std::vector<int32_t> Tokenizer::encode(const std::string& text) const {
  if (hf_) return hf_->encode(text, false);
  std::vector<int> ids;
  const auto status = sp_->Encode(text, &ids);
  if (!status.ok()) throw IoError(path_ + ": sentencepiece failed to encode text: " + status.ToString());
  return std::vector<int32_t>(ids.begin(), ids.end());
}

namespace {
void check_id(int32_t id, int vocab, const char* fn) {
  if (id < 0 || id >= vocab)
    throw ShapeError(std::string("Tokenizer::") + fn + ": token id " + std::to_string(id) +
                     " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
}
}  // namespace

std::vector<int32_t> Tokenizer::encode_with_special_tokens(const std::string& text) const {
  if (hf_) return hf_->encode(text, true);
  std::vector<int32_t> ids = encode(text);
  if (bos_id() >= 0) ids.insert(ids.begin(), bos_id());
  return ids;
}

std::string Tokenizer::decode(int32_t id) const {
  check_id(id, vocab_size(), "decode");
  if (hf_) return hf_->decode({id});
  return sp_->DecodeIds(std::vector<int>{id});
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  const int vocab = vocab_size();
  for (int32_t id : ids) check_id(id, vocab, "decode");
  if (hf_) return hf_->decode(ids);
  return sp_->DecodeIds(std::vector<int>(ids.begin(), ids.end()));
}

std::string Tokenizer::piece(int32_t id) const {
  check_id(id, vocab_size(), "piece");
  if (hf_) return hf_->piece(id);
  return sp_->IdToPiece(id);
}

int Tokenizer::bos_id() const { return hf_ ? hf_bos_ : sp_->bos_id(); }
int Tokenizer::eos_id() const { return hf_ ? hf_eos_ : sp_->eos_id(); }
int Tokenizer::vocab_size() const { return hf_ ? hf_->vocab_size() : sp_->GetPieceSize(); }

std::vector<std::vector<int32_t>> read_token_id_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError(path + ": cannot open token-id file");
  std::ostringstream buf;
  buf << in.rdbuf();
  if (in.bad()) throw IoError(path + ": cannot read token-id file");
  const std::string text = buf.str();

  std::vector<std::vector<int32_t>> docs;
  size_t pos = 0;
  int line_no = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    ++line_no;
    size_t stop = end;
    if (stop > pos && text[stop - 1] == '\r') --stop;
    std::vector<int32_t> ids;
    size_t i = pos;
    while (i < stop) {
      const char c = text[i];
      if (c == ' ' || c == '\t' || c == '\v' || c == '\f' || c == '\r') {
        ++i;
        continue;
      }
      size_t j = i;
      while (j < stop && !(text[j] == ' ' || text[j] == '\t' || text[j] == '\v' ||
                           text[j] == '\f' || text[j] == '\r'))
        ++j;
      const std::string token = text.substr(i, j - i);
      const std::string where =
          path + ":" + std::to_string(line_no) + ":" + std::to_string(i - pos + 1) + ": ";
      int64_t value = 0;
      for (char d : token) {
        if (d < '0' || d > '9')
          throw IoError(where + "expected a non-negative integer token id, found '" + token + "'");
        value = value * 10 + (d - '0');
        if (value > std::numeric_limits<int32_t>::max())
          throw IoError(where + "token id '" + token + "' does not fit in 32 bits");
      }
      ids.push_back(static_cast<int32_t>(value));
      i = j;
    }
    docs.push_back(std::move(ids));
    pos = end + 1;
  }
  return docs;
}

void check_ids(const std::vector<int32_t>& ids, int vocab, const std::string& what) {
  for (size_t p = 0; p < ids.size(); ++p)
    if (ids[p] < 0 || ids[p] >= vocab)
      throw ShapeError(what + ": token id " + std::to_string(ids[p]) + " at position " +
                       std::to_string(p) + " is outside the vocabulary [0, " +
                       std::to_string(vocab) + ")");
}

void check_ids(const std::vector<std::vector<int32_t>>& docs, int vocab, const std::string& what) {
  for (size_t d = 0; d < docs.size(); ++d)
    for (size_t p = 0; p < docs[d].size(); ++p)
      if (docs[d][p] < 0 || docs[d][p] >= vocab)
        throw ShapeError(what + ": token id " + std::to_string(docs[d][p]) + " at document " +
                         std::to_string(d) + " position " + std::to_string(p) +
                         " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
}

}  // namespace ql
