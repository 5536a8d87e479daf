#include "core/options.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace ql {
namespace {

// The value of key `k` in a one-line document "k: <text>" parsed as file "o.yaml".
ConfigNode value_of(const std::string& text) {
  ConfigNode doc = ConfigNode::parse("k: " + text + "\n", "o.yaml");
  return *doc.find("k");
}

// The full what() of the ConfigError thrown by `f`, or "" if none was thrown.
template <class F>
std::string error_of(F f) {
  try {
    f();
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr long long kMinLL = std::numeric_limits<long long>::min();
constexpr long long kMaxLL = std::numeric_limits<long long>::max();

TEST(Options, ReadIntAcceptsIntegers) {
  EXPECT_EQ(read_int(value_of("4"), "q.bits", 2, 8), 4);
  EXPECT_EQ(read_int(value_of("-3"), "x", -5, 5), -3);
  EXPECT_EQ(read_int(value_of("+7"), "x", 0, 10), 7);
  EXPECT_EQ(read_int(value_of("'6'"), "x", 0, 10), 6);  // quoted digits are still an integer
  EXPECT_EQ(read_int(value_of("9223372036854775807"), "x", kMinLL, kMaxLL), kMaxLL);
}

TEST(Options, ReadIntRejectsWithLocationAndPath) {
  EXPECT_EQ(error_of([] { read_int(value_of("abc"), "quant.0.bits", 2, 8); }),
            "o.yaml:1:4: key 'quant.0.bits': expected an integer in [2, 8], found 'abc'");
  EXPECT_EQ(error_of([] { read_int(value_of("9"), "quant.0.bits", 2, 8); }),
            "o.yaml:1:4: key 'quant.0.bits': expected an integer in [2, 8], found '9'");
  EXPECT_EQ(error_of([] { read_int(value_of("4.0"), "b", 2, 8); }),
            "o.yaml:1:4: key 'b': expected an integer in [2, 8], found '4.0'");
  EXPECT_EQ(error_of([] { read_int(value_of("[1, 2]"), "b", 0, kMaxLL); }),
            "o.yaml:1:4: key 'b': expected an integer >= 0, found a list '[1, 2]'");
  EXPECT_EQ(error_of([] { read_int(value_of(""), "b", kMinLL, kMaxLL); }),
            "o.yaml:1:1: key 'b': expected an integer, found an empty value");
  EXPECT_NE(error_of([] { read_int(value_of("99999999999999999999"), "b", kMinLL, kMaxLL); }),
            "");
  EXPECT_NE(error_of([] { read_int(value_of("0x10"), "b", kMinLL, kMaxLL); }), "");
  EXPECT_NE(error_of([] { read_int(value_of("1e3"), "b", kMinLL, kMaxLL); }), "");
  EXPECT_NE(error_of([] { read_int(value_of("'-'"), "b", kMinLL, kMaxLL); }), "");
}

TEST(Options, ReadDouble) {
  EXPECT_DOUBLE_EQ(read_double(value_of("0.01"), "p", 0, 1), 0.01);
  EXPECT_DOUBLE_EQ(read_double(value_of("1"), "p", 0, 1), 1.0);
  EXPECT_DOUBLE_EQ(read_double(value_of("-2.5e-3"), "p", -kInf, kInf), -2.5e-3);
  EXPECT_DOUBLE_EQ(read_double(value_of(".5"), "p", 0, 1), 0.5);
  EXPECT_DOUBLE_EQ(read_double(value_of("3."), "p", 0, 10), 3.0);
  EXPECT_EQ(read_double(value_of(".inf"), "p", 0, kInf), kInf);
  EXPECT_EQ(read_double(value_of("-.Inf"), "p", -kInf, kInf), -kInf);
  EXPECT_EQ(error_of([] { read_double(value_of("2"), "gptq.percdamp", 0, 1); }),
            "o.yaml:1:4: key 'gptq.percdamp': expected a number in [0, 1], found '2'");
  EXPECT_EQ(error_of([] { read_double(value_of("fast"), "a", 0.5, kInf); }),
            "o.yaml:1:4: key 'a': expected a number >= 0.5, found 'fast'");
  EXPECT_NE(error_of([] { read_double(value_of(".nan"), "a", -kInf, kInf); }), "");
  EXPECT_NE(error_of([] { read_double(value_of("nan"), "a", -kInf, kInf); }), "");
  EXPECT_NE(error_of([] { read_double(value_of("inf"), "a", -kInf, kInf); }), "");
  EXPECT_NE(error_of([] { read_double(value_of("1e999"), "a", -kInf, kInf); }), "");
  EXPECT_NE(error_of([] { read_double(value_of("1e"), "a", -kInf, kInf); }), "");
  EXPECT_NE(error_of([] { read_double(value_of("."), "a", -kInf, kInf); }), "");
  EXPECT_NE(error_of([] { read_double(value_of("{a: 1}"), "a", -kInf, kInf); }), "");
}

TEST(Options, ReadDoubleListAndAutoOrDouble) {
  EXPECT_EQ(read_double_list(value_of("[0, 0.5, 1]"), "g", 0, 1), (std::vector<double>{0, 0.5, 1}));
  EXPECT_EQ(double_list_node({0, 0.25}).to_flow(), "[0, 0.25]");
  EXPECT_EQ(error_of([] { read_double_list(value_of("[0, 2]"), "g", 0, 1); }),
            "o.yaml:1:8: key 'g.1': expected a number in [0, 1], found '2'");
  EXPECT_NE(error_of([] { read_double_list(value_of("[]"), "g", 0, 1); }).find("non-empty list"), std::string::npos);
  EXPECT_FALSE(read_auto_or_double(value_of("auto"), "a", 0, 1).has_value());
  EXPECT_EQ(read_auto_or_double(value_of("0.5"), "a", 0, 1), 0.5);
  EXPECT_EQ(error_of([] { read_auto_or_double(value_of("1.5"), "q.alpha", 0, 1); }),
            "o.yaml:1:4: key 'q.alpha': expected 'auto' or a number in [0, 1], found '1.5'");
}

TEST(Options, ReadBool) {
  for (const char* t : {"true", "True", "yes", "on", "ON"})
    EXPECT_TRUE(read_bool(value_of(t), "b")) << t;
  for (const char* f : {"false", "FALSE", "no", "off", "Off"})
    EXPECT_FALSE(read_bool(value_of(f), "b")) << f;
  EXPECT_EQ(error_of([] { read_bool(value_of("maybe"), "gptq.act_order"); }),
            "o.yaml:1:4: key 'gptq.act_order': expected true or false, found 'maybe'");
  EXPECT_NE(error_of([] { read_bool(value_of("1"), "b"); }), "");
}

TEST(Options, ReadStringAndList) {
  EXPECT_EQ(read_string(value_of("'8'"), "s"), "8");
  EXPECT_EQ(read_string(value_of("plain text"), "s"), "plain text");
  EXPECT_EQ(error_of([] { read_string(value_of("{a: 1}"), "out.dir"); }),
            "o.yaml:1:4: key 'out.dir': expected a string, found a map '{a: 1}'");
  EXPECT_EQ(read_string_list(value_of("[a, 'b', c]"), "l"),
            (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(read_string_list(value_of("one"), "l"), (std::vector<std::string>{"one"}));
  EXPECT_TRUE(read_string_list(value_of("[]"), "l").empty());
  EXPECT_EQ(error_of([] { read_string_list(value_of("[a, [b]]"), "targets"); }),
            "o.yaml:1:8: key 'targets.1': expected a string, found a list '[b]'");
}

TEST(Options, ReadChoiceSuggests) {
  const std::vector<std::string> choices = {"channel", "group", "tensor"};
  EXPECT_EQ(read_choice(value_of("group"), "g", choices), "group");
  EXPECT_EQ(error_of([&] { read_choice(value_of("grop"), "quant.0.granularity", choices); }),
            "o.yaml:1:4: key 'quant.0.granularity': expected one of {channel, group, tensor}, "
            "found 'grop'; did you mean 'group'?");
  EXPECT_EQ(error_of([&] { read_choice(value_of("zzzzzz"), "g", choices); }),
            "o.yaml:1:4: key 'g': expected one of {channel, group, tensor}, found 'zzzzzz'");
}

TEST(Options, JoinPath) {
  EXPECT_EQ(join_path("quant.0", "bits"), "quant.0.bits");
  EXPECT_EQ(join_path("", "bits"), "bits");
  EXPECT_EQ(join_path("quant", ""), "quant");
}

TEST(Options, UnknownKeySuggestion) {
  ConfigNode doc = ConfigNode::parse("quant:\n  - bits: 4\n    granulrity: group\n", "u.yaml");
  const ConfigNode& step = doc.find("quant")->at(0);
  try {
    throw_unknown_key(step, "granulrity", "quant.0", {"bits", "granularity", "scheme"});
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_EQ(std::string(e.what()),
              "u.yaml:3:5: key 'quant.0.granulrity': unknown key 'granulrity'; did you mean "
              "'granularity'? (valid: bits, granularity, scheme)");
    EXPECT_EQ(e.key_path(), "quant.0.granulrity");
  }
  EXPECT_EQ(error_of([&] { throw_unknown_key(step, "granulrity", "quant.0", {"x", "y"}); }),
            "u.yaml:3:5: key 'quant.0.granulrity': unknown key 'granulrity' (valid: x, y)");
}

TEST(Options, FormatDoubleRoundTrips) {
  EXPECT_EQ(format_double(0.1), "0.1");
  EXPECT_EQ(format_double(4.0), "4");
  EXPECT_EQ(format_double(-2.5), "-2.5");
  EXPECT_EQ(format_double(1e-5), "1e-05");
  EXPECT_EQ(format_double(kInf), ".inf");
  EXPECT_EQ(format_double(-kInf), "-.inf");
  EXPECT_EQ(format_double(std::nan("")), ".nan");
  for (double v : {1.0 / 3.0, 0.01, 6.02214076e23, -1e-300, 123456789.123456789}) {
    const std::string s = format_double(v);
    EXPECT_EQ(read_double(ConfigNode::scalar(s), "v", -kInf, kInf), v) << s;
  }
}

// ---- OptionSchema on a test struct ----

enum class Mode { Fast, Exact };

struct DemoOptions {
  int bits = 4;
  long long budget = 1000;
  double damp = 0.01;
  bool act_order = false;
  std::string name = "demo";
  Mode mode = Mode::Fast;
  std::vector<std::string> targets = {"q_proj"};
};

OptionSchema<DemoOptions> demo_schema() {
  OptionSchema<DemoOptions> s;
  s.add("bits", &DemoOptions::bits, "weight bits", {2, 8})
      .add("budget", &DemoOptions::budget, "step budget", {0, 1e12})
      .add("damp", &DemoOptions::damp, "dampening fraction", {0, 1})
      .add("act_order", &DemoOptions::act_order, "process columns by decreasing diag(H)")
      .add("name", &DemoOptions::name, "display name")
      .add_enum("mode", &DemoOptions::mode, "solver",
                {{"fast", Mode::Fast}, {"exact", Mode::Exact}})
      .add_custom(
          "targets", "list", "layer names",
          [](DemoOptions& o, const ConfigNode& n, const std::string& p) {
            o.targets = read_string_list(n, p);
          },
          [](const DemoOptions& o) {
            ConfigNode l = ConfigNode::sequence();
            for (auto& t : o.targets) l.push_back(ConfigNode::scalar(t));
            return l;
          })
      .validator([](const DemoOptions& o, const ConfigNode& map, const std::string& path) {
        if (o.act_order && o.mode == Mode::Fast)
          throw ConfigError(map.key_loc("act_order"), join_path(path, "act_order"),
                            "act_order needs mode: exact");
      });
  return s;
}

TEST(OptionSchema, ParseWithDefaults) {
  auto s = demo_schema();
  ConfigNode m = ConfigNode::parse("bits: 3\nmode: exact\ntargets: [a, b]\n", "s.yaml");
  DemoOptions o = s.parse(m, "algo");
  EXPECT_EQ(o.bits, 3);
  EXPECT_EQ(o.mode, Mode::Exact);
  EXPECT_EQ(o.targets, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(o.budget, 1000);
  EXPECT_DOUBLE_EQ(o.damp, 0.01);
  EXPECT_EQ(o.name, "demo");
  // A null section means all defaults.
  DemoOptions d = s.parse(ConfigNode(), "algo");
  EXPECT_EQ(d.bits, 4);
}

TEST(OptionSchema, ParseErrors) {
  auto s = demo_schema();
  EXPECT_EQ(error_of([&] { s.parse(ConfigNode::parse("bits: 9\n", "s.yaml"), "quant.0"); }),
            "s.yaml:1:7: key 'quant.0.bits': expected an integer in [2, 8], found '9'");
  EXPECT_EQ(error_of([&] { s.parse(ConfigNode::parse("bits: 4\ndmap: 0.1\n", "s.yaml"), "q"); }),
            "s.yaml:2:1: key 'q.dmap': unknown key 'dmap'; did you mean 'damp'? (valid: bits, "
            "budget, damp, act_order, name, mode, targets)");
  EXPECT_EQ(error_of([&] { s.parse(ConfigNode::parse("mode: exakt\n", "s.yaml"), "q"); }),
            "s.yaml:1:7: key 'q.mode': expected one of {fast, exact}, found 'exakt'; did you "
            "mean 'exact'?");
  EXPECT_EQ(error_of([&] { s.parse(ConfigNode::parse("[1, 2]\n", "s.yaml"), "q"); }),
            "s.yaml:1:1: key 'q': expected a map of options, found '[1, 2]'");
  // The validator runs after parsing and reports through the map.
  EXPECT_EQ(error_of([&] { s.parse(ConfigNode::parse("bits: 4\nact_order: true\n", "s.yaml"), "q"); }),
            "s.yaml:2:1: key 'q.act_order': act_order needs mode: exact");
  EXPECT_EQ(error_of([&] {
              s.parse(ConfigNode::parse("act_order: true\nmode: exact\n", "s.yaml"), "q");
            }),
            "");
}

TEST(OptionSchema, EmitRoundTrips) {
  auto s = demo_schema();
  DemoOptions o;
  o.bits = 2;
  o.damp = 0.1;
  o.act_order = true;
  o.mode = Mode::Exact;
  o.name = "8";
  o.targets = {"k_proj", "v_proj"};
  ConfigNode e = s.emit(o);
  EXPECT_EQ(e.to_flow(),
            "{bits: 2, budget: 1000, damp: 0.1, act_order: true, name: 8, mode: exact, "
            "targets: [k_proj, v_proj]}");
  // Emitting, printing and parsing again gives the same struct.
  DemoOptions back = s.parse(ConfigNode::parse(e.to_yaml(), "e.yaml"), "q");
  EXPECT_EQ(back.bits, 2);
  EXPECT_DOUBLE_EQ(back.damp, 0.1);
  EXPECT_TRUE(back.act_order);
  EXPECT_EQ(back.mode, Mode::Exact);
  EXPECT_EQ(back.name, "8");
  EXPECT_EQ(back.targets, o.targets);
  EXPECT_EQ(s.emit(back).to_yaml(), e.to_yaml());
}

TEST(OptionSchema, DocsAndTypeErasedView) {
  auto s = demo_schema();
  const AnyOptionSchema& any = s;
  auto docs = any.docs();
  ASSERT_EQ(docs.size(), 7u);
  EXPECT_EQ(docs[0].name, "bits");
  EXPECT_EQ(docs[0].type, "int");
  EXPECT_EQ(docs[0].default_value, "4");
  EXPECT_EQ(docs[2].type, "float");
  EXPECT_EQ(docs[2].default_value, "0.01");
  EXPECT_EQ(docs[3].type, "bool");
  EXPECT_EQ(docs[5].type, "fast|exact");
  EXPECT_EQ(docs[5].default_value, "fast");
  EXPECT_EQ(docs[6].default_value, "[q_proj]");
  EXPECT_EQ(docs[2].doc, "dampening fraction");

  EXPECT_TRUE(any.has("damp"));
  EXPECT_FALSE(any.has("dmap"));
  std::any v = any.defaults();
  any.parse_key(v, "bits", ConfigNode::scalar("5"), "q.bits");
  EXPECT_EQ(std::any_cast<DemoOptions&>(v).bits, 5);
  ConfigNode out = ConfigNode::map();
  any.emit(v, out);
  EXPECT_EQ(out.find("bits")->value(), "5");
  std::any_cast<DemoOptions&>(v).act_order = true;
  EXPECT_THROW(any.validate(v, ConfigNode::map(), "q"), ConfigError);
}

}  // namespace
}  // namespace ql
