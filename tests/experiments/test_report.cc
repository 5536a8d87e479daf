#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>

#include "core/error.h"
#include "experiments/report.h"
#include "experiments/result_store.h"

namespace fs = std::filesystem;

namespace ql {
namespace {

// RFC 4180 reader (quoted fields may hold commas, quotes and line breaks).
std::vector<std::vector<std::string>> parse_csv(const std::string& text) {
  std::vector<std::vector<std::string>> rows;
  std::vector<std::string> row;
  std::string field;
  bool quoted = false, any = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (quoted) {
      if (c == '"' && i + 1 < text.size() && text[i + 1] == '"') {
        field += '"';
        ++i;
      } else if (c == '"') {
        quoted = false;
      } else {
        field += c;
      }
    } else if (c == '"') {
      quoted = true;
      any = true;
    } else if (c == ',') {
      row.push_back(field);
      field.clear();
    } else if (c == '\n') {
      row.push_back(field);
      rows.push_back(row);
      row.clear();
      field.clear();
      any = false;
    } else if (c != '\r') {
      field += c;
      any = true;
    }
  }
  if (any || !row.empty()) {
    row.push_back(field);
    rows.push_back(row);
  }
  return rows;
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// CSV rows as maps header -> value.
std::vector<std::map<std::string, std::string>> read_csv(const fs::path& p,
                                                         std::vector<std::string>* header = nullptr) {
  auto rows = parse_csv(slurp(p));
  EXPECT_FALSE(rows.empty()) << p;
  std::vector<std::map<std::string, std::string>> out;
  if (rows.empty()) return out;
  if (header) *header = rows[0];
  for (size_t i = 1; i < rows.size(); ++i) {
    EXPECT_EQ(rows[i].size(), rows[0].size()) << p << " row " << i;
    std::map<std::string, std::string> m;
    for (size_t j = 0; j < rows[0].size() && j < rows[i].size(); ++j) m[rows[0][j]] = rows[i][j];
    out.push_back(m);
  }
  return out;
}

double num(const std::string& s) { return std::strtod(s.c_str(), nullptr); }

RunRecord make_run(const std::string& id, const std::string& algorithm,
                   const std::string& granularity, int bits, double rel_err, double ppl,
                   double minority, double majority) {
  RunRecord r;
  r.run_id = id;
  r.label = algorithm + " bits=" + std::to_string(bits) + " granularity=" + granularity;
  r.status = RunStatus::Ok;
  r.params = {{"seed", "0"},
              {"workload.name", "tiny"},
              {"quant.0.algorithm", algorithm},
              {"quant.0.granularity", granularity},
              {"quant.0.bits", std::to_string(bits)}};
  r.summary = {{"out_rel_err", rel_err, rel_err * 0.9, rel_err * 1.1, rel_err},
               {"ppl", ppl, ppl - 1, ppl + 1, ppl - 10}};
  SliceRow s;
  s.metric = "out_rel_err";
  s.slice_key = "population";
  s.slice_value = "majority";
  s.n_units = 80;
  s.n_tokens = 8000;
  s.value = majority;
  s.ci_low = majority * 0.9;
  s.ci_high = majority * 1.1;
  s.ref_value = 0;
  s.delta = majority;
  s.delta_ci_low = majority * 0.8;
  s.delta_ci_high = majority * 1.2;
  r.slices.push_back(s);
  s.slice_value = "minority";
  s.n_units = 12;
  s.n_tokens = 1200;
  s.value = minority;
  s.delta = minority;
  s.flags = kFlagFewUnits | kFlagFewTokens;
  r.slices.push_back(s);
  DisparityRow d;
  d.metric = "out_rel_err";
  d.slice_key = "population";
  d.summary = "worst";
  d.on = "levels";
  d.worst_slice = "minority";
  d.value = minority;
  d.p_worst = 0.9;
  r.disparity.push_back(d);
  d.summary = "gap_between";
  d.value = minority - majority;
  r.disparity.push_back(d);
  d.on = "deltas";
  d.value = 123;  // must not be picked by gap: (levels only)
  r.disparity.push_back(d);
  LayerRow l;
  l.layer = "blocks.0.mlp.fc1";
  l.algorithm = algorithm;
  l.scheme = "asym";
  l.bits = bits;
  l.group_size = granularity == "group" ? 64 : -1;
  l.bpw = bits + 0.25;
  l.weight_mse = 1.0 / 3.0;
  l.rel_err_h = rel_err;
  l.rel_err_eval = rel_err * 1.01;
  l.out_mse = 0.1;
  l.sqnr_db = 17.5;
  l.cosine = 0.999;
  l.max_abs = 2.5;
  l.seconds = 0.01;
  r.layers.push_back(l);
  r.diagnostics.push_back({"blocks.0.mlp.fc1", 0, algorithm, "clip_ratio", 0.875});
  return r;
}

std::vector<RunRecord> handcrafted_runs() {
  std::vector<RunRecord> runs;
  runs.push_back(make_run("0000000000000001", "rtn", "group", 4, 0.1, 12.5, 0.2, 0.05));
  runs.push_back(make_run("0000000000000002", "rtn", "channel", 4, 0.2, 13.5, 0.3, 0.15));
  runs.push_back(make_run("0000000000000003", "gptq", "group", 4, 0.05, 11.25, 0.08, 0.04));
  runs.push_back(make_run("0000000000000004", "rtn", "group", 3, 0.4, 20, 0.6, 0.3));
  RunRecord failed;
  failed.run_id = "0000000000000005";
  failed.label = "gptq bits=3 granularity=group";
  failed.status = RunStatus::Failed;
  failed.message = "NumericError: \"H\" is singular,\nsee layer blocks.0";
  failed.params = {{"seed", "0"},
                   {"workload.name", "tiny"},
                   {"quant.0.algorithm", "gptq"},
                   {"quant.0.granularity", "group"},
                   {"quant.0.bits", "3"},
                   {"quant.0.act_order", "true"}};
  runs.push_back(failed);
  return runs;
}

class ReportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("ql_report_" + std::string(info->name()) + "_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

TEST_F(ReportTest, ExportCsvWritesEveryTable) {
  auto runs = handcrafted_runs();
  runs[0].summary[0].value = 0.1 + 0.2;  // needs 17 digits to round-trip
  runs[1].slices[0].ref_value = std::numeric_limits<double>::quiet_NaN();
  runs[2].numeric_env = {{"mode", "portable"}, {"blas_kernels", "Haswell"}};
  const std::string h5 = (dir_ / "results.h5").string();
  ResultStore store(h5);
  for (const auto& r : runs) store.append(r);
  const fs::path out = dir_ / "csv";
  export_csv(h5, out.string());

  std::vector<std::string> header;
  const auto rs = read_csv(out / "runs.csv", &header);
  EXPECT_EQ(header, (std::vector<std::string>{"run_id", "label", "status", "message",
                                              "workload.name", "quant.0.algorithm",
                                              "quant.0.granularity", "quant.0.bits",
                                              "quant.0.act_order", "out_rel_err", "ppl"}));
  ASSERT_EQ(rs.size(), runs.size());
  for (size_t i = 0; i < runs.size(); ++i) {
    EXPECT_EQ(rs[i].at("run_id"), runs[i].run_id);
    EXPECT_EQ(rs[i].at("label"), runs[i].label);
    EXPECT_EQ(rs[i].at("status"), run_status_name(runs[i].status));
    EXPECT_EQ(rs[i].at("message"), runs[i].message);  // comma, quotes and newline survive
  }
  EXPECT_EQ(num(rs[0].at("out_rel_err")), 0.1 + 0.2);
  EXPECT_EQ(num(rs[2].at("ppl")), 11.25);
  EXPECT_EQ(rs[0].at("quant.0.act_order"), "");
  EXPECT_EQ(rs[4].at("quant.0.act_order"), "true");
  EXPECT_EQ(rs[4].at("out_rel_err"), "");

  const auto sl = read_csv(out / "slices.csv", &header);
  EXPECT_EQ(header, (std::vector<std::string>{"run_id", "label", "metric", "slice_key",
                                              "slice_value", "n", "n_tokens", "value", "ci_low",
                                              "ci_high", "ref_value", "delta_vs_fp",
                                              "delta_ci_low", "delta_ci_high", "flags"}));
  size_t k = 0;
  for (const auto& r : runs)
    for (const auto& s : r.slices) {
      ASSERT_LT(k, sl.size());
      const auto& row = sl[k++];
      EXPECT_EQ(row.at("run_id"), r.run_id);
      EXPECT_EQ(row.at("label"), r.label);
      EXPECT_EQ(row.at("metric"), s.metric);
      EXPECT_EQ(row.at("slice_key"), s.slice_key);
      EXPECT_EQ(row.at("slice_value"), s.slice_value);
      EXPECT_EQ(row.at("n"), std::to_string(s.n_units));
      EXPECT_EQ(row.at("n_tokens"), std::to_string(s.n_tokens));
      EXPECT_EQ(num(row.at("value")), s.value);
      EXPECT_EQ(num(row.at("ci_low")), s.ci_low);
      EXPECT_EQ(num(row.at("ci_high")), s.ci_high);
      if (std::isnan(s.ref_value))
        EXPECT_EQ(row.at("ref_value"), "nan");
      else
        EXPECT_EQ(num(row.at("ref_value")), s.ref_value);
      EXPECT_EQ(num(row.at("delta_vs_fp")), s.delta);
      EXPECT_EQ(num(row.at("delta_ci_low")), s.delta_ci_low);
      EXPECT_EQ(num(row.at("delta_ci_high")), s.delta_ci_high);
      EXPECT_EQ(row.at("flags"), flags_to_string(s.flags));
    }
  EXPECT_EQ(k, sl.size());
  EXPECT_EQ(sl[1].at("flags"), "few_units|few_tokens");

  const auto ly = read_csv(out / "layers.csv", &header);
  EXPECT_EQ(header, (std::vector<std::string>{"run_id", "label", "layer", "algorithm", "scheme",
                                              "bits", "group_size", "bpw", "weight_mse",
                                              "rel_err_h", "rel_err_eval", "out_mse", "sqnr_db",
                                              "cosine", "max_abs", "seconds"}));
  ASSERT_EQ(ly.size(), 4u);  // the failed run has no layers
  EXPECT_EQ(ly[1].at("group_size"), "-1");
  EXPECT_EQ(num(ly[0].at("weight_mse")), 1.0 / 3.0);
  EXPECT_EQ(num(ly[3].at("rel_err_eval")), 0.4 * 1.01);

  const auto dp = read_csv(out / "disparity.csv", &header);
  EXPECT_EQ(header, (std::vector<std::string>{"run_id", "label", "metric", "slice_key", "summary",
                                              "on", "worst_slice", "value", "ci_low", "ci_high",
                                              "p_worst"}));
  ASSERT_EQ(dp.size(), 12u);
  EXPECT_EQ(dp[0].at("summary"), "worst");
  EXPECT_EQ(dp[0].at("worst_slice"), "minority");
  EXPECT_EQ(num(dp[1].at("value")), 0.2 - 0.05);

  const auto dg = read_csv(out / "diagnostics.csv", &header);
  EXPECT_EQ(header, (std::vector<std::string>{"run_id", "label", "layer", "step", "algorithm",
                                              "name", "value"}));
  ASSERT_EQ(dg.size(), 4u);
  EXPECT_EQ(num(dg[2].at("value")), 0.875);
  EXPECT_EQ(dg[2].at("algorithm"), "gptq");

  const auto sm = read_csv(out / "summary.csv");
  ASSERT_EQ(sm.size(), 8u);
  EXPECT_EQ(num(sm[3].at("delta_vs_fp")), 13.5 - 10);
  const auto pm = read_csv(out / "params.csv");
  EXPECT_EQ(pm.size(), 4 * 5 + 6u);
  // The numeric environment round-trips through HDF5 into numeric_env.csv.
  const auto ne = read_csv(out / "numeric_env.csv", &header);
  EXPECT_EQ(header, (std::vector<std::string>{"run_id", "label", "key", "value"}));
  ASSERT_EQ(ne.size(), 2u);
  EXPECT_EQ(ne[0].at("run_id"), runs[2].run_id);
  EXPECT_EQ(ne[1].at("key"), "blas_kernels");
  EXPECT_EQ(ne[1].at("value"), "Haswell");
}

TEST_F(ReportTest, ExportCsvOfMissingFileIsAnIoError) {
  EXPECT_THROW(export_csv((dir_ / "nope.h5").string(), (dir_ / "csv").string()), IoError);
}

TEST_F(ReportTest, PivotMarkdownWithCompositeRowKey) {
  const std::string t = pivot_table(handcrafted_runs(), "quant.0.algorithm,quant.0.granularity",
                                    "quant.0.bits", "out_rel_err", "md");
  EXPECT_EQ(t,
            "| quant.0.algorithm/quant.0.granularity \\ quant.0.bits | 4 | 3 |\n"
            "| --- | ---: | ---: |\n"
            "| rtn/group | 0.1 | 0.4 |\n"
            "| rtn/channel | 0.2 | - |\n"
            "| gptq/group | 0.05 | failed |\n");
}

TEST_F(ReportTest, PivotLatexUsesBooktabsAndEscapes) {
  const std::string t =
      pivot_table(handcrafted_runs(), "label", "", "ppl", "latex");
  EXPECT_EQ(t,
            "\\begin{tabular}{lr}\n"
            "\\toprule\n"
            "label & ppl \\\\\n"
            "\\midrule\n"
            "rtn bits=4 granularity=group & 12.5 \\\\\n"
            "rtn bits=4 granularity=channel & 13.5 \\\\\n"
            "gptq bits=4 granularity=group & 11.25 \\\\\n"
            "rtn bits=3 granularity=group & 20 \\\\\n"
            "gptq bits=3 granularity=group & failed \\\\\n"
            "\\bottomrule\n"
            "\\end{tabular}\n");
  const std::string t2 = pivot_table(handcrafted_runs(), "quant.0.algorithm,quant.0.granularity",
                                     "quant.0.bits", "out_rel_err", "latex");
  EXPECT_NE(t2.find("quant.0.algorithm/quant.0.granularity \\textbackslash{} quant.0.bits & 4 & 3"),
            std::string::npos)
      << t2;
  auto runs = handcrafted_runs();
  runs[0].label = "rtn_50% & co";
  const std::string t3 = pivot_table(runs, "label", "", "ppl", "latex");
  EXPECT_NE(t3.find("rtn\\_50\\% \\& co & 12.5"), std::string::npos) << t3;
}

TEST_F(ReportTest, PivotCsvAndFourSignificantDigits) {
  auto runs = handcrafted_runs();
  runs[0].summary[1].value = 12.34567;
  runs[1].summary[1].value = 0.000123456;
  runs[2].summary[1].value = 123456.0;
  const std::string t =
      pivot_table(runs, "quant.0.granularity", "quant.0.algorithm,quant.0.bits", "ppl", "csv");
  const auto rows = parse_csv(t);
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_EQ(rows[0], (std::vector<std::string>{
                         "quant.0.granularity \\ quant.0.algorithm/quant.0.bits", "rtn/4",
                         "gptq/4", "rtn/3", "gptq/3"}));
  EXPECT_EQ(rows[1], (std::vector<std::string>{"group", "12.35", "1.235e+05", "20", "failed"}));
  EXPECT_EQ(rows[2], (std::vector<std::string>{"channel", "0.0001235", "-", "-", "-"}));
}

TEST_F(ReportTest, PivotSliceAndDisparityMetrics) {
  const auto runs = handcrafted_runs();
  const auto minority = parse_csv(pivot_table(runs, "quant.0.algorithm,quant.0.granularity",
                                              "quant.0.bits", "out_rel_err@population=minority",
                                              "csv"));
  ASSERT_EQ(minority.size(), 4u);
  EXPECT_EQ(minority[1], (std::vector<std::string>{"rtn/group", "0.2", "0.6"}));
  EXPECT_EQ(minority[3], (std::vector<std::string>{"gptq/group", "0.08", "failed"}));
  const auto majority = parse_csv(pivot_table(runs, "label", "", "out_rel_err@population=majority",
                                              "csv"));
  EXPECT_EQ(majority[2][1], "0.15");

  const auto worst = parse_csv(
      pivot_table(runs, "quant.0.algorithm,quant.0.granularity", "quant.0.bits",
                  "worst:out_rel_err@population", "csv"));
  EXPECT_EQ(worst[2], (std::vector<std::string>{"rtn/channel", "0.3", "-"}));
  const auto gap = parse_csv(pivot_table(runs, "quant.0.algorithm,quant.0.granularity",
                                         "quant.0.bits", "gap:out_rel_err@population", "csv"));
  EXPECT_EQ(gap[1], (std::vector<std::string>{"rtn/group", "0.15", "0.3"}));  // levels, not 123

  // A slice value that no run has is an unknown metric.
  EXPECT_THROW(pivot_table(runs, "label", "", "out_rel_err@population=elderly", "md"), Error);
  EXPECT_THROW(pivot_table(runs, "label", "", "out_rel_err@population", "md"), Error);
  EXPECT_THROW(pivot_table(runs, "label", "", "worst:out_rel_err", "md"), Error);
}

TEST_F(ReportTest, TwoOkRunsInOneCellIsAnError) {
  try {
    pivot_table(handcrafted_runs(), "quant.0.algorithm", "quant.0.bits", "out_rel_err", "md");
    FAIL() << "expected Error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("rtn bits=4 granularity=group"), std::string::npos) << msg;
    EXPECT_NE(msg.find("rtn bits=4 granularity=channel"), std::string::npos) << msg;
    EXPECT_NE(msg.find("quant.0.granularity"), std::string::npos) << msg;  // the suggestion
  }
}

// Runs that differ only in a repeated-measurement key (calibration draws) are aggregated as
// mean ± sample sd (n) with `over`; two runs with the same draw in one cell stay an error.
TEST_F(ReportTest, OverAggregatesRepeatedRunsAsMeanSdAndN) {
  std::vector<RunRecord> runs;
  const double ppl[3] = {10.0, 12.0, 14.0};  // mean 12, sd 2
  for (int k = 0; k < 3; ++k) {
    RunRecord r = make_run("g" + std::to_string(k), "gptq", "channel", 3, 0.1, ppl[k], 0.1, 0.1);
    r.label += " draw=" + std::to_string(k);
    r.params.push_back({"calib.draw", std::to_string(k)});
    runs.push_back(r);
  }
  RunRecord rtn = make_run("r0", "rtn", "channel", 3, 0.2, 20.0, 0.2, 0.2);
  rtn.params.push_back({"calib.draw", "0"});
  runs.push_back(rtn);
  const auto t = parse_csv(pivot_table(runs, "quant.0.algorithm", "quant.0.bits", "ppl", "csv", "calib.draw"));
  ASSERT_EQ(t.size(), 3u);
  EXPECT_EQ(t[1], (std::vector<std::string>{"gptq", "12 ± 2 (3)"}));
  EXPECT_EQ(t[2], (std::vector<std::string>{"rtn", "20 ± 0 (1)"}));
  const std::string latex = pivot_table(runs, "quant.0.algorithm", "quant.0.bits", "ppl", "latex", "calib.draw");
  EXPECT_NE(latex.find("12 $\\pm$ 2 (3)"), std::string::npos) << latex;
  // Without `over` the draws collide, and the error names the key that separates them.
  try {
    pivot_table(runs, "quant.0.algorithm", "quant.0.bits", "ppl", "md");
    FAIL() << "expected Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("calib.draw"), std::string::npos) << e.what();
  }
  // The same draw twice in one cell is still two runs in one cell.
  runs.push_back(runs.front());
  runs.back().run_id = "g0bis";
  EXPECT_THROW(pivot_table(runs, "quant.0.algorithm", "quant.0.bits", "ppl", "md", "calib.draw"), Error);
  EXPECT_THROW(pivot_table(runs, "quant.0.algorithm", "quant.0.bits", "ppl", "md", "calib.drw"), Error);
}

TEST_F(ReportTest, WholeNumbersStoredInExponentFormPrintAsIntegers) {
  // The canonical config stores 20.0 as "2e+01" (shortest round trip); a table shows 20.
  std::vector<RunRecord> runs;
  for (const char* m : {"2e+01", "60", "1.5e-05"}) {
    RunRecord r = make_run(std::string("m") + m, "rtn", "channel", 4, 0.1, 10.0, 0.1, 0.1);
    r.params.push_back({"workload.outlier_magnitude", m});
    runs.push_back(r);
  }
  const auto t = parse_csv(pivot_table(runs, "quant.0.algorithm", "workload.outlier_magnitude", "ppl", "csv"));
  ASSERT_EQ(t.size(), 2u);
  EXPECT_EQ(t[0], (std::vector<std::string>{"quant.0.algorithm \\ workload.outlier_magnitude", "20", "60", "1.5e-05"}));
}

TEST_F(ReportTest, UnknownMetricListsTheAvailableOnes) {
  try {
    pivot_table(handcrafted_runs(), "label", "", "perplexity", "md");
    FAIL() << "expected Error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("'perplexity'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("out_rel_err"), std::string::npos) << msg;
    EXPECT_NE(msg.find("ppl"), std::string::npos) << msg;
    EXPECT_NE(msg.find("out_rel_err@population={majority,minority}"), std::string::npos) << msg;
  }
}

TEST_F(ReportTest, OtherPivotErrors) {
  const auto runs = handcrafted_runs();
  EXPECT_THROW(pivot_table(runs, "quant.9.bits", "", "ppl", "md"), Error);
  EXPECT_THROW(pivot_table(runs, "label", "", "ppl", "html"), Error);
  EXPECT_THROW(pivot_table(std::vector<RunRecord>{}, "label", "", "ppl", "md"), Error);
  EXPECT_THROW(pivot_table((dir_ / "missing.h5").string(), "label", "", "ppl", "md"), IoError);
}

TEST_F(ReportTest, PivotFromFileEqualsPivotFromRecords) {
  const auto runs = handcrafted_runs();
  const std::string h5 = (dir_ / "results.h5").string();
  ResultStore store(h5);
  for (const auto& r : runs) store.append(r);
  EXPECT_EQ(pivot_table(h5, "quant.0.algorithm,quant.0.granularity", "quant.0.bits",
                        "out_rel_err", "md"),
            pivot_table(runs, "quant.0.algorithm,quant.0.granularity", "quant.0.bits",
                        "out_rel_err", "md"));
}

TEST_F(ReportTest, MarkdownEscapesPipes) {
  auto runs = handcrafted_runs();
  runs[0].label = "a|b";
  const std::string t = pivot_table(runs, "label", "", "ppl", "md");
  EXPECT_NE(t.find("| a\\|b | 12.5 |"), std::string::npos) << t;
}

}  // namespace
}  // namespace ql
