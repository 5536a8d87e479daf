#include "core/model/text_data.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "core/error.h"
#include "core/hash.h"
#include "core/model/tokenizer.h"

namespace ql {
namespace {

namespace fs = std::filesystem;

const std::string kData = QL_SHARED_DATA_DIR;
const std::string kModelDir = kData + "/austen-llama-7m";
const std::string kText = kData + "/text";

#define REQUIRE_SHARED_DATA()                                                  \
  do {                                                                         \
    if (!fs::exists(kModelDir + "/tokenizer.model"))                           \
      GTEST_SKIP() << "../shared/data not found at " << kData;                 \
  } while (0)

/// A fresh directory under the system temp dir, removed at destruction.
class TempDir {
 public:
  explicit TempDir(const std::string& tag) {
    path_ = fs::temp_directory_path() /
            ("ql_text_data_" + tag + "_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) +
             "_" + std::to_string(reinterpret_cast<uintptr_t>(this)));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name, const std::string& contents) const {
    const std::string p = (path_ / name).string();
    std::ofstream(p, std::ios::binary) << contents;
    return p;
  }
  std::string str() const { return path_.string(); }

 private:
  fs::path path_;
};

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "<no error>";
}

nlohmann::json golden() {
  std::ifstream in(kModelDir + "/golden/golden.json");
  return nlohmann::json::parse(in);
}

const Tokenizer& austen_tokenizer() {
  static const Tokenizer t = Tokenizer::load(kModelDir);
  return t;
}

/// The calibration corpus, tokenized once for the tests that need it.
const std::vector<int32_t>& austen_train_ids() {
  static const std::vector<int32_t> ids = stream_ids(kText + "/austen_train.txt", austen_tokenizer());
  return ids;
}

// ---- split_documents: the reading of "split on blank lines" --------------------------------

TEST(SplitDocuments, BlankLineVariants) {
  using V = std::vector<std::string>;
  EXPECT_EQ(split_documents("a\nb\n\nc"), (V{"a\nb", "c"}));
  // Several blank lines are one separator; whitespace-only lines are blank.
  EXPECT_EQ(split_documents("a\n\n\n\nb"), (V{"a", "b"}));
  EXPECT_EQ(split_documents("a\n \t \nb\n\n  \n\nc"), (V{"a", "b", "c"}));
  // Documents are stripped; leading/trailing blank lines produce no empty documents.
  EXPECT_EQ(split_documents("\n\n  a  \n  b\t\n\n\n"), (V{"a  \n  b"}));
  EXPECT_EQ(split_documents(""), V{});
  EXPECT_EQ(split_documents("\n \n\n"), V{});
  EXPECT_EQ(split_documents("only"), (V{"only"}));
  // A single newline stays inside a document.
  EXPECT_EQ(split_documents("x\ny"), (V{"x\ny"}));
}

TEST(SplitDocuments, CrlfIsLf) {
  using V = std::vector<std::string>;
  EXPECT_EQ(split_documents("a\r\nb\r\n\r\nc\r\n"), (V{"a\nb", "c"}));
  EXPECT_EQ(split_documents("a\r\n \r\n\r\nb"), (V{"a", "b"}));
  EXPECT_EQ(stream_text("a\r\nb\r\n\r\n\r\nc\r\n"), "a\nb\n\nc");
  EXPECT_EQ(stream_text("  p1 \n\n\n p2\n  \np3  "), "p1\n\np2\n\np3");
}

// ---- windows --------------------------------------------------------------------------------

std::vector<int32_t> iota_ids(int n) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) v[static_cast<size_t>(i)] = i;
  return v;
}

TEST(StreamWindows, NonOverlappingLastPartialDropped) {
  const auto ids = iota_ids(11);
  const auto w = stream_windows(ids, 4);
  ASSERT_EQ(w.size(), 2u);
  EXPECT_EQ(w[0].ids, (std::vector<int32_t>{0, 1, 2, 3}));
  EXPECT_EQ(w[1].ids, (std::vector<int32_t>{4, 5, 6, 7}));
  EXPECT_EQ(w[0].start, 0);
  EXPECT_EQ(w[1].start, 4);
  // Each window is its own resampling unit.
  EXPECT_EQ(w[0].doc, 0);
  EXPECT_EQ(w[1].doc, 1);
  EXPECT_EQ(scored_tokens(w), 6);
  EXPECT_EQ(stream_windows(iota_ids(12), 4).size(), 3u);
  EXPECT_TRUE(stream_windows(iota_ids(3), 4).empty());
  EXPECT_THROW(stream_windows(ids, 1), ShapeError);
}

TEST(DocumentWindows, PartialKeptShortSkipped) {
  std::vector<Document> docs(5);
  docs[0].ids = iota_ids(9);   // 4 + 4 + 1: the lone last token has no window
  docs[1].ids = iota_ids(1);   // skipped
  docs[2].ids = iota_ids(6);   // 4 + 2
  docs[3].ids = {};            // skipped
  docs[4].ids = iota_ids(2);   // one window of 2
  int64_t skipped = -1;
  const auto w = document_windows(docs, 4, &skipped);
  EXPECT_EQ(skipped, 2);
  ASSERT_EQ(w.size(), 5u);
  EXPECT_EQ(w[0].doc, 0);
  EXPECT_EQ(w[1].doc, 0);
  EXPECT_EQ(w[1].start, 4);
  EXPECT_EQ(w[1].ids.size(), 4u);
  EXPECT_EQ(w[2].doc, 2);
  EXPECT_EQ(w[3].doc, 2);
  EXPECT_EQ(w[3].start, 4);
  EXPECT_EQ(w[3].ids, (std::vector<int32_t>{4, 5}));
  EXPECT_EQ(w[4].doc, 4);
  EXPECT_EQ(w[4].ids, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(scored_tokens(w), 3 + 3 + 3 + 1 + 1);
  EXPECT_NO_THROW(document_windows(docs, 4));
  EXPECT_THROW(document_windows(docs, 0), ShapeError);
}

// ---- calibration windows ----------------------------------------------------------------------

TEST(CalibrationWindows, StridedFollowsReferenceRule) {
  const auto ids = iota_ids(1000);
  const auto w = calibration_windows(ids, 8, 100, CalibRule::Strided, 0);
  ASSERT_EQ(w.size(), 8u);
  const int64_t stride = (1000 - 100) / 8;  // 112
  for (size_t i = 0; i < w.size(); ++i) {
    ASSERT_EQ(w[i].size(), 100u);
    EXPECT_EQ(w[i].front(), static_cast<int32_t>(i * stride));
    EXPECT_EQ(w[i].back(), static_cast<int32_t>(i * stride + 99));
  }
  // The seed plays no part in the strided rule.
  EXPECT_EQ(w, calibration_windows(ids, 8, 100, CalibRule::Strided, 99));
  // n = 1 with the text exactly one window long is fine (stride 0 but one window).
  EXPECT_EQ(calibration_windows(iota_ids(100), 1, 100, CalibRule::Strided, 0).size(), 1u);
}

TEST(CalibrationWindows, StridedDrawsShiftEveryWindowByTheirOffset) {
  const auto ids = iota_ids(1000);
  const int64_t stride = (1000 - 100) / 8, step = stride / 5;  // 112, 22
  for (int k = 0; k < 5; ++k) {
    const auto w = calibration_windows(ids, 8, 100, CalibRule::Strided, 0, CalibDraw{k, 5});
    ASSERT_EQ(w.size(), 8u);
    for (size_t i = 0; i < w.size(); ++i) {
      EXPECT_EQ(w[i].front(), static_cast<int32_t>(k * step + static_cast<int64_t>(i) * stride));
      EXPECT_EQ(w[i].size(), 100u);
    }
  }
  // Draw 0 of any count is the plain rule; the last window of the last draw fits the text.
  EXPECT_EQ(calibration_windows(ids, 8, 100, CalibRule::Strided, 0, CalibDraw{0, 5}),
            calibration_windows(ids, 8, 100, CalibRule::Strided, 0));
  const auto last = calibration_windows(iota_ids(108), 8, 100, CalibRule::Strided, 0, CalibDraw{0, 1});
  EXPECT_EQ(last.back().back(), 106);
  // Random draws: draw 0 keeps the historical starts, other draws are other sets.
  const auto r0 = calibration_windows(iota_ids(5000), 16, 50, CalibRule::Random, 7, CalibDraw{0, 3});
  const auto r1 = calibration_windows(iota_ids(5000), 16, 50, CalibRule::Random, 7, CalibDraw{1, 3});
  EXPECT_EQ(r0, calibration_windows(iota_ids(5000), 16, 50, CalibRule::Random, 7));
  EXPECT_NE(r0, r1);
  // Errors: a draw outside [0, draws), and draws that would all be the same windows.
  const std::string bad = error_of([&] { calibration_windows(ids, 8, 100, CalibRule::Strided, 0, CalibDraw{5, 5}); });
  EXPECT_NE(bad.find("draw 5 of 5"), std::string::npos) << bad;
  // 108 tokens, 8 windows of 100: stride 1, so 2 draws cannot differ.
  const std::string same = error_of([] { calibration_windows(iota_ids(108), 8, 100, CalibRule::Strided, 0, CalibDraw{1, 2}); });
  EXPECT_NE(same.find("the draws would be the same windows"), std::string::npos) << same;
}

TEST(CalibrationWindows, RandomIsAPureFunctionOfTheSeedAndInBounds) {
  const auto ids = iota_ids(500);
  const auto a = calibration_windows(ids, 64, 50, CalibRule::Random, 7);
  const auto b = calibration_windows(ids, 64, 50, CalibRule::Random, 7);
  const auto c = calibration_windows(ids, 64, 50, CalibRule::Random, 8);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  std::set<int32_t> starts;
  for (const auto& w : a) {
    ASSERT_EQ(w.size(), 50u);
    EXPECT_GE(w.front(), 0);
    EXPECT_LE(w.front(), 450);
    for (size_t k = 1; k < w.size(); ++k) EXPECT_EQ(w[k], w[0] + static_cast<int32_t>(k));
    starts.insert(w.front());
  }
  EXPECT_GT(starts.size(), 40u);  // 64 draws from 451 values are not all the same
  // Prefix property: more windows keep the first ones (offset i depends only on i).
  const auto more = calibration_windows(ids, 80, 50, CalibRule::Random, 7);
  EXPECT_TRUE(std::equal(a.begin(), a.end(), more.begin()));
  // Both ends of the range are reachable: a text one token longer than seq gives starts 0/1.
  std::set<int32_t> tiny;
  for (const auto& w : calibration_windows(iota_ids(51), 64, 50, CalibRule::Random, 3))
    tiny.insert(w.front());
  EXPECT_EQ(tiny, (std::set<int32_t>{0, 1}));
  // A text exactly seq long has one possible window.
  for (const auto& w : calibration_windows(iota_ids(50), 5, 50, CalibRule::Random, 3))
    EXPECT_EQ(w.front(), 0);
}

TEST(CalibrationWindows, Errors) {
  const std::string msg = error_of([] { calibration_windows(iota_ids(99), 4, 100, CalibRule::Random, 0); });
  EXPECT_NE(msg.find("99 tokens, fewer than one window of seq = 100"), std::string::npos) << msg;
  EXPECT_THROW(calibration_windows(iota_ids(99), 4, 100, CalibRule::Strided, 0), ShapeError);
  // 103 tokens, 4 strided windows of 100: stride 0.
  EXPECT_THROW(calibration_windows(iota_ids(103), 4, 100, CalibRule::Strided, 0), ShapeError);
  EXPECT_NO_THROW(calibration_windows(iota_ids(104), 4, 100, CalibRule::Strided, 0));
  EXPECT_THROW(calibration_windows(iota_ids(500), 0, 100, CalibRule::Random, 0), ShapeError);
  EXPECT_STREQ(calib_rule_name(CalibRule::Strided), "strided");
  EXPECT_STREQ(calib_rule_name(CalibRule::Random), "random");
}

// ---- token and position buckets ---------------------------------------------------------------

TEST(TokenBuckets, RanksByCountTiesByIdOnTinyCorpus) {
  // counts: 5->4, 2->3, 7->3, 0->2, 9->1, 3->1; vocab 12 (1,4,6,8,10,11 unseen).
  const std::vector<int32_t> corpus{5, 2, 7, 5, 0, 2, 7, 5, 9, 0, 2, 7, 5, 3};
  const auto b = TokenBuckets::from_corpus(corpus, 12, {2, 4});
  EXPECT_EQ(b.names(), (std::vector<std::string>{"top2", "2-4", ">4", "unseen"}));
  // Ranks: 5 (0), 2 (1), 7 (2, tie with 2 broken by id), 0 (3), 3 (4, tie with 9), 9 (5).
  EXPECT_EQ(b.bucket_of(5), 0);
  EXPECT_EQ(b.bucket_of(2), 0);
  EXPECT_EQ(b.bucket_of(7), 1);
  EXPECT_EQ(b.bucket_of(0), 1);
  EXPECT_EQ(b.bucket_of(3), 2);
  EXPECT_EQ(b.bucket_of(9), 2);
  for (int32_t t : {1, 4, 6, 8, 10, 11}) EXPECT_EQ(b.bucket_of(t), 3) << t;
  EXPECT_EQ(b.count(5), 4);
  EXPECT_EQ(b.count(1), 0);
  EXPECT_EQ(b.corpus_tokens(), 14);
  EXPECT_EQ(b.vocab(), 12);
  EXPECT_THROW(b.bucket_of(12), ShapeError);
  EXPECT_THROW(b.bucket_of(-1), ShapeError);

  // The hash identifies the corpus: order matters, equal corpora hash equal.
  auto swapped = corpus;
  std::swap(swapped[0], swapped[1]);
  EXPECT_EQ(TokenBuckets::from_corpus(corpus, 12, {2, 4}).corpus_hash(), b.corpus_hash());
  EXPECT_NE(TokenBuckets::from_corpus(swapped, 12, {2, 4}).corpus_hash(), b.corpus_hash());
  // FNV-1a of the little-endian bytes of {1}: 01 00 00 00.
  EXPECT_EQ(TokenBuckets::from_corpus({1}, 2).corpus_hash(), fnv1a64(std::string("\x01\0\0\0", 4)));
}

TEST(TokenBuckets, DefaultNamesAndErrors) {
  const auto b = TokenBuckets::from_corpus(iota_ids(5), 5);
  EXPECT_EQ(b.names(), (std::vector<std::string>{"top100", "100-1k", "1k-10k", ">10k", "unseen"}));
  EXPECT_EQ(TokenBuckets::from_corpus({0}, 1, {5, 2000000}).names(),
            (std::vector<std::string>{"top5", "5-2M", ">2M", "unseen"}));
  EXPECT_THROW(TokenBuckets::from_corpus({0, 5}, 5), ShapeError);
  EXPECT_THROW(TokenBuckets::from_corpus({0}, 5, {10, 10}), ShapeError);
  EXPECT_THROW(TokenBuckets::from_corpus({0}, 5, {0}), ShapeError);
  EXPECT_THROW(TokenBuckets::from_corpus({0}, 0), ShapeError);
}

TEST(PositionBuckets, Boundaries) {
  EXPECT_EQ(position_bucket_names(),
            (std::vector<std::string>{"0-15", "16-63", "64-255", "256-1023", "1024+"}));
  const std::vector<std::pair<int64_t, int>> cases{{0, 0},   {1, 0},    {15, 0},   {16, 1},
                                                   {63, 1},  {64, 2},   {255, 2},  {256, 3},
                                                   {1023, 3}, {1024, 4}, {1 << 20, 4}};
  for (const auto& c : cases) EXPECT_EQ(position_bucket(c.first), c.second) << c.first;
  EXPECT_THROW(position_bucket(-1), ShapeError);
}

// ---- token-id files ---------------------------------------------------------------------------

TEST(TokenIdFile, ReadsOneDocumentPerLine) {
  TempDir dir("ids");
  const auto p = dir.file("ids.txt", "1 5 7\r\n\n  3\t4  \n2147483647\n");
  const auto docs = read_token_id_file(p);
  ASSERT_EQ(docs.size(), 4u);
  EXPECT_EQ(docs[0], (std::vector<int32_t>{1, 5, 7}));
  EXPECT_TRUE(docs[1].empty());
  EXPECT_EQ(docs[2], (std::vector<int32_t>{3, 4}));
  EXPECT_EQ(docs[3], (std::vector<int32_t>{2147483647}));
  // No final newline: the last line still counts.
  EXPECT_EQ(read_token_id_file(dir.file("b.txt", "1\n2")).size(), 2u);
  EXPECT_TRUE(read_token_id_file(dir.file("empty.txt", "")).empty());

  const auto d = token_id_documents(dir.file("c.txt", "1 2 3\n4\n"), 10);
  ASSERT_EQ(d.size(), 2u);
  EXPECT_EQ(d[0].id, "line1");
  EXPECT_EQ(d[1].id, "line2");
  EXPECT_EQ(d[0].ids, (std::vector<int32_t>{1, 2, 3}));  // verbatim: no BOS added
  EXPECT_TRUE(d[0].attrs.empty());
}

TEST(TokenIdFile, ErrorsNameLineColumnAndToken) {
  TempDir dir("iderr");
  const auto bad = dir.file("bad.txt", "1 2 3\n4  5x 6\n");
  std::string msg = error_of([&] { read_token_id_file(bad); });
  EXPECT_NE(msg.find(bad + ":2:4: "), std::string::npos) << msg;
  EXPECT_NE(msg.find("'5x'"), std::string::npos) << msg;

  const auto neg = dir.file("neg.txt", "\n\n 7 -3\n");
  msg = error_of([&] { read_token_id_file(neg); });
  EXPECT_NE(msg.find(neg + ":3:4: "), std::string::npos) << msg;
  EXPECT_NE(msg.find("'-3'"), std::string::npos) << msg;

  const auto big = dir.file("big.txt", "2147483648\n");
  msg = error_of([&] { read_token_id_file(big); });
  EXPECT_NE(msg.find(big + ":1:1: "), std::string::npos) << msg;
  EXPECT_NE(msg.find("'2147483648'"), std::string::npos) << msg;

  EXPECT_THROW(read_token_id_file(dir.str() + "/missing.txt"), IoError);

  // Vocabulary check: names what, the id and its position.
  msg = error_of([] { check_ids(std::vector<int32_t>{0, 3, 9, 1}, 8, "my.ids"); });
  EXPECT_NE(msg.find("my.ids: token id 9 at position 2 is outside the vocabulary [0, 8)"),
            std::string::npos)
      << msg;
  EXPECT_NO_THROW(check_ids(std::vector<int32_t>{0, 7}, 8, "x"));
  msg = error_of([] { check_ids(std::vector<std::vector<int32_t>>{{1}, {2, 8}}, 8, "f"); });
  EXPECT_NE(msg.find("token id 8 at document 1 position 1"), std::string::npos) << msg;
  const auto p = dir.file("v.txt", "1\n2 9\n");
  msg = error_of([&] { token_id_documents(p, 8); });
  EXPECT_NE(msg.find(p + ":2: token id 9 at position 1"), std::string::npos) << msg;
}

// ---- tokenizer loading errors -----------------------------------------------------------------

// A directory with only tokenizer.json reads it; a malformed one is named with the JSON path.
TEST(TokenizerLoad, TokenizerJsonOnlyDirectory) {
  TempDir dir("tjson");
  dir.file("config.json", "{}");
  dir.file("tokenizer.json", "{}");
  const std::string msg = error_of([&] { Tokenizer::load(dir.str()); });
  EXPECT_NE(msg.find(dir.str() + "/tokenizer.json: model: missing"), std::string::npos) << msg;
  EXPECT_THROW(Tokenizer::load(dir.str()), IoError);
}

TEST(TokenizerLoad, NoTokenizerOrBadFile) {
  TempDir dir("none");
  std::string msg = error_of([&] { Tokenizer::load(dir.str()); });
  EXPECT_NE(msg.find(dir.str() + ": no tokenizer found"), std::string::npos) << msg;
  msg = error_of([&] { Tokenizer::load(dir.str() + "/nope"); });
  EXPECT_NE(msg.find(dir.str() + "/nope: no such directory"), std::string::npos) << msg;
  dir.file("tokenizer.model", "not a protobuf");
  msg = error_of([&] { Tokenizer::load(dir.str()); });
  EXPECT_NE(msg.find("tokenizer.model: sentencepiece cannot load"), std::string::npos) << msg;
}

// ---- the real tokenizer and the golden protocol -------------------------------------------------

TEST(RealTokenizer, SpecialIdsAndRoundTrip) {
  REQUIRE_SHARED_DATA();
  const Tokenizer& tok = austen_tokenizer();
  EXPECT_EQ(tok.vocab_size(), 4096);
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  const std::string s = "Captain Wentworth, said Anne.";
  const auto ids = tok.encode(s);
  ASSERT_FALSE(ids.empty());
  EXPECT_NE(ids.front(), tok.bos_id());  // no BOS added
  EXPECT_NE(ids.back(), tok.eos_id());   // no EOS added
  EXPECT_EQ(tok.decode(ids), s);
  EXPECT_EQ(Tokenizer::load(kModelDir + "/tokenizer.model").encode(s), ids);  // file path form
  EXPECT_THROW(tok.decode(4096), ShapeError);
  EXPECT_THROW(tok.piece(-1), ShapeError);
  EXPECT_EQ(tok.piece(tok.bos_id()), "<s>");
}

TEST(GoldenStream, PersuasionIdsMatchReference) {
  REQUIRE_SHARED_DATA();
  const auto g = golden();
  const auto ids = stream_ids(kText + "/persuasion.txt", austen_tokenizer());
  EXPECT_EQ(static_cast<int64_t>(ids.size()), g["stream_ppl"]["persuasion"]["n_ids"].get<int64_t>());
  EXPECT_EQ(ids.size(), 117851u);
  const auto first64 = g["logits_first64"]["token_ids"].get<std::vector<int32_t>>();
  ASSERT_EQ(first64.size(), 64u);
  EXPECT_EQ(std::vector<int32_t>(ids.begin(), ids.begin() + 64), first64);

  const auto w = stream_windows(ids, g["seq"].get<int>());
  EXPECT_EQ(w.size(), 460u);
  EXPECT_EQ(scored_tokens(w), g["stream_ppl"]["persuasion"]["scored_tokens"].get<int64_t>());
  EXPECT_EQ(scored_tokens(w), 117300);
  EXPECT_EQ(w.back().doc, 459);
}

TEST(GoldenStream, Wikitext2IdsMatchReference) {
  REQUIRE_SHARED_DATA();
  const auto g = golden();
  const auto ids = stream_ids(kText + "/wikitext2_test.txt", austen_tokenizer());
  EXPECT_EQ(static_cast<int64_t>(ids.size()), g["stream_ppl"]["wikitext2"]["n_ids"].get<int64_t>());
  EXPECT_EQ(ids.size(), 487088u);
  EXPECT_EQ(ids.front(), 1);
  EXPECT_EQ(scored_tokens(stream_windows(ids, 256)),
            g["stream_ppl"]["wikitext2"]["scored_tokens"].get<int64_t>());
  EXPECT_EQ(scored_tokens(stream_windows(ids, 256)), 485010);
}

TEST(GoldenStream, BlankLineReadingIsInvisibleToThisTokenizer) {
  // The austen tokenizer normalizes with nmt_nfkc and collapses whitespace runs, so every
  // reading of "split on blank lines" (and even no splitting) yields the golden ids; the reading
  // documented in split_documents is the one that matters for tokenizers that keep whitespace.
  REQUIRE_SHARED_DATA();
  const Tokenizer& tok = austen_tokenizer();
  const std::string raw = read_text_file(kText + "/persuasion.txt");
  std::vector<int32_t> unsplit{tok.bos_id()};
  const auto body = tok.encode(raw);
  unsplit.insert(unsplit.end(), body.begin(), body.end());
  EXPECT_EQ(encode_stream(raw, tok), unsplit);
  EXPECT_EQ(tok.encode("a\n\n\n \nb"), tok.encode("a\n\nb"));
}

TEST(GoldenSlices, ScoredTokensAndDocumentsPerSliceValue) {
  REQUIRE_SHARED_DATA();
  const auto g = golden();
  const auto docs = jsonl_documents(kText + "/slices.jsonl", austen_tokenizer());
  ASSERT_EQ(docs.size(), 1008u);
  EXPECT_EQ(docs[0].id, "line1");
  EXPECT_EQ(docs[0].ids.front(), 1);
  EXPECT_EQ(docs[0].attrs, (std::vector<std::pair<std::string, std::string>>{
                               {"register", "narration"}, {"source", "austen"}}));
  int64_t skipped = -1;
  const auto windows = document_windows(docs, g["seq"].get<int>(), &skipped);
  EXPECT_EQ(skipped, 0);

  std::map<std::string, int64_t> tokens;
  std::map<std::string, std::set<int>> members;
  for (const Window& w : windows)
    for (const auto& kv : docs[static_cast<size_t>(w.doc)].attrs) {
      const std::string key = kv.first + "=" + kv.second;
      tokens[key] += static_cast<int64_t>(w.ids.size()) - 1;
      members[key].insert(w.doc);
    }
  const auto& ref = g["slice_ppl"];
  ASSERT_EQ(tokens.size(), ref.size());
  for (auto it = ref.begin(); it != ref.end(); ++it) {
    ASSERT_TRUE(tokens.count(it.key())) << it.key();
    EXPECT_EQ(tokens[it.key()], it.value()["scored_tokens"].get<int64_t>()) << it.key();
    EXPECT_EQ(static_cast<int64_t>(members[it.key()].size()), it.value()["documents"].get<int64_t>())
        << it.key();
  }
  EXPECT_EQ(tokens["register=dialogue"], 57212);
  EXPECT_EQ(members["register=dialogue"].size(), 514u);
  EXPECT_EQ(tokens["source=austen"], 117300);
  EXPECT_EQ(members["source=austen"].size(), 968u);
  EXPECT_EQ(tokens["source=wikipedia"], 349766);
  EXPECT_EQ(members["source=wikipedia"].size(), 40u);
}

TEST(GoldenCalibration, StridedRuleOnTrainingText) {
  REQUIRE_SHARED_DATA();
  const auto& ids = austen_train_ids();
  // gptq_smoothquant.json: stride = (len(ids) - 256) // 128 = 6711.
  EXPECT_EQ((static_cast<int64_t>(ids.size()) - 256) / 128, 6711);
  const auto offs = calibration_offsets(static_cast<int64_t>(ids.size()), 128, 256,
                                        CalibRule::Strided, 0);
  EXPECT_EQ(offs[1], 6711);
  EXPECT_EQ(offs[127], 127 * 6711);
  const auto w = calibration_windows(ids, 128, 256, CalibRule::Strided, 0);
  ASSERT_EQ(w.size(), 128u);
  EXPECT_EQ(w[0].front(), 1);  // window 0 starts with BOS
  for (size_t i = 0; i < w.size(); i += 31)
    EXPECT_TRUE(std::equal(w[i].begin(), w[i].end(), ids.begin() + static_cast<int64_t>(i) * 6711));
  // gptq_smoothquant.json "draws": draw k of 5 shifts every window by k * (6711 // 5) = k * 1342.
  const auto d3 = calibration_offsets(static_cast<int64_t>(ids.size()), 128, 256, CalibRule::Strided,
                                      0, CalibDraw{3, 5});
  EXPECT_EQ(d3[0], 3 * 1342);
  EXPECT_EQ(d3[127], 3 * 1342 + 127 * 6711);
}

TEST(GoldenBuckets, TrainingCorpusBuckets) {
  REQUIRE_SHARED_DATA();
  const Tokenizer& tok = austen_tokenizer();
  const auto& ids = austen_train_ids();
  const auto b = TokenBuckets::from_corpus(ids, tok.vocab_size());
  std::vector<int> sizes(b.names().size(), 0);
  for (int t = 0; t < tok.vocab_size(); ++t) ++sizes[static_cast<size_t>(b.bucket_of(t))];
  EXPECT_EQ(sizes[0], 100);
  EXPECT_EQ(sizes[1], 900);
  EXPECT_EQ(sizes[3], 0);  // a 4096-piece vocabulary has no rank >= 10k
  EXPECT_EQ(sizes[2] + sizes[4], 4096 - 1000);
  // The most frequent tokens of English prose are in top100; every top100 token is at least as
  // frequent as every 100-1k token.
  EXPECT_EQ(b.bucket_of(tok.encode(",").back()), 0);
  int64_t min_top = INT64_MAX, max_next = 0;
  for (int t = 0; t < tok.vocab_size(); ++t) {
    if (b.bucket_of(t) == 0) min_top = std::min(min_top, b.count(t));
    if (b.bucket_of(t) == 1) max_next = std::max(max_next, b.count(t));
  }
  EXPECT_GE(min_top, max_next);
  EXPECT_EQ(b.corpus_tokens(), static_cast<int64_t>(ids.size()));
  EXPECT_EQ(b.corpus_hash(), TokenBuckets::from_corpus(ids, tok.vocab_size()).corpus_hash());
}

// ---- JSONL documents ----------------------------------------------------------------------------

TEST(JsonlDocuments, AttributesIdsAndErrors) {
  REQUIRE_SHARED_DATA();
  const Tokenizer& tok = austen_tokenizer();
  TempDir dir("jsonl");
  const auto ok = dir.file(
      "ok.jsonl",
      "{\"text\": \"Anne smiled.\", \"slice\": {\"source\": \"austen\", \"year\": 1817, \"x\": 0.5, \"q\": true}}\r\n"
      "\n"
      "{\"text\": \"\", \"id\": \"empty-doc\"}\n"
      "{\"id\": 42, \"text\": \"Bath.\"}\n");
  const auto docs = jsonl_documents(ok, tok);
  ASSERT_EQ(docs.size(), 3u);
  EXPECT_EQ(docs[0].id, "line1");
  EXPECT_EQ(docs[0].attrs, (std::vector<std::pair<std::string, std::string>>{
                               {"q", "true"}, {"source", "austen"}, {"x", "0.5"}, {"year", "1817"}}));
  std::vector<int32_t> expect{1};
  for (int32_t t : tok.encode("Anne smiled.")) expect.push_back(t);
  EXPECT_EQ(docs[0].ids, expect);
  EXPECT_EQ(docs[1].id, "empty-doc");
  EXPECT_EQ(docs[1].ids, (std::vector<int32_t>{1}));
  EXPECT_EQ(docs[2].id, "42");
  EXPECT_TRUE(docs[2].attrs.empty());
  int64_t skipped = 0;
  document_windows(docs, 256, &skipped);
  EXPECT_EQ(skipped, 1);  // the empty text is [BOS] only

  struct Case {
    std::string line, expect;
  };
  const std::vector<Case> cases{
      {"{\"slice\": {}}", ":2: field 'text' is missing"},
      {"{\"text\": 3}", ":2: field 'text': expected a string, found number"},
      {"{\"text\": \"a\", \"slice\": [1]}", ":2: field 'slice': expected an object"},
      {"{\"text\": \"a\", \"slice\": {\"register\": [1]}}", ":2: field 'slice.register': expected a string"},
      {"{\"text\": \"a\", \"slices\": {}}", ":2: unknown field 'slices'"},
      {"{\"text\": \"a\", \"id\": 1.5}", ":2: field 'id': expected a string or an integer"},
      {"{\"text\": \"a\", \"id\": \"line1\"}", ":2: field 'id': document id 'line1' was already used on line 1"},
      {"{\"text\": \"a\"", ":2: invalid JSON"},
      {"[1, 2]", ":2: expected a JSON object"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto p = dir.file("bad" + std::to_string(i) + ".jsonl", "{\"text\": \"x\"}\n" + cases[i].line + "\n");
    const std::string msg = error_of([&] { jsonl_documents(p, tok); });
    EXPECT_NE(msg.find(p + cases[i].expect), std::string::npos) << msg;
    EXPECT_THROW(jsonl_documents(p, tok), IoError);
  }
  EXPECT_THROW(jsonl_documents(dir.str() + "/missing.jsonl", tok), IoError);
}

}  // namespace
}  // namespace ql
