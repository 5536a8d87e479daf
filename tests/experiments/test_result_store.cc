#include <gtest/gtest.h>
#include <hdf5.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <sstream>

#include "core/error.h"
#include "core/h5.h"
#include "experiments/result_store.h"

namespace fs = std::filesystem;

namespace ql {
namespace {

class ResultStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("ql_result_store_" + std::string(info->name()) + "_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::permissions(dir_, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(dir_, ec);
  }
  std::string file(const std::string& name = "results.h5") const { return (dir_ / name).string(); }
  fs::path dir_;
};

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::vector<std::string> temp_files(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.path().filename().string().find(".tmp-") != std::string::npos)
      out.push_back(e.path().string());
  return out;
}

// A record with every field set to a distinct, non-default value. `k` varies the values.
RunRecord full_record(const std::string& run_id, int k) {
  RunRecord r;
  r.run_id = run_id;
  r.label = "smoothquant+gptq α=0.5 run " + std::to_string(k);
  r.config_yaml = "seed: " + std::to_string(k) + "\nquant:\n  - algorithm: gptq\n    note: \"ünïcode ✓\"\n";
  r.code_revision = "0123456789ab-dirty";
  r.status = RunStatus::Ok;
  r.message = "";
  r.started_at = "2024-05-01T12:34:56Z";
  r.seed = 0xFEDCBA9876543210ull + static_cast<uint64_t>(k);
  r.threads = 2 + k;
  r.seconds_total = 10.5 + k;
  r.seconds_calib = 1.25;
  r.seconds_quant = 7.125;
  r.seconds_eval = 2.0625;
  r.params = {{"quant.0.algorithm", "gptq"}, {"quant.0.bits", std::to_string(3 + k)},
              {"workload.name", "tiny"}, {"seed", std::to_string(k)}};
  for (int i = 0; i < 3; ++i) {
    LayerRow l;
    l.layer = "blocks." + std::to_string(i) + ".attn.q_proj";
    l.algorithm = "smoothquant+gptq";
    l.scheme = i == 0 ? "sym_offset" : "asym";
    l.bits = 3 + i;
    l.group_size = i == 2 ? -1 : 64 * (i + 1);
    l.bpw = 4.25 + i;
    l.weight_mse = 1e-5 * (i + 1) + k;
    l.rel_err_h = 0.01 * (i + 1);
    l.rel_err_eval = 0.02 * (i + 1);
    l.out_mse = 0.3 / (i + 1);
    l.sqnr_db = 20.0 + i;
    l.cosine = 0.99 - 0.01 * i;
    l.max_abs = 1.5 * (i + 1);
    l.seconds = 0.125 * (i + 1);
    r.layers.push_back(l);
  }
  r.diagnostics = {{"blocks.0.attn.q_proj", 0, "smoothquant", "alpha", 0.5},
                   {"blocks.0.attn.q_proj", 1, "gptq", "damp", 1e-3 * (k + 1)}};
  if (k % 2 == 0)  // runs with a training step carry a training table; the others have none
    r.training = {{2, "zeroqat", 0, 0, 0, std::numeric_limits<double>::quiet_NaN(), 3.5, std::numeric_limits<double>::quiet_NaN(),
                   std::numeric_limits<double>::quiet_NaN(), 0.0, 0.01},
                  {2, "zeroqat", 1, 2, 0, 3.25 + k, std::numeric_limits<double>::quiet_NaN(), 0.0125, 512.0, 1e-3, 0.5}};
  r.summary = {{"out_rel_err", 0.125 + k, 0.1, 0.15, 0.125},
               {"kld_mean", 0.0123, 0.01, 0.014, std::numeric_limits<double>::quiet_NaN()}};
  SliceRow s;
  s.metric = "out_rel_err";
  s.slice_key = "population";
  s.slice_value = "minority";
  s.n_units = 12;
  s.n_tokens = 1500;
  s.value = 0.2;
  s.ci_low = 0.15;
  s.ci_high = 0.25;
  s.ref_value = std::numeric_limits<double>::quiet_NaN();
  s.delta = 0.2;
  s.delta_ci_low = 0.1;
  s.delta_ci_high = 0.3;
  s.flags = kFlagFewUnits | kFlagFewTokens;
  r.slices.push_back(s);
  s.slice_value = "majority";
  s.n_units = 88;
  s.n_tokens = 88000;
  s.value = 0.1 + k;
  s.ref_value = 0.0;
  s.flags = 0;
  r.slices.push_back(s);
  DisparityRow d;
  d.metric = "out_rel_err";
  d.slice_key = "population";
  d.summary = "worst";
  d.on = "levels";
  d.worst_slice = "minority";
  d.value = 0.2;
  d.ci_low = 0.15;
  d.ci_high = 0.26;
  d.p_worst = 0.97;
  r.disparity.push_back(d);
  d.summary = "gap_between";
  d.worst_slice = "";
  d.value = 0.1;
  r.disparity.push_back(d);

  r.units.unit_ids = {"doc-0", "doc-1", "doc-2", "doc-3", "doc-ü"};
  r.units.attr_keys = {"population", "source"};
  r.units.attrs = {{"majority", "minority", "majority", "majority", "minority"},
                   {"austen", "web", "web", "austen", "web"}};
  r.units.columns = {"n_tokens", "sum_sq_err", "sum_sq_ref"};
  r.units.sums = MatrixD(5, 3);
  for (int u = 0; u < 5; ++u)
    for (int c = 0; c < 3; ++c) r.units.sums(u, c) = 100.0 * u + c + 0.5 * k;
  r.units.token_column = "n_tokens";
  // One-column blocks: the all-tokens block at 0 and a token family over the other two.
  r.units.block_size = 1;
  r.units.token_families = {TokenFamily{"token_freq", {"rare", "frequent"}, {2, 1}}};
  return r;
}

// NaN-aware equality: NaN == NaN, otherwise exact.
bool same(double a, double b) { return (std::isnan(a) && std::isnan(b)) || a == b; }
#define EXPECT_SAME(a, b) EXPECT_TRUE(same((a), (b))) << #a << " = " << (a) << " vs " << (b)

void expect_equal(const RunRecord& a, const RunRecord& b) {
  EXPECT_EQ(a.run_id, b.run_id);
  EXPECT_EQ(a.label, b.label);
  EXPECT_EQ(a.config_yaml, b.config_yaml);
  EXPECT_EQ(a.code_revision, b.code_revision);
  EXPECT_EQ(a.status, b.status);
  EXPECT_EQ(a.message, b.message);
  EXPECT_EQ(a.started_at, b.started_at);
  EXPECT_EQ(a.seed, b.seed);
  EXPECT_EQ(a.threads, b.threads);
  EXPECT_SAME(a.seconds_total, b.seconds_total);
  EXPECT_SAME(a.seconds_calib, b.seconds_calib);
  EXPECT_SAME(a.seconds_quant, b.seconds_quant);
  EXPECT_SAME(a.seconds_eval, b.seconds_eval);

  ASSERT_EQ(a.params.size(), b.params.size());
  for (size_t i = 0; i < a.params.size(); ++i) {
    EXPECT_EQ(a.params[i].key, b.params[i].key);
    EXPECT_EQ(a.params[i].value, b.params[i].value);
  }
  ASSERT_EQ(a.layers.size(), b.layers.size());
  for (size_t i = 0; i < a.layers.size(); ++i) {
    const LayerRow &x = a.layers[i], &y = b.layers[i];
    EXPECT_EQ(x.layer, y.layer);
    EXPECT_EQ(x.algorithm, y.algorithm);
    EXPECT_EQ(x.scheme, y.scheme);
    EXPECT_EQ(x.bits, y.bits);
    EXPECT_EQ(x.group_size, y.group_size);
    EXPECT_SAME(x.bpw, y.bpw);
    EXPECT_SAME(x.weight_mse, y.weight_mse);
    EXPECT_SAME(x.rel_err_h, y.rel_err_h);
    EXPECT_SAME(x.rel_err_eval, y.rel_err_eval);
    EXPECT_SAME(x.out_mse, y.out_mse);
    EXPECT_SAME(x.sqnr_db, y.sqnr_db);
    EXPECT_SAME(x.cosine, y.cosine);
    EXPECT_SAME(x.max_abs, y.max_abs);
    EXPECT_SAME(x.seconds, y.seconds);
  }
  ASSERT_EQ(a.diagnostics.size(), b.diagnostics.size());
  for (size_t i = 0; i < a.diagnostics.size(); ++i) {
    EXPECT_EQ(a.diagnostics[i].layer, b.diagnostics[i].layer);
    EXPECT_EQ(a.diagnostics[i].step, b.diagnostics[i].step);
    EXPECT_EQ(a.diagnostics[i].algorithm, b.diagnostics[i].algorithm);
    EXPECT_EQ(a.diagnostics[i].name, b.diagnostics[i].name);
    EXPECT_SAME(a.diagnostics[i].value, b.diagnostics[i].value);
  }
  ASSERT_EQ(a.training.size(), b.training.size());
  for (size_t i = 0; i < a.training.size(); ++i) {
    const TrainingRow &x = a.training[i], &y = b.training[i];
    EXPECT_EQ(x.pipeline_step, y.pipeline_step);
    EXPECT_EQ(x.algorithm, y.algorithm);
    EXPECT_EQ(x.step, y.step);
    EXPECT_EQ(x.forwards, y.forwards);
    EXPECT_EQ(x.backwards, y.backwards);
    EXPECT_SAME(x.train_loss, y.train_loss);
    EXPECT_SAME(x.heldout_loss, y.heldout_loss);
    EXPECT_SAME(x.grad_cosine, y.grad_cosine);
    EXPECT_SAME(x.grad_norm_ratio, y.grad_norm_ratio);
    EXPECT_SAME(x.lr, y.lr);
    EXPECT_SAME(x.seconds, y.seconds);
  }
  ASSERT_EQ(a.summary.size(), b.summary.size());
  for (size_t i = 0; i < a.summary.size(); ++i) {
    EXPECT_EQ(a.summary[i].metric, b.summary[i].metric);
    EXPECT_SAME(a.summary[i].value, b.summary[i].value);
    EXPECT_SAME(a.summary[i].ci_low, b.summary[i].ci_low);
    EXPECT_SAME(a.summary[i].ci_high, b.summary[i].ci_high);
    EXPECT_SAME(a.summary[i].delta_vs_fp, b.summary[i].delta_vs_fp);
  }
  ASSERT_EQ(a.slices.size(), b.slices.size());
  for (size_t i = 0; i < a.slices.size(); ++i) {
    const SliceRow &x = a.slices[i], &y = b.slices[i];
    EXPECT_EQ(x.metric, y.metric);
    EXPECT_EQ(x.slice_key, y.slice_key);
    EXPECT_EQ(x.slice_value, y.slice_value);
    EXPECT_EQ(x.n_units, y.n_units);
    EXPECT_EQ(x.n_tokens, y.n_tokens);
    EXPECT_SAME(x.value, y.value);
    EXPECT_SAME(x.ci_low, y.ci_low);
    EXPECT_SAME(x.ci_high, y.ci_high);
    EXPECT_SAME(x.ref_value, y.ref_value);
    EXPECT_SAME(x.delta, y.delta);
    EXPECT_SAME(x.delta_ci_low, y.delta_ci_low);
    EXPECT_SAME(x.delta_ci_high, y.delta_ci_high);
    EXPECT_EQ(x.flags, y.flags);
  }
  ASSERT_EQ(a.disparity.size(), b.disparity.size());
  for (size_t i = 0; i < a.disparity.size(); ++i) {
    const DisparityRow &x = a.disparity[i], &y = b.disparity[i];
    EXPECT_EQ(x.metric, y.metric);
    EXPECT_EQ(x.slice_key, y.slice_key);
    EXPECT_EQ(x.summary, y.summary);
    EXPECT_EQ(x.on, y.on);
    EXPECT_EQ(x.worst_slice, y.worst_slice);
    EXPECT_SAME(x.value, y.value);
    EXPECT_SAME(x.ci_low, y.ci_low);
    EXPECT_SAME(x.ci_high, y.ci_high);
    EXPECT_SAME(x.p_worst, y.p_worst);
  }
  EXPECT_EQ(a.units.unit_ids, b.units.unit_ids);
  EXPECT_EQ(a.units.attr_keys, b.units.attr_keys);
  EXPECT_EQ(a.units.attrs, b.units.attrs);
  EXPECT_EQ(a.units.columns, b.units.columns);
  EXPECT_EQ(a.units.token_column, b.units.token_column);
  ASSERT_EQ(a.units.sums.rows(), b.units.sums.rows());
  ASSERT_EQ(a.units.sums.cols(), b.units.sums.cols());
  EXPECT_TRUE(a.units.sums == b.units.sums);
  EXPECT_EQ(a.units.block_size, b.units.block_size);
  ASSERT_EQ(a.units.token_families.size(), b.units.token_families.size());
  for (size_t i = 0; i < a.units.token_families.size(); ++i) {
    EXPECT_EQ(a.units.token_families[i].key, b.units.token_families[i].key);
    EXPECT_EQ(a.units.token_families[i].values, b.units.token_families[i].values);
    EXPECT_EQ(a.units.token_families[i].offsets, b.units.token_families[i].offsets);
  }
}

TEST_F(ResultStoreTest, RoundTripsEveryField) {
  const RunRecord r = full_record("0123456789abcdef", 1);
  ResultStore store(file());
  EXPECT_FALSE(store.exists());
  store.append(r);
  EXPECT_TRUE(store.exists());
  expect_equal(r, store.read_run(r.run_id));
  const auto all = store.read_all();
  ASSERT_EQ(all.size(), 1u);
  expect_equal(r, all[0]);

  // Derived columns and attributes that have no RunRecord field.
  h5::File f = h5::File::open(file(), h5::Access::ReadOnly);
  h5::Group root = f.root();
  EXPECT_EQ(root.string_attr("format"), "quantlab-results");
  EXPECT_EQ(root.int64_attr("format_version"), 1);
  h5::Group g = root.open_group("runs").open_group(r.run_id);
  EXPECT_EQ(g.string_attr("config_hash"), r.run_id);
  EXPECT_EQ(g.string_attr("label"), "smoothquant+gptq α=0.5 run 1");
  const h5::Table slices = g.read_table("slices");
  EXPECT_EQ(slices.strings("flags_text"),
            (std::vector<std::string>{"few_units|few_tokens", ""}));
  EXPECT_EQ(slices.column("flags").type, h5::ColumnType::UInt32);
  EXPECT_EQ(slices.column("n_units").type, h5::ColumnType::Int64);
  EXPECT_EQ(g.open_group("units").open_group("attrs").read_strings("source"), r.units.attrs[1]);
}

TEST_F(ResultStoreTest, StoresAConfigLargerThanTheCompactAttributeLimit) {
  RunRecord r = full_record("00000000000000aa", 0);
  std::string big;
  while (big.size() < 200 * 1024) big += "  - {algorithm: rtn, bits: 4, granularity: group}\n";
  r.config_yaml = big;
  ResultStore store(file());
  store.append(r);
  EXPECT_EQ(store.read_run(r.run_id).config_yaml, big);
}

TEST_F(ResultStoreTest, ReadAllReturnsAppendOrderNotNameOrder) {
  ResultStore store(file());
  const RunRecord a = full_record("ffffffffffffffff", 1);
  const RunRecord b = full_record("0000000000000000", 2);
  const RunRecord c = full_record("8888888888888888", 3);
  store.append(a);
  store.append(b);
  store.append(c);
  const auto all = store.read_all();
  ASSERT_EQ(all.size(), 3u);
  expect_equal(a, all[0]);
  expect_equal(b, all[1]);
  expect_equal(c, all[2]);
  // A second ResultStore object over the same file sees the same.
  EXPECT_EQ(ResultStore(file()).read_all()[1].run_id, b.run_id);
}

TEST_F(ResultStoreTest, ReplacesAFailedRunInPlace) {
  ResultStore store(file());
  RunRecord failed;
  failed.run_id = "aaaaaaaaaaaaaaaa";
  failed.label = "gptq bits=2";
  failed.status = RunStatus::Failed;
  failed.message = "NumericError: Cholesky failed, \"H\" not positive definite";
  store.append(failed);
  const RunRecord other = full_record("bbbbbbbbbbbbbbbb", 2);
  store.append(other);

  auto st = store.run_statuses();
  EXPECT_EQ(st, (std::map<std::string, RunStatus>{{"aaaaaaaaaaaaaaaa", RunStatus::Failed},
                                                   {"bbbbbbbbbbbbbbbb", RunStatus::Ok}}));
  // The failed run's empty tables are still present (0 rows) and read back.
  const RunRecord f0 = store.read_run(failed.run_id);
  expect_equal(failed, f0);

  const RunRecord rerun = full_record("aaaaaaaaaaaaaaaa", 5);
  store.append(rerun);
  st = store.run_statuses();
  EXPECT_EQ(st.size(), 2u);
  EXPECT_EQ(st["aaaaaaaaaaaaaaaa"], RunStatus::Ok);
  const auto all = store.read_all();
  ASSERT_EQ(all.size(), 2u);
  expect_equal(rerun, all[0]);  // keeps the position of the run it replaced
  expect_equal(other, all[1]);
}

TEST_F(ResultStoreTest, MissingFileMeansNoRuns) {
  ResultStore store(file());
  EXPECT_TRUE(store.run_statuses().empty());
  EXPECT_TRUE(store.read_all().empty());
  EXPECT_THROW(store.read_run("0123456789abcdef"), IoError);
  EXPECT_FALSE(fs::exists(file()));
}

TEST_F(ResultStoreTest, UnknownRunIsAnIoError) {
  ResultStore store(file());
  store.append(full_record("0123456789abcdef", 0));
  try {
    store.read_run("fedcba9876543210");
    FAIL() << "expected IoError";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("fedcba9876543210"), std::string::npos) << e.what();
  }
}

TEST_F(ResultStoreTest, CreatesParentDirectories) {
  const std::string nested = (dir_ / "a" / "b" / "results.h5").string();
  ResultStore store(nested);
  store.append(full_record("0123456789abcdef", 0));
  EXPECT_TRUE(fs::exists(nested));
  EXPECT_EQ(store.read_all().size(), 1u);
}

TEST_F(ResultStoreTest, FailedAppendLeavesTheOriginalByteForByte) {
  ResultStore store(file());
  store.append(full_record("1111111111111111", 1));
  const std::string before = read_bytes(file());
  ASSERT_FALSE(before.empty());

  // Inconsistent units: detected while writing the units group, i.e. after the temp copy was
  // made and the run's attributes and tables were written into it.
  RunRecord bad = full_record("2222222222222222", 2);
  bad.units.sums = MatrixD::Zero(4, 3);
  EXPECT_THROW(store.append(bad), ShapeError);
  EXPECT_EQ(read_bytes(file()), before);
  EXPECT_TRUE(temp_files(dir_).empty());

  // Replacing an existing run that then fails must not lose the existing run either.
  RunRecord bad_replace = full_record("1111111111111111", 3);
  bad_replace.units.attrs[0].pop_back();
  EXPECT_THROW(store.append(bad_replace), ShapeError);
  EXPECT_EQ(read_bytes(file()), before);
  EXPECT_TRUE(temp_files(dir_).empty());
  expect_equal(full_record("1111111111111111", 1), store.read_run("1111111111111111"));
}

TEST_F(ResultStoreTest, FailedFirstAppendLeavesNoFile) {
  ResultStore store(file());
  RunRecord bad = full_record("2222222222222222", 2);
  bad.units.columns.pop_back();
  EXPECT_THROW(store.append(bad), ShapeError);
  EXPECT_FALSE(fs::exists(file()));
  EXPECT_TRUE(temp_files(dir_).empty());
}

TEST_F(ResultStoreTest, RejectsRunIdsThatAreNotGroupNames) {
  ResultStore store(file());
  RunRecord r = full_record("a/b", 0);
  EXPECT_THROW(store.append(r), Error);
  r.run_id = "";
  EXPECT_THROW(store.append(r), Error);
  EXPECT_FALSE(fs::exists(file()));
}

void expect_io_error_naming(const std::string& path) {
  try {
    ResultStore store(path);
    FAIL() << "expected IoError for " << path;
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
}

TEST_F(ResultStoreTest, RefusesFilesThatAreNotResultsFiles) {
  {  // not HDF5 at all
    std::ofstream(file("text.h5")) << "hello\n";
    expect_io_error_naming(file("text.h5"));
  }
  {  // HDF5 without the format attribute
    h5::File f = h5::File::create(file("plain.h5"));
    f.root().create_group("runs");
    f.close();
    expect_io_error_naming(file("plain.h5"));
  }
  {  // HDF5 of another format
    h5::File f = h5::File::create(file("other.h5"));
    f.root().set_string_attr("format", "something-else");
    f.close();
    expect_io_error_naming(file("other.h5"));
  }
  {  // a newer format version
    h5::File f = h5::File::create(file("newer.h5"));
    f.root().set_string_attr("format", "quantlab-results");
    f.root().set_int64_attr("format_version", 2);
    f.close();
    expect_io_error_naming(file("newer.h5"));
  }
  // append() checks again (the file may have appeared after the store was constructed) and
  // leaves the foreign file alone.
  ResultStore store(file("late.h5"));
  fs::copy_file(file("other.h5"), file("late.h5"));
  const std::string before = read_bytes(file("late.h5"));
  EXPECT_THROW(store.append(full_record("0123456789abcdef", 0)), IoError);
  EXPECT_THROW(store.run_statuses(), IoError);
  EXPECT_EQ(read_bytes(file("late.h5")), before);
  EXPECT_TRUE(temp_files(dir_).empty());
}

// ---- the HDF5 layer itself ----------------------------------------------------------------------

class H5Test : public ResultStoreTest {};

TEST_F(H5Test, TableOfEveryColumnTypeRoundTrips) {
  h5::Table t;
  t.add_strings("name", {"", "a", "αβγ", "a somewhat longer string"})
      .add_int64("i", {std::numeric_limits<int64_t>::min(), -1, 0, std::numeric_limits<int64_t>::max()})
      .add_uint32("u32", {0u, 1u, 7u, std::numeric_limits<uint32_t>::max()})
      .add_uint64("u64", {0ull, 1ull, 2ull, std::numeric_limits<uint64_t>::max()})
      .add_double("x", {-0.0, 1e-300, std::numeric_limits<double>::infinity(),
                        std::numeric_limits<double>::quiet_NaN()});
  {
    h5::File f = h5::File::create(file());
    f.root().write_table("t", t);
    h5::Table empty;
    empty.add_strings("s", {}).add_double("d", {});
    f.root().write_table("empty", empty);
    f.close();
  }
  h5::File f = h5::File::open(file(), h5::Access::ReadOnly);
  const h5::Table r = f.root().read_table("t");
  ASSERT_EQ(r.n_rows(), 4u);
  ASSERT_EQ(r.columns().size(), 5u);
  EXPECT_EQ(r.columns()[0].name, "name");
  EXPECT_EQ(r.strings("name"), t.strings("name"));
  EXPECT_EQ(r.int64s("i"), t.int64s("i"));
  EXPECT_EQ(r.uint32s("u32"), t.uint32s("u32"));
  EXPECT_EQ(r.uint64s("u64"), t.uint64s("u64"));
  EXPECT_TRUE(std::signbit(r.doubles("x")[0]));
  EXPECT_EQ(r.doubles("x")[1], 1e-300);
  EXPECT_TRUE(std::isinf(r.doubles("x")[2]));
  EXPECT_TRUE(std::isnan(r.doubles("x")[3]));
  EXPECT_THROW(r.doubles("name"), IoError);
  EXPECT_THROW(r.strings("missing"), IoError);
  EXPECT_THROW(r.int64s("u64"), IoError);  // 2^64-1 does not fit

  const h5::Table e = f.root().read_table("empty");
  EXPECT_EQ(e.n_rows(), 0u);
  ASSERT_EQ(e.columns().size(), 2u);
  EXPECT_EQ(e.column("s").type, h5::ColumnType::String);
  EXPECT_EQ(e.column("d").type, h5::ColumnType::Double);
}

TEST_F(H5Test, StringsAreFixedLengthUtf8AndDataIsChunkedDeflate) {
  {
    h5::File f = h5::File::create(file());
    h5::Table t;
    t.add_strings("s", {"x", "longest"}).add_double("d", {1, 2});
    f.root().write_table("t", t);
    f.root().write_strings("names", {"α", "b"});
    f.close();
  }
  hid_t fid = H5Fopen(file().c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  ASSERT_GE(fid, 0);
  for (const char* name : {"t", "names"}) {
    hid_t d = H5Dopen2(fid, name, H5P_DEFAULT);
    ASSERT_GE(d, 0);
    hid_t dcpl = H5Dget_create_plist(d);
    EXPECT_EQ(H5Pget_layout(dcpl), H5D_CHUNKED) << name;
    ASSERT_EQ(H5Pget_nfilters(dcpl), 1) << name;
    unsigned flags = 0, cd[4];
    size_t ncd = 4;
    unsigned fconf = 0;
    EXPECT_EQ(H5Pget_filter2(dcpl, 0, &flags, &ncd, cd, 0, nullptr, &fconf), H5Z_FILTER_DEFLATE);
    EXPECT_EQ(cd[0], 4u);  // deflate level
    H5Pclose(dcpl);
    hid_t type = H5Dget_type(d);
    hid_t st = std::string(name) == "t" ? H5Tget_member_type(type, 0) : H5Tcopy(type);
    EXPECT_EQ(H5Tget_class(st), H5T_STRING);
    EXPECT_EQ(H5Tis_variable_str(st), 0);
    EXPECT_EQ(H5Tget_cset(st), H5T_CSET_UTF8);
    EXPECT_EQ(H5Tget_size(st), std::string(name) == "t" ? 7u : 2u);  // longest value in bytes
    H5Tclose(st);
    H5Tclose(type);
    H5Dclose(d);
  }
  H5Fclose(fid);
}

TEST_F(H5Test, AttributesAndMatricesRoundTrip) {
  MatrixD m(3, 2);
  m << 1, 2, 3, 4, 5, std::numeric_limits<double>::quiet_NaN();
  {
    h5::File f = h5::File::create(file());
    h5::Group g = f.root().create_group("g");
    g.set_string_attr("s", "héllo");
    g.set_string_attr("empty", "");
    g.set_int64_attr("i", -42);
    g.set_uint64_attr("u", std::numeric_limits<uint64_t>::max());
    g.set_double_attr("d", 0.1);
    g.set_string_attr("s", "replaced");
    g.write_matrix("m", m);
    g.write_matrix("m0", MatrixD(0, 3));
    g.write_strings("none", {});
    f.close();
  }
  h5::File f = h5::File::open(file(), h5::Access::ReadOnly);
  h5::Group g = f.root().open_group("g");
  EXPECT_EQ(g.string_attr("s"), "replaced");
  EXPECT_EQ(g.string_attr("empty"), "");
  EXPECT_EQ(g.int64_attr("i"), -42);
  EXPECT_EQ(g.uint64_attr("u"), std::numeric_limits<uint64_t>::max());
  EXPECT_EQ(g.double_attr("d"), 0.1);
  EXPECT_THROW(g.int64_attr("s"), IoError);
  EXPECT_THROW(g.string_attr("nope"), IoError);
  const MatrixD r = g.read_matrix("m");
  ASSERT_EQ(r.rows(), 3);
  ASSERT_EQ(r.cols(), 2);
  EXPECT_EQ(r(2, 0), 5);
  EXPECT_EQ(r(0, 1), 2);
  EXPECT_TRUE(std::isnan(r(2, 1)));
  const MatrixD r0 = g.read_matrix("m0");
  EXPECT_EQ(r0.rows(), 0);
  EXPECT_EQ(r0.cols(), 3);
  EXPECT_TRUE(g.read_strings("none").empty());
  EXPECT_EQ(g.children(), (std::vector<std::string>{"m", "m0", "none"}));
}

TEST_F(H5Test, ErrorsNameTheFileAndObject) {
  try {
    h5::File::open(file("missing.h5"), h5::Access::ReadOnly);
    FAIL();
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find(file("missing.h5")), std::string::npos) << e.what();
  }
  h5::File f = h5::File::create(file());
  h5::Group g = f.root().create_group("runs");
  try {
    g.read_table("layers");
    FAIL();
  } catch (const IoError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(file()), std::string::npos) << msg;
    EXPECT_NE(msg.find("/runs/layers"), std::string::npos) << msg;
  }
  try {
    g.create_group("x");
    g.create_group("x");  // exists already: an HDF5-level failure
    FAIL();
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("/runs/x"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace ql
