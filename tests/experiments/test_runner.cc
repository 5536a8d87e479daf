#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <unistd.h>
#include <sys/wait.h>
#include <sstream>

#include "core/error.h"
#include "core/parallel.h"
#include "experiments/pipeline.h"
#include "experiments/result_store.h"
#include "experiments/runner.h"

namespace fs = std::filesystem;

namespace ql {
namespace {

const std::string kTiny = std::string(QL_SOURCE_DIR) + "/configs/tests/tiny.yaml";
const std::string kQuickstart = std::string(QL_SOURCE_DIR) + "/configs/quickstart.yaml";

fs::path temp_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("quantlab_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

TEST(Plan, QuickstartExpandsToFpPlusTwentyRtnRuns) {
  auto runs = plan_runs(kQuickstart, {}, default_registry());
  ASSERT_EQ(runs.size(), 21u);
  EXPECT_EQ(runs[0].label, "fp");
  std::set<std::string> ids;
  for (auto& r : runs) ids.insert(r.run_id);
  EXPECT_EQ(ids.size(), runs.size()) << "run ids must be distinct";
  // Ids are a function of the resolved config only: planning again gives the same ids, and an
  // override that changes a setting changes exactly the affected runs' ids.
  auto again = plan_runs(kQuickstart, {}, default_registry());
  for (std::size_t i = 0; i < runs.size(); ++i) EXPECT_EQ(runs[i].run_id, again[i].run_id);
  auto other = plan_runs(kQuickstart, {"seed=1"}, default_registry());
  EXPECT_NE(other[0].run_id, runs[0].run_id);
}

// Every runnable config the repository ships (examples, paper tables, test sweeps) expands and
// validates; presets are includable bases, not runs.
TEST(Plan, EveryShippedConfigPlans) {
  int planned = 0;
  for (const char* dir : {"configs", "configs/paper", "configs/tests"}) {
    for (const auto& e : fs::directory_iterator(fs::path(QL_SOURCE_DIR) / dir)) {
      if (e.path().extension() != ".yaml") continue;
      try {
        EXPECT_FALSE(plan_runs(e.path().string(), {}, default_registry()).empty()) << e.path();
        ++planned;
      } catch (const std::exception& ex) {
        ADD_FAILURE() << e.path() << ": " << ex.what();
      }
    }
  }
  EXPECT_GE(planned, 10);
  // The reference-draws table: six GPTQ rows over five draws, aggregated over calib.draw.
  const auto draws = plan_runs(std::string(QL_SOURCE_DIR) + "/configs/paper/gptq_reference_draws.yaml", {},
                               default_registry());
  ASSERT_EQ(draws.size(), 30u);
  EXPECT_EQ(draws.back().calib.draw, 4);
  EXPECT_EQ(draws.back().calib.draws, 5);
  EXPECT_EQ(draws.front().output.table_over, "calib.draw");
}

TEST(Plan, MisspeltKeyFailsBeforeAnyComputeWithLocation) {
  fs::path dir = temp_dir("typo");
  fs::path cfg = dir / "typo.yaml";
  std::ifstream in(kTiny);
  std::stringstream ss;
  ss << in.rdbuf();
  std::string text = ss.str();
  const std::string from = "granularity: channel, act";
  const std::size_t at = text.find(from);
  ASSERT_NE(at, std::string::npos);
  text.replace(at, std::strlen("granularity"), "granulrity");
  std::ofstream(cfg) << text;
  try {
    plan_runs(cfg.string(), {}, default_registry());
    FAIL() << "typo accepted";
  } catch (const ConfigError& e) {
    const std::string msg = e.what();
    EXPECT_EQ(e.key_path(), "quant.0.granulrity");
    EXPECT_NE(msg.find(cfg.string() + ":"), std::string::npos) << msg;
    EXPECT_NE(msg.find("did you mean 'granularity'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("rtn-a8"), std::string::npos) << "names the run: " << msg;
    EXPECT_GT(e.loc().line, 0);
    EXPECT_GT(e.loc().column, 0);
  }
  // The binary: one line on stderr, exit code 2, no results file.
  const fs::path out = dir / "out.h5";
  const std::string cmd = std::string(QL_BINARY_DIR) + "/quantlab run " + cfg.string() + " --output " +
                          out.string() + " --quiet 2> " + (dir / "err.txt").string();
  int rc = std::system(cmd.c_str());
  EXPECT_EQ(WEXITSTATUS(rc), 2);
  std::ifstream err(dir / "err.txt");
  std::string line, all;
  int lines = 0;
  while (std::getline(err, line)) {
    ++lines;
    all += line;
  }
  EXPECT_EQ(lines, 1) << all;
  EXPECT_NE(all.find("granulrity"), std::string::npos) << all;
  EXPECT_FALSE(fs::exists(out));
  fs::remove_all(dir);
}

// `quantlab list` documents every option the parser accepts: each key of every algorithm's
// schema, of the quant-step and activation specs and of every config section, with its type.
TEST(Plan, StepsAtScopesTheWorkloadCannotDriveFailAtTheirLine) {
  auto parse = [](const std::string& yaml) {
    return parse_run_config(ConfigNode::parse(yaml, "scopes.yaml"), "r", "scopes.yaml", default_registry());
  };
  try {
    parse("quant:\n  - algorithm: rtn\n    bits: 4\n  - algorithm: kv_rtn\n");
    FAIL() << "a KV-cache step on the synthetic suite was accepted";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.key_path(), "quant.1.algorithm");
    EXPECT_EQ(e.loc().line, 4);
    EXPECT_NE(std::string(e.what()).find("kv-cache scope"), std::string::npos) << e.what();
  }
  try {
    parse("workload: {kind: model, path: /m}\ncalib: {text: /t.txt}\neval: {streams: [{name: p, path: /p.txt}]}\n"
          "quant:\n  - {algorithm: rtn, bits: 4}\n  - {algorithm: rotation}\n");
    FAIL() << "a block step after a weight step was accepted";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.key_path(), "quant.1.algorithm");
    EXPECT_EQ(e.loc().line, 6);
    EXPECT_NE(std::string(e.what()).find("must come before the weight steps"), std::string::npos) << e.what();
  }
  EXPECT_NO_THROW(parse("workload: {kind: model, path: /m}\ncalib: {text: /t.txt}\neval: {streams: [{name: p, path: /p.txt}]}\n"
                        "quant: [{algorithm: rotation}, "
                        "{algorithm: rtn, bits: 4}, {algorithm: kv_rtn}]\n"));
}

TEST(Plan, ChannelStatisticsAreCapturedOnlyForStepsThatReadThem) {
  auto needs = [](const std::string& quant) {
    const RunConfig rc = parse_run_config(ConfigNode::parse("quant: " + quant + "\n", "n.yaml"), "r", "n.yaml",
                                          default_registry());
    return Pipeline(rc, default_registry()).needs_channel_stats();
  };
  EXPECT_FALSE(needs("[{algorithm: gptq, bits: 4}]"));
  EXPECT_FALSE(needs("[{algorithm: rtn, bits: 4, act: {bits: 8, mode: dynamic}}]"));
  EXPECT_TRUE(needs("[{algorithm: smoothquant}, {algorithm: rtn, bits: 8}]"));      // a plugin reads them
  EXPECT_TRUE(needs("[{algorithm: rtn, bits: 8, act: {bits: 8, granularity: tensor, mode: static}}]"));  // static ranges
}

TEST(Cli, ListDocumentsEveryOption) {
  const fs::path out = fs::temp_directory_path() / ("ql_list_" + std::to_string(::getpid()) + ".txt");
  const std::string cmd = std::string(QL_BINARY_DIR) + "/quantlab list > " + out.string();
  ASSERT_EQ(WEXITSTATUS(std::system(cmd.c_str())), 0);
  std::stringstream ss;
  ss << std::ifstream(out).rdbuf();
  const std::string text = ss.str();
  fs::remove(out);
  auto expect_listed = [&](const std::vector<OptionDoc>& docs, const std::string& where) {
    for (const OptionDoc& d : docs)
      EXPECT_NE(text.find(d.name + " (" + d.type), std::string::npos) << where << ": " << d.name;
  };
  const AlgorithmRegistry& reg = default_registry();
  for (const std::string& name : reg.names()) {
    EXPECT_NE(text.find("  " + name + " ["), std::string::npos) << name;
    if (reg.get(name).options) expect_listed(reg.get(name).options->docs(), name);
  }
  expect_listed(quant_spec_schema().docs(), "quant step");
  expect_listed(act_quant_spec_schema().docs(), "act");
  const std::vector<ConfigSectionDoc> sections = config_section_docs();
  EXPECT_GE(sections.size(), 8u);
  for (const ConfigSectionDoc& s : sections) {
    EXPECT_FALSE(s.options.empty()) << s.key;
    expect_listed(s.options, s.key + " " + s.applies_to);
  }
}

void expect_bitwise_equal(const RunRecord& a, const RunRecord& b) {
  ASSERT_EQ(a.status, RunStatus::Ok) << a.message;
  ASSERT_EQ(b.status, RunStatus::Ok) << b.message;
  ASSERT_EQ(a.layers.size(), b.layers.size());
  for (std::size_t i = 0; i < a.layers.size(); ++i) {
    const LayerRow &x = a.layers[i], &y = b.layers[i];
    for (auto [p, q] : {std::pair{x.weight_mse, y.weight_mse}, {x.rel_err_h, y.rel_err_h},
                        {x.rel_err_eval, y.rel_err_eval}, {x.out_mse, y.out_mse},
                        {x.sqnr_db, y.sqnr_db}, {x.cosine, y.cosine}, {x.max_abs, y.max_abs},
                        {x.bpw, y.bpw}})
      EXPECT_TRUE(same_bits(p, q)) << a.label << " layer " << x.layer << ": " << p << " vs " << q;
  }
  ASSERT_EQ(a.slices.size(), b.slices.size());
  for (std::size_t i = 0; i < a.slices.size(); ++i) {
    const SliceRow &x = a.slices[i], &y = b.slices[i];
    for (auto [p, q] : {std::pair{x.value, y.value}, {x.ci_low, y.ci_low}, {x.ci_high, y.ci_high},
                        {x.delta, y.delta}, {x.delta_ci_low, y.delta_ci_low},
                        {x.delta_ci_high, y.delta_ci_high}})
      EXPECT_TRUE(same_bits(p, q)) << a.label << " " << x.metric << "@" << x.slice_value;
  }
  ASSERT_EQ(a.disparity.size(), b.disparity.size());
  for (std::size_t i = 0; i < a.disparity.size(); ++i) {
    EXPECT_TRUE(same_bits(a.disparity[i].value, b.disparity[i].value));
    EXPECT_TRUE(same_bits(a.disparity[i].ci_low, b.disparity[i].ci_low));
    EXPECT_TRUE(same_bits(a.disparity[i].ci_high, b.disparity[i].ci_high));
  }
  EXPECT_EQ(a.units.sums, b.units.sums);
}

TEST(Runner, MetricsAreBitwiseEqualWithOneAndTwoThreads) {
  auto runs = plan_runs(kTiny, {}, default_registry());
  const int saved = num_threads();
  std::vector<RunRecord> one, two;
  {
    set_num_threads(1);
    WorkloadCache cache;
    for (auto& r : runs) one.push_back(execute_run(r, cache, default_registry()));
  }
  {
    set_num_threads(2);
    WorkloadCache cache;
    for (auto& r : runs) two.push_back(execute_run(r, cache, default_registry()));
  }
  set_num_threads(saved);
  for (std::size_t i = 0; i < runs.size(); ++i) expect_bitwise_equal(one[i], two[i]);
}

TEST(Runner, QuantizationErrorGrowsAsBitsFallAndFpIsExact) {
  auto runs = plan_runs(kTiny, {}, default_registry());
  WorkloadCache cache;
  std::map<std::string, double> err;
  for (auto& r : runs) {
    RunRecord rec = execute_run(r, cache, default_registry());
    ASSERT_EQ(rec.status, RunStatus::Ok) << rec.message;
    for (auto& s : rec.summary)
      if (s.metric == "out_rel_err") err[rec.label] = s.value;
  }
  EXPECT_EQ(err.at("fp"), 0.0);
  EXPECT_GT(err.at("rtn bits=3 scheme=asym"), err.at("rtn bits=8 scheme=asym") * 10);
  EXPECT_GT(err.at("rtn bits=3 scheme=sym"), err.at("rtn bits=8 scheme=sym") * 10);
  EXPECT_GT(err.at("rtn bits=8 scheme=asym"), 0.0);
}

TEST(Runner, ResumeSkipsStoredRunsAfterAnInterruptedSweep) {
  fs::path dir = temp_dir("resume");
  const std::string out = (dir / "r.h5").string();
  auto runs = plan_runs(kTiny, {}, default_registry());
  RunnerOptions opts;
  opts.output = out;
  opts.quiet = true;
  // The "interrupted" sweep stored only its first two runs, and a crash left a temp file.
  std::vector<RunConfig> first(runs.begin(), runs.begin() + 2);
  SweepSummary s1 = run_sweep(first, opts, default_registry());
  EXPECT_EQ(s1.ok, 2);
  std::ofstream(out + ".tmp-99999") << "half-written garbage";
  ResultStore store(out);
  RunRecord before = store.read_run(runs[1].run_id);

  SweepSummary s2 = run_sweep(runs, opts, default_registry());
  EXPECT_EQ(s2.skipped, 2);
  EXPECT_EQ(s2.ok, static_cast<int>(runs.size()) - 2);
  EXPECT_EQ(s2.failed, 0);
  auto statuses = ResultStore(out).run_statuses();
  EXPECT_EQ(statuses.size(), runs.size());
  RunRecord after = ResultStore(out).read_run(runs[1].run_id);
  EXPECT_EQ(after.started_at, before.started_at) << "a stored run must not be recomputed";

  SweepSummary s3 = run_sweep(runs, opts, default_registry());
  EXPECT_EQ(s3.skipped, static_cast<int>(runs.size()));
  fs::remove_all(dir);
}

// A plugin that fails at run time on one layer, to check that failures are recorded and the
// sweep goes on.
struct NoOptions {};
class FailsOnDown final : public LayerAlgorithm {
  LayerOutput quantize_layer(const LayerInput& in) const override {
    if (in.name == "down") throw NumericError("layer 'down': synthetic failure for the test");
    return {*in.W, {}, {}};
  }
};

TEST(Runner, FailedRunIsRecordedAndTheSweepContinues) {
  AlgorithmRegistry reg;
  register_all(reg);
  AlgorithmInfo info;
  info.name = "fails";
  info.summary = "test plugin";
  info.uses_weight_spec = false;
  info.options = std::make_shared<OptionSchema<NoOptions>>();
  info.make = [](const std::any&) { return std::make_unique<FailsOnDown>(); };
  reg.add(info);

  fs::path dir = temp_dir("failed");
  const std::string out = (dir / "f.h5").string();
  auto runs = plan_runs(kTiny, {}, reg);
  std::vector<RunConfig> some = {runs[0]};
  some.push_back(parse_run_config(ConfigNode::parse("quant: [{algorithm: fails}]\n"
                                                    "eval: {units: 24, unit_tokens: 8}\n"
                                                    "workload:\n  layers: [{name: down, d_in: 16, d_out: 8}]\n",
                                                    "inline.yaml"),
                                  "fails", "inline.yaml", reg));
  some.push_back(runs[1]);
  RunnerOptions opts;
  opts.output = out;
  opts.quiet = true;
  SweepSummary s = run_sweep(some, opts, reg);
  EXPECT_EQ(s.ok, 2);
  EXPECT_EQ(s.failed, 1);
  RunRecord f = ResultStore(out).read_run(some[1].run_id);
  EXPECT_EQ(f.status, RunStatus::Failed);
  EXPECT_NE(f.message.find("synthetic failure"), std::string::npos) << f.message;
  // A failed run is retried on resume, not skipped.
  SweepSummary again = run_sweep(some, opts, reg);
  EXPECT_EQ(again.skipped, 2);
  EXPECT_EQ(again.failed, 1);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace ql
