// tokenizer.json (core/model/hf_tokenizer.h) against ../shared/data/arch/*/golden/tokenizer_ids.json:
// token ids for 92 texts (Persuasion paragraphs, WikiText-2 articles, and edge cases: whitespace
// runs, digits, contractions, CJK, Cyrillic, Arabic, emoji with modifiers and ZWJ, combining
// marks, CRLF, special-token strings inside text, 1,000 repeated characters) from two independent
// JavaScript implementations of Hugging Face tokenizers, for the Llama 3 and the Qwen3 files;
// every case exactly, with and without special tokens, and decode(ids) == text where the
// reference round-trips. Then a Llama-2-style file (Metaspace, byte fallback, a BOS template)
// written here, and unsupported components rejected with their JSON path.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/model/hf_tokenizer.h"
#include "core/model/text_data.h"
#include "core/model/tokenizer.h"
#include "tests/model/checkpoint_writer.h"

namespace ql {
namespace {

namespace fs = std::filesystem;
const fs::path kArch = fs::path(QL_SHARED_DATA_DIR) / "arch";

void expect_golden(const std::string& model) {
  const fs::path dir = kArch / model;
  if (!fs::exists(dir / "golden" / "tokenizer_ids.json")) GTEST_SKIP() << "needs " << dir;
  const auto tok = HfTokenizer::load((dir / "tokenizer.json").string());
  std::ifstream in(dir / "golden" / "tokenizer_ids.json");
  const nlohmann::json g = nlohmann::json::parse(in);
  int n = 0, roundtrips = 0;
  for (const auto& c : g["cases"]) {
    const std::string text = c["text"];
    EXPECT_EQ(tok->encode(text), c["ids"].get<std::vector<int32_t>>()) << model << " " << c["source"];
    EXPECT_EQ(tok->encode(text, true), c["ids_with_special_tokens"].get<std::vector<int32_t>>())
        << model << " " << c["source"];
    if (c.value("decoded_roundtrip", false)) {
      EXPECT_EQ(tok->decode(c["ids"].get<std::vector<int32_t>>()), text) << model << " " << c["source"];
      ++roundtrips;
    }
    ++n;
  }
  EXPECT_EQ(n, 92);
  std::printf("[%s] %d cases, %d decoded round trips\n", model.c_str(), n, roundtrips);
}

TEST(HfTokenizer, Llama3MatchesTheReference) { expect_golden("llama3-tiny"); }
TEST(HfTokenizer, Qwen3MatchesTheReference) { expect_golden("qwen3-tiny"); }

// A model directory with only tokenizer.json loads through Tokenizer, BOS/EOS from
// tokenizer_config.json: Llama 3's stream protocol starts with <|begin_of_text|>; Qwen defines no
// BOS (bos_token null), so its stream is the text's ids alone, as transformers encodes it.
TEST(HfTokenizer, ModelDirectoriesAndTheStreamProtocol) {
  if (!fs::exists(kArch / "qwen3-tiny" / "tokenizer.json")) GTEST_SKIP() << "needs " << kArch;
  const Tokenizer llama = Tokenizer::load((kArch / "llama3-tiny").string());
  EXPECT_EQ(llama.bos_id(), 128000);
  EXPECT_EQ(llama.eos_id(), 128001);
  const std::vector<int32_t> s = encode_stream("Anne Elliot.\n\nCaptain Wentworth.", llama);
  ASSERT_FALSE(s.empty());
  EXPECT_EQ(s.front(), 128000);
  EXPECT_EQ(std::vector<int32_t>(s.begin() + 1, s.end()), llama.encode("Anne Elliot.\n\nCaptain Wentworth."));
  const Tokenizer qwen = Tokenizer::load((kArch / "qwen3-tiny").string());
  EXPECT_EQ(qwen.bos_id(), -1);
  EXPECT_EQ(encode_stream("Anne Elliot.", qwen), qwen.encode("Anne Elliot."));
  EXPECT_EQ(qwen.decode(qwen.encode("Anne Elliot.")), "Anne Elliot.");
}

/// A small Llama-2-style tokenizer.json: Metaspace (prepend first), BPE with byte fallback,
/// a TemplateProcessing post-processor adding <s>.
nlohmann::json llama2_style() {
  nlohmann::json j;
  j["added_tokens"] = {{{"id", 1}, {"content", "<s>"}, {"special", true}}, {{"id", 2}, {"content", "</s>"}, {"special", true}}};
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "\xE2\x96\x81"}, {"prepend_scheme", "first"}, {"split", false}};
  j["post_processor"] = {{"type", "TemplateProcessing"},
                         {"single", {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
                         {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}, {"tokens", {"<s>"}}}}}}};
  nlohmann::json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}, {"\xE2\x96\x81", 3}, {"h", 4}, {"i", 5}, {"hi", 6},
                          {"\xE2\x96\x81hi", 7}, {"!", 8}};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    vocab[name] = 9 + b;
  }
  j["model"] = {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", "<unk>"}, {"byte_fallback", true},
                {"fuse_unk", true}, {"vocab", vocab}, {"merges", {"h i", "\xE2\x96\x81 hi"}}};
  return j;
}

std::string write_json(const std::string& name, const nlohmann::json& j) {
  const std::string d = testutil::fresh_dir("hf_tok_" + name);
  std::ofstream(d + "/tokenizer.json") << j.dump();
  return d + "/tokenizer.json";
}

TEST(HfTokenizer, MetaspaceByteFallbackAndTemplate) {
  const auto tok = HfTokenizer::load(write_json("l2", llama2_style()));
  // "hi hi!é": ▁hi ▁hi ! then é as its two UTF-8 bytes (byte fallback).
  const std::vector<int32_t> want = {7, 7, 8, 9 + 0xC3, 9 + 0xA9};
  EXPECT_EQ(tok->encode("hi hi!\xC3\xA9"), want);
  std::vector<int32_t> with_bos = want;
  with_bos.insert(with_bos.begin(), 1);
  EXPECT_EQ(tok->encode("hi hi!\xC3\xA9", true), with_bos);
  EXPECT_EQ(tok->decode(want), "hi hi!\xC3\xA9");
  // An added token inside the text is cut out first; "first" prepends only at the text start.
  EXPECT_EQ(tok->encode("hi</s>hi"), (std::vector<int32_t>{7, 2, 6}));
  EXPECT_THROW(tok->encode("bad \xFF byte"), Error);
}

TEST(HfTokenizer, UnsupportedComponentsAreNamedWithTheirJsonPath) {
  auto error_of = [](const std::string& name, const nlohmann::json& j) -> std::string {
    try {
      HfTokenizer::load(write_json(name, j));
    } catch (const IoError& e) {
      return e.what();
    }
    return "";
  };
  nlohmann::json j = llama2_style();
  j["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", {{{"type", "Digits"}}, {{"type", "Whitespace"}}}}};
  std::string e = error_of("a", j);
  EXPECT_NE(e.find("pre_tokenizer.pretokenizers[1]"), std::string::npos) << e;
  EXPECT_NE(e.find("Whitespace"), std::string::npos) << e;
  j = llama2_style();
  j["model"]["type"] = "WordPiece";
  e = error_of("b", j);
  EXPECT_NE(e.find("model.type"), std::string::npos) << e;
  j = llama2_style();
  j["normalizer"] = {{"type", "BertNormalizer"}};
  EXPECT_NE(error_of("c", j).find("normalizer: normalizer type 'BertNormalizer'"), std::string::npos);
  j = llama2_style();
  j["post_processor"] = {{"type", "RobertaProcessing"}};
  EXPECT_NE(error_of("d", j).find("post_processor"), std::string::npos);
  j = llama2_style();
  j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}};
  EXPECT_NE(error_of("e", j).find("does not compile"), std::string::npos);
}

}  // namespace
}  // namespace ql
