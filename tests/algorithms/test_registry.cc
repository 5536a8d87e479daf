#include <gtest/gtest.h>

#include "algorithms/algorithm.h"
#include "core/error.h"

namespace ql {
namespace {

// The registration list is explicit; this test is the other half of it: adding a plugin means
// adding it here too, deliberately.
TEST(Registry, RegisteredNamesAreTheExpectedList) {
  EXPECT_EQ(default_registry().names(),
            (std::vector<std::string>{"fp", "rtn", "gptq", "smoothquant", "awq", "vlmq", "kv_rtn", "rotation", "flatquant", "commvq", "zeroqat"}));
}

TEST(Registry, UnknownNameListsKnownOnes) {
  try {
    default_registry().get("gptqq");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "unknown algorithm 'gptqq'; known: fp, rtn, gptq, smoothquant, awq, vlmq, kv_rtn, rotation, flatquant, commvq, zeroqat");
  }
}

TEST(Registry, EveryPluginHasFactoryScopeAndSchema) {
  for (const std::string& name : default_registry().names()) {
    const AlgorithmInfo& info = default_registry().get(name);
    ASSERT_TRUE(info.options) << name;
    std::unique_ptr<Algorithm> a = info.create();
    ASSERT_TRUE(a) << name;
    EXPECT_EQ(a->scope(), info.scope) << name;
    EXPECT_FALSE(info.summary.empty()) << name;
  }
}

struct DummyOptions {
  int bits = 3;
};
class Dummy final : public LayerAlgorithm {
  LayerOutput quantize_layer(const LayerInput& in) const override { return {*in.W, {}, {}}; }
};

TEST(Registry, RejectsDuplicatesAndOptionsThatShadowStepKeys) {
  AlgorithmRegistry r;
  register_all(r);
  AlgorithmInfo dup = default_registry().get("rtn");
  EXPECT_THROW(r.add(dup), Error);

  AlgorithmInfo shadow;
  shadow.name = "dummy";
  auto schema = std::make_shared<OptionSchema<DummyOptions>>();
  schema->add("bits", &DummyOptions::bits, "collides with the grid's bits");
  shadow.options = schema;
  shadow.make = [](const std::any&) { return std::make_unique<Dummy>(); };
  EXPECT_THROW(r.add(shadow), Error);
}

}  // namespace
}  // namespace ql
