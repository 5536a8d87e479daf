#include "experiments/sweep.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <unistd.h>
#include <vector>

#include "experiments/hash.h"
#include "experiments/runner.h"

namespace ql {
namespace {

const std::string kData = std::string(QL_SOURCE_DIR) + "/tests/data/config/";

std::vector<std::string> labels_of(const std::vector<ExpandedRun>& runs) {
  std::vector<std::string> l;
  for (auto& r : runs) l.push_back(r.label);
  return l;
}

std::vector<std::string> keys_of(const ConfigNode& m) {
  std::vector<std::string> k;
  for (auto& e : m.entries()) k.push_back(e.first);
  return k;
}

template <class F>
ConfigError config_error_of(F f) {
  try {
    f();
  } catch (const ConfigError& e) {
    return e;
  }
  ADD_FAILURE() << "expected a ConfigError";
  return ConfigError({}, "", "none");
}

bool contains(const std::string& hay, const std::string& needle) {
  return hay.find(needle) != std::string::npos;
}

// ---- includes ----

TEST(LoadConfig, NestedRelativeIncludesMergeInOrder) {
  ConfigNode c = load_config(kData + "include_main.yaml", {});
  EXPECT_EQ(c.find("include"), nullptr);
  EXPECT_EQ(keys_of(c), (std::vector<std::string>{"seed", "eval", "calib", "quant", "sweep"}));
  EXPECT_EQ(c.get_path("seed")->value(), "2");                 // base.yaml over common.yaml
  EXPECT_EQ(c.get_path("eval.dataset")->value(), "wikitext");  // only in common.yaml
  EXPECT_EQ(c.get_path("eval.seq_len")->value(), "1024");      // main over common
  EXPECT_EQ(c.get_path("calib.n_samples")->value(), "32");     // main over base
  EXPECT_EQ(c.get_path("calib.seq_len")->value(), "128");      // kept from base
  EXPECT_EQ(c.get_path("quant.0.method")->value(), "rtn");
  // Values remember the file that supplied them.
  EXPECT_EQ(c.get_path("eval.dataset")->loc().str(), kData + "parts/common.yaml:4:12");
  EXPECT_EQ(c.get_path("calib.seq_len")->loc().str(), kData + "parts/base.yaml:6:12");
  EXPECT_EQ(c.get_path("calib.n_samples")->loc().str(), kData + "include_main.yaml:4:14");
}

TEST(LoadConfig, IncludeCycleNamesChain) {
  ConfigError e = config_error_of([] { load_config(kData + "cycle_a.yaml", {}); });
  EXPECT_TRUE(contains(e.detail(), "include cycle: ")) << e.what();
  EXPECT_TRUE(contains(e.detail(), "cycle_a.yaml -> " + kData + "cycle_b.yaml -> " + kData +
                                       "cycle_a.yaml"))
      << e.what();
  EXPECT_EQ(e.loc().str(), kData + "cycle_b.yaml:2:11");
}

TEST(LoadConfig, MissingIncludeIsErrorAtIncludeLine) {
  ConfigError e = config_error_of([] { load_config(kData + "missing_include.yaml", {}); });
  EXPECT_EQ(e.loc().str(), kData + "missing_include.yaml:3:5");
  EXPECT_EQ(e.key_path(), "include");
  EXPECT_TRUE(contains(e.detail(), "'parts/no_such_file.yaml' not found")) << e.what();
}

TEST(LoadConfig, MissingFileIsIoError) {
  EXPECT_THROW(load_config(kData + "does_not_exist.yaml", {}), IoError);
}

// ---- overrides ----

TEST(LoadConfig, OverridesApplyAfterIncludesAndIntoSweep) {
  ConfigNode c = load_config(kData + "include_main.yaml",
                             {"quant.0.bits=3", "calib.extra=[1, 2]", "seed=9",
                              "sweep.grid.quant.0.method=[rtn, gptq]"});
  EXPECT_EQ(c.get_path("quant.0.bits")->value(), "3");
  EXPECT_EQ(c.get_path("quant.0.bits")->loc().str(), "<command line>:1:14");
  ASSERT_TRUE(c.get_path("calib.extra")->is_sequence());
  EXPECT_EQ(c.get_path("calib.extra")->to_flow(), "[1, 2]");
  EXPECT_EQ(c.get_path("calib.extra.1")->loc().str(), "<command line>:2:17");
  EXPECT_EQ(c.get_path("seed")->value(), "9");
  // The grid key "quant.0.method" is one dotted key of sweep.grid.
  const ConfigNode* grid = c.get_path("sweep.grid");
  ASSERT_NE(grid, nullptr);
  EXPECT_EQ(keys_of(*grid), (std::vector<std::string>{"quant.0.bits", "quant.0.method"}));
  auto runs = expand_sweep(c);
  EXPECT_EQ(labels_of(runs),
            (std::vector<std::string>{"include_main bits=2 method=rtn",
                                      "include_main bits=2 method=gptq",
                                      "include_main bits=3 method=rtn",
                                      "include_main bits=3 method=gptq"}));
  // Replacing an existing grid list.
  ConfigNode d = load_config(kData + "include_main.yaml", {"sweep.grid.quant.0.bits=[8]"});
  auto one = expand_sweep(d);
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0].config.get_path("quant.0.bits")->value(), "8");
}

TEST(LoadConfig, OverrideErrors) {
  ConfigError bad_path =
      config_error_of([] { load_config(kData + "include_main.yaml", {"quant.1.bits=3"}); });
  EXPECT_EQ(bad_path.key_path(), "quant.1.bits");
  EXPECT_EQ(bad_path.loc().str(), "<command line>:1:14");
  EXPECT_TRUE(contains(bad_path.detail(), "out of range")) << bad_path.what();

  ConfigError scalar =
      config_error_of([] { load_config(kData + "include_main.yaml", {"seed=1", "seed.x=1"}); });
  EXPECT_EQ(scalar.loc().str(), "<command line>:2:8");
  EXPECT_EQ(scalar.key_path(), "seed.x");

  ConfigError no_eq =
      config_error_of([] { load_config(kData + "include_main.yaml", {"quant.0.bits"}); });
  EXPECT_TRUE(contains(no_eq.detail(), "malformed override 'quant.0.bits'")) << no_eq.what();
  EXPECT_EQ(no_eq.loc().file, "<command line>");

  EXPECT_THROW(load_config(kData + "include_main.yaml", {"=3"}), ConfigError);
  ConfigError yaml = config_error_of([] {
    load_config(kData + "include_main.yaml", {"seed=0", "calib.extra=[1, 2"});
  });
  EXPECT_EQ(yaml.loc().file, "<command line>");
  EXPECT_EQ(yaml.loc().line, 2);
  EXPECT_EQ(yaml.key_path(), "calib.extra");
}

TEST(ApplyOverride, ExperimentGridKeyAndPlainKeys) {
  ConfigNode c = ConfigNode::parse(
      "quant: [{bits: 4}]\n"
      "sweep:\n"
      "  experiments:\n"
      "    - label: a\n"
      "      quant: [{bits: 8}]\n",
      "e.yaml");
  apply_override(c, "sweep.experiments.0.grid.quant.0.bits=[2, 3]");
  apply_override(c, "sweep.experiments.0.quant.0.bits=6", 2);
  EXPECT_EQ(c.get_path("sweep.experiments.0.quant.0.bits")->value(), "6");
  auto runs = expand_sweep(c);
  EXPECT_EQ(labels_of(runs), (std::vector<std::string>{"a bits=2", "a bits=3"}));
  EXPECT_THROW(apply_override(c, "sweep.experiments.3.grid.seed=[1]"), ConfigError);
}

// ---- expansion ----

TEST(ExpandSweep, NoSweepIsOneRunLabelledByFileStem) {
  ConfigNode c = ConfigNode::parse("seed: 1\n", "/some/dir/my_exp.yaml");
  auto runs = expand_sweep(c);
  ASSERT_EQ(runs.size(), 1u);
  EXPECT_EQ(runs[0].label, "my_exp");
  EXPECT_TRUE(runs[0].swept.empty());
  EXPECT_EQ(runs[0].config.to_yaml(), "seed: 1\n");
  EXPECT_EQ(expand_sweep(ConfigNode::parse("seed: 1\n", "<string>"))[0].label, "run");
}

TEST(ExpandSweep, GridOnly) {
  ConfigNode c = load_config(kData + "grid_only.yaml", {});
  auto runs = expand_sweep(c);
  ASSERT_EQ(runs.size(), 6u);
  EXPECT_EQ(labels_of(runs), (std::vector<std::string>{
                                 "grid_only bits=2 granularity=channel",
                                 "grid_only bits=2 granularity=group",
                                 "grid_only bits=3 granularity=channel",
                                 "grid_only bits=3 granularity=group",
                                 "grid_only bits=4 granularity=channel",
                                 "grid_only bits=4 granularity=group",
                             }));
  const ExpandedRun& r = runs[3];
  EXPECT_EQ(r.config.find("sweep"), nullptr);
  EXPECT_EQ(r.config.get_path("quant.0.bits")->value(), "3");
  EXPECT_EQ(r.config.get_path("quant.0.granularity")->value(), "group");
  EXPECT_EQ(r.config.get_path("quant.0.method")->value(), "rtn");
  using P = std::pair<std::string, std::string>;
  EXPECT_EQ(r.swept, (std::vector<P>{{"quant.0.bits", "3"}, {"quant.0.granularity", "group"}}));
  // The swept value keeps the location of the list element it came from.
  EXPECT_EQ(r.config.get_path("quant.0.bits")->loc().str(), kData + "grid_only.yaml:8:23");
}

const char* kBase =
    "seed: 0\n"
    "quant:\n"
    "  - method: rtn\n"
    "    bits: 4\n"
    "    group: 128\n";

TEST(ExpandSweep, ZipOnly) {
  ConfigNode c = ConfigNode::parse(std::string(kBase) +
                                       "sweep:\n"
                                       "  zip:\n"
                                       "    quant.0.bits: [2, 3, 4]\n"
                                       "    quant.0.group: [32, 64, 128]\n",
                                   "z.yaml");
  auto runs = expand_sweep(c);
  EXPECT_EQ(labels_of(runs), (std::vector<std::string>{"z bits=2 group=32", "z bits=3 group=64",
                                                       "z bits=4 group=128"}));
  EXPECT_EQ(runs[1].config.get_path("quant.0.group")->value(), "64");
}

TEST(ExpandSweep, GridTimesZip) {
  ConfigNode c = ConfigNode::parse(std::string(kBase) +
                                       "sweep:\n"
                                       "  grid:\n"
                                       "    seed: [0, 1]\n"
                                       "  zip:\n"
                                       "    quant.0.bits: [2, 3, 4]\n"
                                       "    quant.0.group: [32, 64, 128]\n",
                                   "gz.yaml");
  auto runs = expand_sweep(c);
  ASSERT_EQ(runs.size(), 6u);
  EXPECT_EQ(runs[0].label, "gz seed=0 bits=2 group=32");
  EXPECT_EQ(runs[2].label, "gz seed=0 bits=4 group=128");
  EXPECT_EQ(runs[3].label, "gz seed=1 bits=2 group=32");
  EXPECT_EQ(runs[5].config.get_path("seed")->value(), "1");
  EXPECT_EQ(runs[5].config.get_path("quant.0.bits")->value(), "4");
}

const char* kExperiments =
    "sweep:\n"
    "  experiments:\n"
    "    - label: fp16\n"
    "      quant: []\n"
    "    - label: gptq\n"
    "      quant:\n"
    "        - method: gptq\n"
    "          bits: 4\n"
    "          damp: 0.01\n"
    "      grid:\n"
    "        quant.0.bits: [2, 3, 4, 8]\n"
    "        calib.n_samples: [64, 128]\n"
    "      zip:\n"
    "        quant.0.damp: [0.01, 0.1]\n"
    "        quant.0.order: [natural, act]\n";

TEST(ExpandSweep, ExperimentsWithOwnAxes) {
  ConfigNode c = ConfigNode::parse(std::string(kBase) + kExperiments, "paper.yaml");
  auto runs = expand_sweep(c);
  ASSERT_EQ(runs.size(), 1u + 4u * 2u * 2u);
  EXPECT_EQ(runs[0].label, "fp16");
  EXPECT_EQ(runs[0].config.find("quant")->size(), 0u);
  EXPECT_EQ(runs[0].config.get_path("seed")->value(), "0");
  EXPECT_EQ(runs[0].config.find("calib"), nullptr);  // the other experiment's axes stay there
  EXPECT_EQ(runs[1].label, "gptq bits=2 n_samples=64 damp=0.01 order=natural");
  EXPECT_EQ(runs[2].label, "gptq bits=2 n_samples=64 damp=0.1 order=act");
  EXPECT_EQ(runs[3].label, "gptq bits=2 n_samples=128 damp=0.01 order=natural");
  EXPECT_EQ(runs[16].label, "gptq bits=8 n_samples=128 damp=0.1 order=act");
  const ConfigNode& cfg = runs[16].config;
  EXPECT_EQ(cfg.get_path("quant.0.method")->value(), "gptq");
  EXPECT_EQ(cfg.get_path("quant.0.bits")->value(), "8");
  EXPECT_EQ(cfg.get_path("calib.n_samples")->value(), "128");
  EXPECT_EQ(cfg.get_path("quant.0.order")->value(), "act");
  EXPECT_EQ(cfg.get_path("quant.0.group"), nullptr);  // the experiment replaced the quant list
  EXPECT_EQ(cfg.find("sweep"), nullptr);
  EXPECT_EQ(runs[16].swept.size(), 4u);
}

TEST(ExpandSweep, GlobalAxesApplyToEveryExperiment) {
  ConfigNode c = ConfigNode::parse(std::string(kBase) +
                                       "sweep:\n"
                                       "  grid: {seed: [1, 2, 3]}\n"
                                       "  experiments:\n"
                                       "    - label: rtn\n"
                                       "    - label: rtn3\n"
                                       "      quant: [{method: rtn, bits: 3}]\n",
                                   "g.yaml");
  auto runs = expand_sweep(c);
  EXPECT_EQ(labels_of(runs), (std::vector<std::string>{"rtn seed=1", "rtn seed=2", "rtn seed=3",
                                                       "rtn3 seed=1", "rtn3 seed=2",
                                                       "rtn3 seed=3"}));
  EXPECT_EQ(runs[4].config.get_path("quant.0.bits")->value(), "3");
  EXPECT_EQ(runs[4].config.get_path("seed")->value(), "2");
}

TEST(ExpandSweep, LabelsUseFullPathOnClashAndDeduplicate) {
  ConfigNode c = ConfigNode::parse(
      "quant: [{bits: 4}, {bits: 8}]\n"
      "sweep:\n"
      "  grid:\n"
      "    quant.0.bits: [2]\n"
      "    quant.1.bits: [3]\n"
      "    seed: [1, 1]\n"
      "    calib.extra: [[a, b]]\n",
      "l.yaml");
  auto runs = expand_sweep(c);
  EXPECT_EQ(labels_of(runs),
            (std::vector<std::string>{"l quant.0.bits=2 quant.1.bits=3 seed=1 extra=[a, b]",
                                      "l quant.0.bits=2 quant.1.bits=3 seed=1 extra=[a, b] #2"}));
  EXPECT_EQ(runs[0].config.get_path("calib.extra.1")->value(), "b");
}

TEST(ExpandSweep, ZipLengthMismatch) {
  ConfigNode c = ConfigNode::parse(std::string(kBase) +
                                       "sweep:\n"
                                       "  zip:\n"
                                       "    quant.0.bits: [2, 3, 4]\n"
                                       "    quant.0.group: [32, 64]\n",
                                   "z.yaml");
  ConfigError e = config_error_of([&] { expand_sweep(c); });
  EXPECT_EQ(e.loc().str(), "z.yaml:9:5");
  EXPECT_EQ(e.key_path(), "sweep.zip.quant.0.group");
  EXPECT_TRUE(contains(e.detail(), "'quant.0.bits' has 3 values, 'quant.0.group' has 2"))
      << e.what();
  // Mismatch between the global zip and an experiment's zip.
  ConfigNode d = ConfigNode::parse(std::string(kBase) +
                                       "sweep:\n"
                                       "  zip: {seed: [1, 2]}\n"
                                       "  experiments:\n"
                                       "    - label: x\n"
                                       "      zip: {quant.0.bits: [2, 3, 4]}\n",
                                   "z2.yaml");
  ConfigError e2 = config_error_of([&] { expand_sweep(d); });
  EXPECT_TRUE(contains(e2.detail(), "'seed' has 2 values, 'quant.0.bits' has 3")) << e2.what();
}

TEST(ExpandSweep, MissingGridPathNamesKeyLocationAndRun) {
  ConfigNode c = ConfigNode::parse(std::string(kBase) +
                                       "sweep:\n"
                                       "  grid:\n"
                                       "    seed: [7]\n"
                                       "    quant.1.bits: [2, 3]\n",
                                   "m.yaml");
  ConfigError e = config_error_of([&] { expand_sweep(c); });
  EXPECT_EQ(e.loc().str(), "m.yaml:9:5");
  EXPECT_EQ(e.key_path(), "quant.1.bits");
  EXPECT_EQ(e.run_label(), "m seed=7 bits=2");
  EXPECT_TRUE(contains(e.what(), "m.yaml:9:5: key 'quant.1.bits': ")) << e.what();
  EXPECT_TRUE(contains(e.what(), "(run 'm seed=7 bits=2')")) << e.what();
}

TEST(ExpandSweep, SweepSectionErrors) {
  auto err = [](const std::string& sweep) {
    return config_error_of([&] { expand_sweep(ConfigNode::parse(std::string(kBase) + sweep, "e.yaml")); });
  };
  ConfigError unknown = err("sweep:\n  grdi: {seed: [1]}\n");
  EXPECT_EQ(std::string(unknown.what()),
            "e.yaml:7:3: key 'sweep.grdi': unknown key 'grdi'; did you mean 'grid'? (valid: "
            "grid, zip, experiments)");

  ConfigError empty = err("sweep:\n  grid: {seed: []}\n");
  EXPECT_EQ(empty.key_path(), "sweep.grid.seed");
  EXPECT_TRUE(contains(empty.detail(), "non-empty list")) << empty.what();

  ConfigError scalar = err("sweep:\n  grid: {seed: 3}\n");
  EXPECT_EQ(scalar.key_path(), "sweep.grid.seed");

  ConfigError no_label = err("sweep:\n  experiments:\n    - seed: 1\n");
  EXPECT_EQ(no_label.key_path(), "sweep.experiments.0");
  EXPECT_TRUE(contains(no_label.detail(), "'label'")) << no_label.what();

  ConfigError dup = err("sweep:\n  experiments:\n    - label: a\n    - label: a\n");
  EXPECT_EQ(dup.loc().str(), "e.yaml:9:14");
  EXPECT_TRUE(contains(dup.detail(), "duplicate experiment label 'a' (first at e.yaml:8:14)"))
      << dup.what();

  ConfigError twice = err(
      "sweep:\n  grid: {seed: [1, 2]}\n  experiments:\n    - label: a\n      grid: {seed: [3]}\n");
  EXPECT_EQ(twice.key_path(), "sweep.experiments.0.grid.seed");
  EXPECT_TRUE(contains(twice.detail(), "already swept (at e.yaml:7:10)")) << twice.what();

  EXPECT_TRUE(contains(err("sweep:\n  experiments: []\n").detail(), "non-empty list"));
  EXPECT_EQ(err("sweep: [1]\n").key_path(), "sweep");
}

// ---- run ids ----

TEST(RunId, KnownValues) {
  // FNV-1a 64 reference values.
  EXPECT_EQ(fnv1a64(""), 0xcbf29ce484222325ULL);
  EXPECT_EQ(fnv1a64("a"), 0xaf63dc4c8601ec8cULL);
  EXPECT_EQ(fnv1a64("foobar"), 0x85944171f73967e8ULL);
  EXPECT_EQ(run_id_of(""), "cbf29ce484222325");
  EXPECT_EQ(run_id_of("seed: 0\n"), "277f21ec7188f6b8");
  EXPECT_EQ(run_id_of("x").size(), 16u);
}

// `numerics` is part of the resolved config (so of the run id: fast and portable results are
// different results), and of the workload key (generated inputs are products too).
TEST(RunConfigNumerics, ParsedIntoTheCanonicalConfigAndTheRunId) {
  const std::string base = "quant: [{algorithm: rtn, bits: 4}]\n";
  auto parse = [](const std::string& y) {
    return parse_run_config(ConfigNode::parse(y, "n.yaml"), "n", "n.yaml", default_registry());
  };
  const RunConfig fast = parse(base), portable = parse("numerics: portable\n" + base);
  EXPECT_EQ(fast.numerics, Numerics::Fast);
  EXPECT_EQ(portable.numerics, Numerics::Portable);
  EXPECT_NE(fast.canonical.to_yaml().find("numerics: fast"), std::string::npos);
  EXPECT_NE(fast.run_id, portable.run_id);
  EXPECT_NE(fast.workload_key(), portable.workload_key());
  try {
    parse("numerics: exact\n" + base);
    FAIL() << "accepted numerics: exact";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.key_path(), "numerics");
    EXPECT_EQ(e.loc().line, 1);
    EXPECT_NE(std::string(e.what()).find("portable"), std::string::npos) << e.what();
  }
}

// calib.draw must lie in [0, calib.draws); the error points at the draw key's line.
TEST(RunConfigCalibDraws, DrawOutsideTheDrawsIsAnErrorAtItsLine) {
  const std::string model = "workload: {kind: model, path: /nonexistent}\n"
                            "eval: {streams: [{name: p, path: /nonexistent.txt}]}\n"
                            "quant: [{algorithm: rtn, bits: 4}]\n";
  auto parse = [](const std::string& y) {
    return parse_run_config(ConfigNode::parse(y, "d.yaml"), "d", "d.yaml", default_registry());
  };
  const RunConfig ok = parse("calib:\n  text: /nonexistent.txt\n  draws: 5\n  draw: 4\n" + model);
  EXPECT_EQ(ok.calib.draw, 4);
  EXPECT_EQ(ok.calib.draws, 5);
  EXPECT_NE(ok.run_id, parse("calib:\n  text: /nonexistent.txt\n  draws: 5\n  draw: 3\n" + model).run_id);
  try {
    parse("calib:\n  text: /nonexistent.txt\n  draws: 5\n  draw: 5\n" + model);
    FAIL() << "accepted draw 5 of 5";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.key_path(), "calib.draw");
    EXPECT_EQ(e.loc().line, 4);
    EXPECT_NE(std::string(e.what()).find("[0, 5)"), std::string::npos) << e.what();
  }
}

TEST(RunId, SameConfigSameId) {
  // Two spellings of one config: same canonical text, same id; a changed value changes it.
  ConfigNode a = ConfigNode::parse("seed: 0\nquant: [{method: rtn, bits: 4}]\n", "a.yaml");
  ConfigNode b = ConfigNode::parse(
      "# comment\nseed:   0\nquant:\n  - method: rtn\n    bits: 4   # four\n", "b.yaml");
  ConfigNode c = ConfigNode::parse("seed: 0\nquant: [{method: rtn, bits: 3}]\n", "c.yaml");
  EXPECT_EQ(run_id_of(a.to_yaml()), run_id_of(b.to_yaml()));
  EXPECT_NE(run_id_of(a.to_yaml()), run_id_of(c.to_yaml()));
  // Expanded runs of one file get distinct ids; expanding twice gives the same ids.
  ConfigNode g = load_config(kData + "grid_only.yaml", {});
  auto r1 = expand_sweep(g), r2 = expand_sweep(g);
  ASSERT_EQ(r1.size(), r2.size());
  for (std::size_t i = 0; i < r1.size(); ++i) {
    EXPECT_EQ(run_id_of(r1[i].config.to_yaml()), run_id_of(r2[i].config.to_yaml()));
    if (i > 0) {
      EXPECT_NE(run_id_of(r1[i].config.to_yaml()), run_id_of(r1[i - 1].config.to_yaml()));
    }
  }
}

}  // namespace
}  // namespace ql

namespace ql {
namespace {

// The SmoothQuant O-level presets (paper Table 2) are includable bases: per-tensor symmetric
// 8-bit weights after smoothing with alpha 0.5, and 8-bit symmetric activations per token
// dynamic (O1), per tensor dynamic (O2) or per tensor static (O3); alpha stays overridable.
TEST(Presets, SmoothQuantOLevelsParseToThePaperSettings) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("ql_presets_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  struct Level {
    const char* name;
    ActGranularity gran;
    ActRangeMode mode;
  };
  for (const Level& l : {Level{"o1", ActGranularity::PerToken, ActRangeMode::Dynamic},
                         Level{"o2", ActGranularity::PerTensor, ActRangeMode::Dynamic},
                         Level{"o3", ActGranularity::PerTensor, ActRangeMode::Static}}) {
    const fs::path preset = fs::path(QL_SOURCE_DIR) / "configs" / "presets" / (std::string("smoothquant_") + l.name + ".yaml");
    ASSERT_TRUE(fs::exists(preset)) << preset;
    const fs::path cfg = dir / (std::string(l.name) + ".yaml");
    std::ofstream(cfg) << "include: " << preset.string() << "\n"
                       << "workload: {kind: synthetic, layers: [{name: a, d_in: 32, d_out: 16}]}\n"
                       << "calib: {tokens: 64}\neval: {units: 4, unit_tokens: 8}\n";
    const std::vector<RunConfig> runs = plan_runs(cfg.string(), {"quant.0.alpha=0.85"}, default_registry());
    ASSERT_EQ(runs.size(), 1u) << l.name;
    const RunConfig& rc = runs[0];
    ASSERT_EQ(rc.quant.size(), 2u) << l.name;
    EXPECT_EQ(rc.quant[0].algorithm, "smoothquant");
    EXPECT_EQ(rc.canonical.find("quant")->at(0).find("alpha")->value(), "0.85") << l.name;
    EXPECT_EQ(rc.quant[1].algorithm, "rtn");
    EXPECT_EQ(rc.quant[1].weight.bits, 8);
    EXPECT_EQ(rc.quant[1].weight.scheme, QuantScheme::Sym);
    EXPECT_EQ(rc.quant[1].weight.granularity, Granularity::PerTensor);
    EXPECT_EQ(rc.quant[1].act.bits, 8);
    EXPECT_EQ(rc.quant[1].act.scheme, QuantScheme::Sym);
    EXPECT_EQ(rc.quant[1].act.granularity, l.gran) << l.name;
    EXPECT_EQ(rc.quant[1].act.mode, l.mode) << l.name;
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace ql
