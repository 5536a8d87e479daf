#include "core/config_node.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace ql {
namespace {

// Structural equality: kind, scalar text, quotedness, key order and children.
::testing::AssertionResult same_tree(const ConfigNode& a, const ConfigNode& b,
                                     const std::string& at = "<root>") {
  if (a.kind() != b.kind())
    return ::testing::AssertionFailure() << at << ": kinds differ (" << a.to_flow() << " vs "
                                         << b.to_flow() << ")";
  if (a.is_scalar()) {
    if (a.value() != b.value())
      return ::testing::AssertionFailure() << at << ": '" << a.value() << "' vs '" << b.value()
                                           << "'";
    if (a.quoted() != b.quoted())
      return ::testing::AssertionFailure() << at << ": quoted flag differs for '" << a.value()
                                           << "'";
  }
  if (a.size() != b.size())
    return ::testing::AssertionFailure() << at << ": sizes " << a.size() << " vs " << b.size();
  if (a.is_sequence())
    for (std::size_t i = 0; i < a.size(); ++i) {
      auto r = same_tree(a.at(i), b.at(i), at + "." + std::to_string(i));
      if (!r) return r;
    }
  if (a.is_map())
    for (std::size_t i = 0; i < a.size(); ++i) {
      if (a.entries()[i].first != b.entries()[i].first)
        return ::testing::AssertionFailure() << at << ": key '" << a.entries()[i].first
                                             << "' vs '" << b.entries()[i].first << "'";
      auto r = same_tree(a.entries()[i].second, b.entries()[i].second,
                         at + "." + a.entries()[i].first);
      if (!r) return r;
    }
  return ::testing::AssertionSuccess();
}

const char* kDoc =
    "seed: 3\n"
    "quant:\n"
    "  - method: gptq\n"
    "    bits: 4\n"
    "name: \"8\"\n"
    "tags: [a, 'b']\n"
    "empty:\n"
    "last: ~\n";

TEST(ConfigNode, ParseKindsOrderAndValues) {
  ConfigNode n = ConfigNode::parse(kDoc, "t.yaml");
  ASSERT_TRUE(n.is_map());
  ASSERT_EQ(n.size(), 6u);
  std::vector<std::string> keys;
  for (auto& e : n.entries()) keys.push_back(e.first);
  EXPECT_EQ(keys, (std::vector<std::string>{"seed", "quant", "name", "tags", "empty", "last"}));
  EXPECT_EQ(n.find("seed")->value(), "3");
  ASSERT_TRUE(n.find("quant")->is_sequence());
  EXPECT_EQ(n.find("quant")->at(0).find("bits")->value(), "4");
  EXPECT_TRUE(n.find("empty")->is_null());
  EXPECT_TRUE(n.find("last")->is_null());
  EXPECT_EQ(n.find("missing"), nullptr);
}

TEST(ConfigNode, LocationsOfValuesAndKeys) {
  ConfigNode n = ConfigNode::parse(kDoc, "t.yaml");
  EXPECT_EQ(n.find("seed")->loc().str(), "t.yaml:1:7");
  EXPECT_EQ(n.key_loc("seed").str(), "t.yaml:1:1");
  const ConfigNode& step = n.find("quant")->at(0);
  EXPECT_EQ(step.loc().str(), "t.yaml:3:5");
  EXPECT_EQ(step.key_loc("bits").str(), "t.yaml:4:5");
  EXPECT_EQ(step.find("bits")->loc().str(), "t.yaml:4:11");
  EXPECT_EQ(n.find("tags")->at(1).loc().str(), "t.yaml:6:11");
  // An empty value points at its key, not at the next line's token.
  EXPECT_EQ(n.find("empty")->loc().line, 7);
  // Unknown key: the map's own location.
  EXPECT_EQ(n.key_loc("nope").str(), n.loc().str());
}

TEST(ConfigNode, QuotedDetection) {
  ConfigNode n = ConfigNode::parse(
      "a: 8\nb: \"8\"\nc: '8'\nd: !!str 8\ne: |\n  text\nf: plain words\n", "q.yaml");
  EXPECT_FALSE(n.find("a")->quoted());
  EXPECT_TRUE(n.find("b")->quoted());
  EXPECT_TRUE(n.find("c")->quoted());
  EXPECT_TRUE(n.find("d")->quoted());
  EXPECT_TRUE(n.find("e")->quoted());
  EXPECT_EQ(n.find("e")->value(), "text\n");
  EXPECT_FALSE(n.find("f")->quoted());
  EXPECT_EQ(n.find("f")->value(), "plain words");
}

TEST(ConfigNode, SyntaxErrorIsConfigErrorAtLine) {
  try {
    ConfigNode::parse("a: 1\nb: [1, 2\nc: 3\n", "bad.yaml");
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.loc().file, "bad.yaml");
    EXPECT_GE(e.loc().line, 2);
    EXPECT_NE(std::string(e.what()).find("bad.yaml:"), std::string::npos);
    EXPECT_NE(e.detail().find("YAML syntax error"), std::string::npos) << e.what();
  }
}

TEST(ConfigNode, DuplicateKeyErrorAtSecondKey) {
  try {
    ConfigNode::parse("a: 1\nb:\n  x: 1\n  x: 2\n", "dup.yaml");
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.loc().str(), "dup.yaml:4:3");
    EXPECT_EQ(e.key_path(), "x");
    EXPECT_NE(e.detail().find("duplicate key"), std::string::npos);
    EXPECT_NE(e.detail().find("dup.yaml:3:3"), std::string::npos) << e.detail();
  }
}

TEST(ConfigNode, MultipleDocumentsRejected) {
  EXPECT_THROW(ConfigNode::parse("a: 1\n---\nb: 2\n", "m.yaml"), ConfigError);
}

TEST(ConfigNode, EmptyTextIsNull) {
  ConfigNode n = ConfigNode::parse("", "e.yaml");
  EXPECT_TRUE(n.is_null());
  EXPECT_EQ(n.loc().file, "e.yaml");
}

TEST(ConfigNode, LoadFileMissingIsIoError) {
  EXPECT_THROW(ConfigNode::load_file("/nonexistent/dir/none.yaml"), IoError);
}

TEST(ConfigNode, LoadFileRecordsPath) {
  const std::string path = std::string(QL_SOURCE_DIR) + "/tests/data/config/parts/common.yaml";
  ConfigNode n = ConfigNode::load_file(path);
  ASSERT_TRUE(n.is_map());
  EXPECT_EQ(n.key_loc("seed").file, path);
  EXPECT_EQ(n.key_loc("seed").line, 2);
}

TEST(ConfigNode, ToYamlRoundTripNested) {
  const char* text =
      "seed: 0\n"
      "quant:\n"
      "  - method: gptq\n"
      "    spec: {bits: 4, group: 128}\n"
      "    targets: [q_proj, 'k_proj']\n"
      "  - [1, 2, [3, {x: y}]]\n"
      "  - []\n"
      "  - {}\n"
      "  - ~\n"
      "eval: {}\n"
      "neg: -1\n"
      "f: 1.5e-3\n"
      "inf: -.inf\n"
      "words: hello world, again\n";
  ConfigNode a = ConfigNode::parse(text, "a.yaml");
  const std::string y = a.to_yaml();
  ConfigNode b = ConfigNode::parse(y, "b.yaml");
  EXPECT_TRUE(same_tree(a, b)) << y;
  // Canonical: emitting again gives the same text.
  EXPECT_EQ(b.to_yaml(), y);
  // Plain values stay plain, so typed values are not turned into strings.
  EXPECT_EQ(y.find("\"-1\""), std::string::npos) << y;
  EXPECT_NE(y.find("neg: -1\n"), std::string::npos) << y;
  EXPECT_NE(y.find("- \"k_proj\"\n"), std::string::npos) << y;
}

TEST(ConfigNode, ToYamlRoundTripTrickyStrings) {
  const std::vector<std::string> tricky = {
      "", " lead", "trail ", "8", "4.0", "true", "no", "null", "~", "NULL", "a: b", "x #y",
      "- item", "-", "?", ":", "[x]", "{x}", "#c", "&a", "*b", "!t", "|", ">", "'", "\"",
      "%p", "@at", "`bt", "line\nbreak", "tab\there", "back\\slash", "---", "...", "colon:",
      "ctrl\x01", "\xc3\xbc unicode", ",x", "a, b", "x:y", "plain"};
  // Built in code (not marked quoted): emission must quote whatever YAML would misread.
  ConfigNode q = ConfigNode::map();
  ConfigNode seq = ConfigNode::sequence();
  for (const auto& s : tricky) seq.push_back(ConfigNode::scalar(s));
  q.set("values", seq);
  // Tricky keys too.
  q.set("a: b", ConfigNode::scalar("v1"));
  q.set("", ConfigNode::scalar("v2"));
  q.set("8", ConfigNode::scalar("v3"));
  q.set("true", ConfigNode::scalar("v4"));
  q.set("- k", ConfigNode::scalar("v5"));

  const std::string y = q.to_yaml();
  ConfigNode back = ConfigNode::parse(y, "rt.yaml");
  ASSERT_TRUE(back.is_map()) << y;
  const ConfigNode* vals = back.find("values");
  ASSERT_NE(vals, nullptr) << y;
  ASSERT_EQ(vals->size(), tricky.size()) << y;
  for (std::size_t i = 0; i < tricky.size(); ++i) {
    ASSERT_TRUE(vals->at(i).is_scalar()) << "'" << tricky[i] << "' in\n" << y;
    EXPECT_EQ(vals->at(i).value(), tricky[i]) << y;
  }
  for (const char* k : {"a: b", "", "8", "true", "- k"}) EXPECT_NE(back.find(k), nullptr) << k;
  // A second round trip is exact (quoted flags included) and the text is a fixed point.
  ConfigNode again = ConfigNode::parse(back.to_yaml(), "rt2.yaml");
  EXPECT_TRUE(same_tree(back, again));
  EXPECT_EQ(again.to_yaml(), back.to_yaml());
}

TEST(ConfigNode, QuotedScalarsStayStrings) {
  ConfigNode a = ConfigNode::parse("a: '8'\nb: 8\nc: \"true\"\nd: true\n", "q.yaml");
  ConfigNode b = ConfigNode::parse(a.to_yaml(), "r.yaml");
  EXPECT_TRUE(same_tree(a, b)) << a.to_yaml();
  EXPECT_TRUE(b.find("a")->quoted());
  EXPECT_FALSE(b.find("b")->quoted());
  EXPECT_TRUE(b.find("c")->quoted());
  EXPECT_FALSE(b.find("d")->quoted());
}

TEST(ConfigNode, ToYamlShape) {
  ConfigNode a = ConfigNode::parse("b: 1\na:\n  - x: 1\n    y: [2]\n  - - z\n", "s.yaml");
  EXPECT_EQ(a.to_yaml(), "b: 1\na:\n  - x: 1\n    y:\n      - 2\n  - - z\n");
  EXPECT_EQ(ConfigNode::scalar("hi").to_yaml(), "hi\n");
  EXPECT_EQ(ConfigNode().to_yaml(), "null\n");
}

TEST(ConfigNode, ToFlow) {
  ConfigNode a = ConfigNode::parse("a: 1\nb: [x, y]\nc: {d: 'e,f'}\ne:\n", "f.yaml");
  EXPECT_EQ(a.to_flow(), "{a: 1, b: [x, y], c: {d: \"e,f\"}, e: null}");
  EXPECT_EQ(ConfigNode::sequence().to_flow(), "[]");
  // Flow text parses back to the same tree.
  ConfigNode b = ConfigNode::parse(a.to_flow(), "g.yaml");
  EXPECT_TRUE(same_tree(a, b));
}

TEST(ConfigNode, SetAndGetPath) {
  ConfigNode n = ConfigNode::parse(kDoc, "t.yaml");
  n.set_path("quant.0.bits", ConfigNode::scalar("3", {"cli", 1, 5}));
  EXPECT_EQ(n.get_path("quant.0.bits")->value(), "3");
  EXPECT_EQ(n.get_path("quant.0.bits")->loc().str(), "cli:1:5");
  // Key order is kept when replacing.
  EXPECT_EQ(n.find("quant")->at(0).entries()[1].first, "bits");

  n.set_path("calib.n_samples", ConfigNode::scalar("64"));
  ASSERT_NE(n.find("calib"), nullptr);
  EXPECT_TRUE(n.find("calib")->is_map());
  EXPECT_EQ(n.get_path("calib.n_samples")->value(), "64");
  EXPECT_EQ(n.entries().back().first, "calib");

  // Descending through a null value turns it into a map.
  n.set_path("empty.x", ConfigNode::scalar("1"));
  EXPECT_EQ(n.get_path("empty.x")->value(), "1");

  n.set_path("tags.1", ConfigNode::scalar("c"));
  EXPECT_EQ(n.get_path("tags.1")->value(), "c");

  EXPECT_EQ(n.get_path("quant.1.bits"), nullptr);
  EXPECT_EQ(n.get_path("seed.x"), nullptr);
  EXPECT_EQ(n.get_path("quant.x"), nullptr);
  EXPECT_EQ(n.get_path(""), &n);
}

TEST(ConfigNode, SetPathErrors) {
  ConfigNode n = ConfigNode::parse(kDoc, "t.yaml");
  const SourceLoc at{"<command line>", 1, 14};
  try {
    n.set_path("quant.1.bits", ConfigNode::scalar("3", at));
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.key_path(), "quant.1.bits");
    EXPECT_EQ(e.loc().str(), "<command line>:1:14");
    EXPECT_NE(e.detail().find("out of range"), std::string::npos) << e.what();
    EXPECT_NE(e.detail().find("'quant' has 1 element"), std::string::npos) << e.what();
  }
  try {
    n.set_path("seed.x", ConfigNode::scalar("3", at));
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.key_path(), "seed.x");
    EXPECT_NE(e.detail().find("'seed'"), std::string::npos) << e.what();
  }
  EXPECT_THROW(n.set_path("quant.first.bits", ConfigNode::scalar("3")), ConfigError);
  EXPECT_THROW(n.set_path("quant..bits", ConfigNode::scalar("3")), ConfigError);
  // Nothing was changed by the failed calls.
  EXPECT_EQ(n.get_path("quant.0.bits")->value(), "4");
  EXPECT_EQ(n.find("quant")->size(), 1u);
}

TEST(ConfigNode, MergeFrom) {
  ConfigNode a = ConfigNode::parse(
      "seed: 1\ncalib: {n: 16, len: 128}\nquant: [{m: rtn}, {m: gptq}]\nout: x\n", "a.yaml");
  ConfigNode b = ConfigNode::parse(
      "calib: {len: 256, extra: 1}\nquant: [{m: awq}]\nout: {dir: y}\nnew: 5\n", "b.yaml");
  a.merge_from(b);
  EXPECT_EQ(a.to_flow(),
            "{seed: 1, calib: {n: 16, len: 256, extra: 1}, quant: [{m: awq}], out: {dir: y}, "
            "new: 5}");
  // Merged values keep the location of the file that supplied them.
  EXPECT_EQ(a.get_path("calib.len")->loc().file, "b.yaml");
  EXPECT_EQ(a.get_path("calib.n")->loc().file, "a.yaml");
  EXPECT_EQ(a.key_loc("new").str(), "b.yaml:4:1");
  // A non-map replaces a map.
  ConfigNode c = ConfigNode::parse("calib: 3\n", "c.yaml");
  a.merge_from(c);
  EXPECT_EQ(a.find("calib")->value(), "3");
}

TEST(ConfigNode, SetEraseAndBuilders) {
  ConfigNode m = ConfigNode::map({"f", 1, 1});
  m.set("a", ConfigNode::scalar("1", {"f", 2, 4}));
  m.set("b", ConfigNode::scalar("2"), {"f", 3, 1});
  EXPECT_EQ(m.key_loc("a").str(), "f:2:4");  // defaults to the value's location
  EXPECT_EQ(m.key_loc("b").str(), "f:3:1");
  m.set("a", ConfigNode::scalar("9"));
  EXPECT_EQ(m.entries()[0].first, "a");
  EXPECT_EQ(m.find("a")->value(), "9");
  EXPECT_EQ(m.key_loc("a").str(), "f:2:4");  // replacing keeps the key's own location
  EXPECT_TRUE(m.erase("a"));
  EXPECT_FALSE(m.erase("a"));
  EXPECT_EQ(m.size(), 1u);
  EXPECT_EQ(m.key_loc("b").str(), "f:3:1");
  ConfigNode s = ConfigNode::sequence();
  s.push_back(ConfigNode::scalar("x"));
  s.push_back(ConfigNode::map());
  EXPECT_EQ(s.size(), 2u);
  EXPECT_EQ(s.to_flow(), "[x, {}]");
}

TEST(ConfigNode, EditDistanceAndClosestMatch) {
  EXPECT_EQ(edit_distance("", ""), 0);
  EXPECT_EQ(edit_distance("abc", ""), 3);
  EXPECT_EQ(edit_distance("kitten", "sitting"), 3);
  EXPECT_EQ(edit_distance("granulrity", "granularity"), 1);
  const std::vector<std::string> keys = {"bits", "granularity", "group_size", "scheme"};
  EXPECT_EQ(closest_match("granulrity", keys), "granularity");
  EXPECT_EQ(closest_match("bit", keys), "bits");
  EXPECT_EQ(closest_match("shceme", keys), "scheme");
  EXPECT_EQ(closest_match("percdamp", keys), "");
  EXPECT_EQ(closest_match("xy", {"ab"}), "");  // every character differs: not a misspelling
  // Ties go to the earlier candidate.
  EXPECT_EQ(closest_match("ab", {"abc", "abd"}), "abc");
}

}  // namespace
}  // namespace ql
