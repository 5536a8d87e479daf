#include "experiments/result_store.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <type_traits>
#include <utility>

#include "core/error.h"
#include "core/h5.h"

namespace ql {
namespace fs = std::filesystem;

namespace {

// ---- helpers: struct rows <-> columns ---------------------------------------------------------

template <class Row, class F>
auto column_of(const std::vector<Row>& rows, F field) {
  std::vector<std::decay_t<std::invoke_result_t<F, const Row&>>> out;
  out.reserve(rows.size());
  for (const Row& r : rows) out.push_back(field(r));
  return out;
}

template <class Row, class F>
std::vector<int64_t> int_column_of(const std::vector<Row>& rows, F field) {
  std::vector<int64_t> out;
  out.reserve(rows.size());
  for (const Row& r : rows) out.push_back(static_cast<int64_t>(field(r)));
  return out;
}

int to_int(int64_t v, const h5::Table& t, const char* column) {
  if (v < std::numeric_limits<int>::min() || v > std::numeric_limits<int>::max())
    throw IoError(t.source + ": column '" + column + "': value " + std::to_string(v) +
                  " out of int range");
  return static_cast<int>(v);
}

// ---- writing ----------------------------------------------------------------------------------

/// A (key, value) string table: params, numeric_env.
void write_key_values(const h5::Group& g, const std::string& name, const std::vector<ParamRow>& rows) {
  h5::Table t;
  t.add_strings("key", column_of(rows, [](const ParamRow& r) { return r.key; }))
      .add_strings("value", column_of(rows, [](const ParamRow& r) { return r.value; }));
  g.write_table(name, t);
}

void write_layers(const h5::Group& g, const std::vector<LayerRow>& rows) {
  using R = LayerRow;
  h5::Table t;
  t.add_strings("layer", column_of(rows, [](const R& r) { return r.layer; }))
      .add_strings("algorithm", column_of(rows, [](const R& r) { return r.algorithm; }))
      .add_strings("scheme", column_of(rows, [](const R& r) { return r.scheme; }))
      .add_int64("bits", int_column_of(rows, [](const R& r) { return r.bits; }))
      .add_int64("group_size", int_column_of(rows, [](const R& r) { return r.group_size; }))
      .add_double("bpw", column_of(rows, [](const R& r) { return r.bpw; }))
      .add_double("weight_mse", column_of(rows, [](const R& r) { return r.weight_mse; }))
      .add_double("rel_err_h", column_of(rows, [](const R& r) { return r.rel_err_h; }))
      .add_double("rel_err_eval", column_of(rows, [](const R& r) { return r.rel_err_eval; }))
      .add_double("out_mse", column_of(rows, [](const R& r) { return r.out_mse; }))
      .add_double("sqnr_db", column_of(rows, [](const R& r) { return r.sqnr_db; }))
      .add_double("cosine", column_of(rows, [](const R& r) { return r.cosine; }))
      .add_double("max_abs", column_of(rows, [](const R& r) { return r.max_abs; }))
      .add_double("seconds", column_of(rows, [](const R& r) { return r.seconds; }));
  g.write_table("layers", t);
}

void write_diagnostics(const h5::Group& g, const std::vector<DiagnosticRow>& rows) {
  using R = DiagnosticRow;
  h5::Table t;
  t.add_strings("layer", column_of(rows, [](const R& r) { return r.layer; }))
      .add_int64("step", int_column_of(rows, [](const R& r) { return r.step; }))
      .add_strings("algorithm", column_of(rows, [](const R& r) { return r.algorithm; }))
      .add_strings("name", column_of(rows, [](const R& r) { return r.name; }))
      .add_double("value", column_of(rows, [](const R& r) { return r.value; }));
  g.write_table("diagnostics", t);
}

void write_training(const h5::Group& g, const std::vector<TrainingRow>& rows) {
  using R = TrainingRow;
  h5::Table t;
  t.add_int64("pipeline_step", int_column_of(rows, [](const R& r) { return r.pipeline_step; }))
      .add_strings("algorithm", column_of(rows, [](const R& r) { return r.algorithm; }))
      .add_int64("step", int_column_of(rows, [](const R& r) { return r.step; }))
      .add_int64("forwards", int_column_of(rows, [](const R& r) { return r.forwards; }))
      .add_int64("backwards", int_column_of(rows, [](const R& r) { return r.backwards; }))
      .add_double("train_loss", column_of(rows, [](const R& r) { return r.train_loss; }))
      .add_double("heldout_loss", column_of(rows, [](const R& r) { return r.heldout_loss; }))
      .add_double("grad_cosine", column_of(rows, [](const R& r) { return r.grad_cosine; }))
      .add_double("grad_norm_ratio", column_of(rows, [](const R& r) { return r.grad_norm_ratio; }))
      .add_double("lr", column_of(rows, [](const R& r) { return r.lr; }))
      .add_double("seconds", column_of(rows, [](const R& r) { return r.seconds; }));
  g.write_table("training", t);
}

void write_summary(const h5::Group& g, const std::vector<SummaryRow>& rows) {
  using R = SummaryRow;
  h5::Table t;
  t.add_strings("metric", column_of(rows, [](const R& r) { return r.metric; }))
      .add_double("value", column_of(rows, [](const R& r) { return r.value; }))
      .add_double("ci_low", column_of(rows, [](const R& r) { return r.ci_low; }))
      .add_double("ci_high", column_of(rows, [](const R& r) { return r.ci_high; }))
      .add_double("delta_vs_fp", column_of(rows, [](const R& r) { return r.delta_vs_fp; }));
  g.write_table("summary", t);
}

void write_slices(const h5::Group& g, const std::vector<SliceRow>& rows) {
  using R = SliceRow;
  h5::Table t;
  t.add_strings("metric", column_of(rows, [](const R& r) { return r.metric; }))
      .add_strings("slice_key", column_of(rows, [](const R& r) { return r.slice_key; }))
      .add_strings("slice_value", column_of(rows, [](const R& r) { return r.slice_value; }))
      .add_int64("n_units", column_of(rows, [](const R& r) { return r.n_units; }))
      .add_int64("n_tokens", column_of(rows, [](const R& r) { return r.n_tokens; }))
      .add_double("value", column_of(rows, [](const R& r) { return r.value; }))
      .add_double("ci_low", column_of(rows, [](const R& r) { return r.ci_low; }))
      .add_double("ci_high", column_of(rows, [](const R& r) { return r.ci_high; }))
      .add_double("ref_value", column_of(rows, [](const R& r) { return r.ref_value; }))
      .add_double("delta", column_of(rows, [](const R& r) { return r.delta; }))
      .add_double("delta_ci_low", column_of(rows, [](const R& r) { return r.delta_ci_low; }))
      .add_double("delta_ci_high", column_of(rows, [](const R& r) { return r.delta_ci_high; }))
      .add_uint32("flags", column_of(rows, [](const R& r) { return r.flags; }))
      .add_strings("flags_text", column_of(rows, [](const R& r) { return flags_to_string(r.flags); }));
  g.write_table("slices", t);
}

void write_disparity(const h5::Group& g, const std::vector<DisparityRow>& rows) {
  using R = DisparityRow;
  h5::Table t;
  t.add_strings("metric", column_of(rows, [](const R& r) { return r.metric; }))
      .add_strings("slice_key", column_of(rows, [](const R& r) { return r.slice_key; }))
      .add_strings("summary", column_of(rows, [](const R& r) { return r.summary; }))
      .add_strings("on", column_of(rows, [](const R& r) { return r.on; }))
      .add_strings("worst_slice", column_of(rows, [](const R& r) { return r.worst_slice; }))
      .add_double("value", column_of(rows, [](const R& r) { return r.value; }))
      .add_double("ci_low", column_of(rows, [](const R& r) { return r.ci_low; }))
      .add_double("ci_high", column_of(rows, [](const R& r) { return r.ci_high; }))
      .add_double("p_worst", column_of(rows, [](const R& r) { return r.p_worst; }));
  g.write_table("disparity", t);
}

void write_units(const h5::Group& run_group, const UnitTable& u, const std::string& run_id) {
  const size_t n = u.unit_ids.size();
  auto bad = [&](const std::string& what) {
    throw ShapeError("run '" + run_id + "': unit table: " + what);
  };
  if (static_cast<size_t>(u.sums.rows()) != n)
    bad("sums has " + std::to_string(u.sums.rows()) + " rows but there are " + std::to_string(n) +
        " unit ids");
  if (static_cast<size_t>(u.sums.cols()) != u.columns.size())
    bad("sums has " + std::to_string(u.sums.cols()) + " columns but " +
        std::to_string(u.columns.size()) + " column names");
  if (u.attrs.size() != u.attr_keys.size())
    bad(std::to_string(u.attrs.size()) + " attribute arrays for " +
        std::to_string(u.attr_keys.size()) + " attribute keys");
  for (size_t k = 0; k < u.attrs.size(); ++k)
    if (u.attrs[k].size() != n)
      bad("attribute '" + u.attr_keys[k] + "' has " + std::to_string(u.attrs[k].size()) +
          " values for " + std::to_string(n) + " units");

  h5::Group g = run_group.create_group("units");
  g.set_string_attr("token_column", u.token_column);
  g.write_strings("ids", u.unit_ids);
  g.write_strings("columns", u.columns);
  g.write_matrix("sums", u.sums);
  g.write_strings("attr_keys", u.attr_keys);
  h5::Group a = g.create_group("attrs");
  for (size_t k = 0; k < u.attr_keys.size(); ++k) a.write_strings(u.attr_keys[k], u.attrs[k]);
  // Token slice families (core/slices.h): column blocks of block_size, one per bucket, so the
  // token-slice intervals can be recomputed offline too. Long format: family, value, offset.
  g.set_int64_attr("block_size", static_cast<int64_t>(u.block_size));
  std::vector<std::string> fam, val;
  std::vector<int64_t> off;
  for (auto& f : u.token_families)
    for (size_t v = 0; v < f.values.size(); ++v) {
      fam.push_back(f.key);
      val.push_back(f.values[v]);
      off.push_back(static_cast<int64_t>(f.offsets[v]));
    }
  h5::Table t;
  t.add_strings("family", fam).add_strings("value", val).add_int64("offset", off);
  g.write_table("token_families", t);
}

void write_run(const h5::Group& g, const RunRecord& r, int64_t order) {
  g.set_string_attr("run_id", r.run_id);
  g.set_string_attr("label", r.label);
  g.set_string_attr("config_hash", r.run_id);
  g.set_string_attr("config_yaml", r.config_yaml);
  g.set_string_attr("code_revision", r.code_revision);
  g.set_string_attr("status", run_status_name(r.status));
  g.set_string_attr("message", r.message);
  g.set_string_attr("started_at", r.started_at);
  g.set_uint64_attr("seed", r.seed);
  g.set_int64_attr("threads", r.threads);
  g.set_double_attr("seconds_total", r.seconds_total);
  g.set_double_attr("seconds_calib", r.seconds_calib);
  g.set_double_attr("seconds_quant", r.seconds_quant);
  g.set_double_attr("seconds_eval", r.seconds_eval);
  g.set_int64_attr("order", order);
  write_key_values(g, "params", r.params);
  write_key_values(g, "numeric_env", r.numeric_env);
  write_layers(g, r.layers);
  write_diagnostics(g, r.diagnostics);
  if (!r.training.empty()) write_training(g, r.training);
  write_summary(g, r.summary);
  write_slices(g, r.slices);
  write_disparity(g, r.disparity);
  // Units last: their consistency checks may throw after the group is half written, which the
  // temp-file protocol of append() makes harmless.
  write_units(g, r.units, r.run_id);
}

// ---- reading ----------------------------------------------------------------------------------

std::vector<ParamRow> read_key_values(const h5::Group& g, const std::string& name) {
  h5::Table t = g.read_table(name);
  const auto& key = t.strings("key");
  const auto& value = t.strings("value");
  std::vector<ParamRow> rows(t.n_rows());
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = {key[i], value[i]};
  return rows;
}

std::vector<LayerRow> read_layers(const h5::Group& g) {
  h5::Table t = g.read_table("layers");
  std::vector<LayerRow> rows(t.n_rows());
  const auto bits = t.int64s("bits"), group_size = t.int64s("group_size");
  for (size_t i = 0; i < rows.size(); ++i) {
    LayerRow& r = rows[i];
    r.layer = t.strings("layer")[i];
    r.algorithm = t.strings("algorithm")[i];
    r.scheme = t.strings("scheme")[i];
    r.bits = to_int(bits[i], t, "bits");
    r.group_size = to_int(group_size[i], t, "group_size");
    r.bpw = t.doubles("bpw")[i];
    r.weight_mse = t.doubles("weight_mse")[i];
    r.rel_err_h = t.doubles("rel_err_h")[i];
    r.rel_err_eval = t.doubles("rel_err_eval")[i];
    r.out_mse = t.doubles("out_mse")[i];
    r.sqnr_db = t.doubles("sqnr_db")[i];
    r.cosine = t.doubles("cosine")[i];
    r.max_abs = t.doubles("max_abs")[i];
    r.seconds = t.doubles("seconds")[i];
  }
  return rows;
}

std::vector<DiagnosticRow> read_diagnostics(const h5::Group& g) {
  h5::Table t = g.read_table("diagnostics");
  std::vector<DiagnosticRow> rows(t.n_rows());
  const auto step = t.int64s("step");
  for (size_t i = 0; i < rows.size(); ++i) {
    rows[i].layer = t.strings("layer")[i];
    rows[i].step = to_int(step[i], t, "step");
    rows[i].algorithm = t.strings("algorithm")[i];
    rows[i].name = t.strings("name")[i];
    rows[i].value = t.doubles("value")[i];
  }
  return rows;
}

std::vector<TrainingRow> read_training(const h5::Group& g) {
  h5::Table t = g.read_table("training");
  std::vector<TrainingRow> rows(t.n_rows());
  const auto ps = t.int64s("pipeline_step"), step = t.int64s("step"), fw = t.int64s("forwards"),
             bw = t.int64s("backwards");
  for (size_t i = 0; i < rows.size(); ++i) {
    TrainingRow& r = rows[i];
    r.pipeline_step = to_int(ps[i], t, "pipeline_step");
    r.algorithm = t.strings("algorithm")[i];
    r.step = step[i];
    r.forwards = fw[i];
    r.backwards = bw[i];
    r.train_loss = t.doubles("train_loss")[i];
    r.heldout_loss = t.doubles("heldout_loss")[i];
    r.grad_cosine = t.doubles("grad_cosine")[i];
    r.grad_norm_ratio = t.doubles("grad_norm_ratio")[i];
    r.lr = t.doubles("lr")[i];
    r.seconds = t.doubles("seconds")[i];
  }
  return rows;
}

std::vector<SummaryRow> read_summary(const h5::Group& g) {
  h5::Table t = g.read_table("summary");
  std::vector<SummaryRow> rows(t.n_rows());
  for (size_t i = 0; i < rows.size(); ++i) {
    rows[i].metric = t.strings("metric")[i];
    rows[i].value = t.doubles("value")[i];
    rows[i].ci_low = t.doubles("ci_low")[i];
    rows[i].ci_high = t.doubles("ci_high")[i];
    rows[i].delta_vs_fp = t.doubles("delta_vs_fp")[i];
  }
  return rows;
}

std::vector<SliceRow> read_slices(const h5::Group& g) {
  h5::Table t = g.read_table("slices");
  std::vector<SliceRow> rows(t.n_rows());
  const auto n_units = t.int64s("n_units"), n_tokens = t.int64s("n_tokens");
  const auto flags = t.uint32s("flags");
  for (size_t i = 0; i < rows.size(); ++i) {
    SliceRow& r = rows[i];
    r.metric = t.strings("metric")[i];
    r.slice_key = t.strings("slice_key")[i];
    r.slice_value = t.strings("slice_value")[i];
    r.n_units = n_units[i];
    r.n_tokens = n_tokens[i];
    r.value = t.doubles("value")[i];
    r.ci_low = t.doubles("ci_low")[i];
    r.ci_high = t.doubles("ci_high")[i];
    r.ref_value = t.doubles("ref_value")[i];
    r.delta = t.doubles("delta")[i];
    r.delta_ci_low = t.doubles("delta_ci_low")[i];
    r.delta_ci_high = t.doubles("delta_ci_high")[i];
    r.flags = flags[i];
  }
  return rows;
}

std::vector<DisparityRow> read_disparity(const h5::Group& g) {
  h5::Table t = g.read_table("disparity");
  std::vector<DisparityRow> rows(t.n_rows());
  for (size_t i = 0; i < rows.size(); ++i) {
    DisparityRow& r = rows[i];
    r.metric = t.strings("metric")[i];
    r.slice_key = t.strings("slice_key")[i];
    r.summary = t.strings("summary")[i];
    r.on = t.strings("on")[i];
    r.worst_slice = t.strings("worst_slice")[i];
    r.value = t.doubles("value")[i];
    r.ci_low = t.doubles("ci_low")[i];
    r.ci_high = t.doubles("ci_high")[i];
    r.p_worst = t.doubles("p_worst")[i];
  }
  return rows;
}

UnitTable read_units(const h5::Group& run_group) {
  h5::Group g = run_group.open_group("units");
  UnitTable u;
  u.token_column = g.string_attr("token_column");
  u.unit_ids = g.read_strings("ids");
  u.columns = g.read_strings("columns");
  u.sums = g.read_matrix("sums");
  u.attr_keys = g.read_strings("attr_keys");
  h5::Group a = g.open_group("attrs");
  for (const auto& key : u.attr_keys) u.attrs.push_back(a.read_strings(key));
  if (g.has_attr("block_size")) u.block_size = static_cast<Index>(g.int64_attr("block_size"));
  if (g.has("token_families")) {
    h5::Table t = g.read_table("token_families");
    const auto fam = t.strings("family"), val = t.strings("value");
    const auto off = t.int64s("offset");
    for (size_t i = 0; i < fam.size(); ++i) {
      if (u.token_families.empty() || u.token_families.back().key != fam[i])
        u.token_families.push_back(TokenFamily{fam[i], {}, {}});
      u.token_families.back().values.push_back(val[i]);
      u.token_families.back().offsets.push_back(static_cast<Index>(off[i]));
    }
  }
  if (static_cast<size_t>(u.sums.rows()) != u.unit_ids.size() ||
      static_cast<size_t>(u.sums.cols()) != u.columns.size())
    throw IoError(g.file_path() + ": " + g.path() + ": sums shape does not match ids/columns");
  return u;
}

RunRecord read_run_group(const h5::Group& g) {
  RunRecord r;
  r.run_id = g.string_attr("run_id");
  r.label = g.string_attr("label");
  r.config_yaml = g.string_attr("config_yaml");
  r.code_revision = g.string_attr("code_revision");
  r.status = parse_run_status(g.string_attr("status"));
  r.message = g.string_attr("message");
  r.started_at = g.string_attr("started_at");
  r.seed = g.uint64_attr("seed");
  r.threads = static_cast<int>(g.int64_attr("threads"));
  r.seconds_total = g.double_attr("seconds_total");
  r.seconds_calib = g.double_attr("seconds_calib");
  r.seconds_quant = g.double_attr("seconds_quant");
  r.seconds_eval = g.double_attr("seconds_eval");
  r.params = read_key_values(g, "params");
  // Files written before the environment was recorded have no table: an empty list.
  r.numeric_env = g.has("numeric_env") ? read_key_values(g, "numeric_env") : std::vector<ParamRow>{};
  r.layers = read_layers(g);
  r.diagnostics = read_diagnostics(g);
  if (g.has("training")) r.training = read_training(g);  // only runs with a training step have one
  r.summary = read_summary(g);
  r.slices = read_slices(g);
  r.disparity = read_disparity(g);
  r.units = read_units(g);
  return r;
}

// ---- files ------------------------------------------------------------------------------------

bool file_exists(const std::string& path) {
  std::error_code ec;
  return fs::exists(path, ec);
}

// Open an existing results file, checking it is one (format attr and version).
h5::File open_results(const std::string& path, h5::Access access) {
  if (!h5::File::is_hdf5(path))
    throw IoError(path + ": not a quantlab results file (not an HDF5 file)");
  h5::File f = h5::File::open(path, access);
  {
    h5::Group root = f.root();
    if (!root.has_attr("format") || root.string_attr("format") != ResultStore::kFormat)
      throw IoError(path + ": not a quantlab results file (no format=\"" +
                    std::string(ResultStore::kFormat) + "\" attribute)");
    const int64_t version =
        root.has_attr("format_version") ? root.int64_attr("format_version") : -1;
    if (version < 1 || version > ResultStore::kFormatVersion)
      throw IoError(path + ": results format_version " + std::to_string(version) +
                    " is not supported (this build reads 1.." +
                    std::to_string(ResultStore::kFormatVersion) + ")");
  }
  return f;
}

void check_run_id(const std::string& id) {
  if (id.empty() || id == "." || id == ".." || id.find('/') != std::string::npos)
    throw Error("cannot store a run with id '" + id + "': run ids must be non-empty and have no '/'");
}

[[noreturn]] void throw_errno(const std::string& path, const std::string& what) {
  throw IoError(path + ": " + what + " (" + std::strerror(errno) + ")");
}

// fsync a file or directory by path.
void sync_path(const std::string& path, bool directory) {
  int fd = ::open(path.c_str(), O_RDONLY | (directory ? O_DIRECTORY : 0));
  if (fd < 0) throw_errno(path, "cannot open for fsync");
  if (::fsync(fd) != 0) {
    int e = errno;
    ::close(fd);
    errno = e;
    throw_errno(path, "fsync failed");
  }
  ::close(fd);
}

// Removes the temp file unless release() was called (the rename consumed it).
class TempFile {
 public:
  explicit TempFile(std::string path) : path_(std::move(path)) {}
  ~TempFile() {
    if (armed_) {
      std::error_code ec;
      fs::remove(path_, ec);
    }
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  const std::string& path() const { return path_; }
  void release() { armed_ = false; }

 private:
  std::string path_;
  bool armed_ = true;
};

}  // namespace

// ---- ResultStore ------------------------------------------------------------------------------

ResultStore::ResultStore(std::string path) : path_(std::move(path)) {
  if (path_.empty()) throw IoError("results file path is empty");
  if (exists()) open_results(path_, h5::Access::ReadOnly).close();
}

bool ResultStore::exists() const { return file_exists(path_); }

void ResultStore::append(const RunRecord& run) {
  check_run_id(run.run_id);
  const fs::path target(path_);
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  {
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) throw IoError(dir.string() + ": cannot create directory (" + ec.message() + ")");
  }
  const bool had = exists();
  if (had) open_results(path_, h5::Access::ReadOnly).close();

  TempFile tmp(path_ + ".tmp-" + std::to_string(::getpid()));
  {
    std::error_code ec;
    fs::remove(tmp.path(), ec);  // a stale temp of an earlier process with our pid
    if (had) {
      fs::copy_file(path_, tmp.path(), fs::copy_options::overwrite_existing, ec);
      if (ec) throw IoError(path_ + ": cannot copy to " + tmp.path() + " (" + ec.message() + ")");
    }
  }
  h5::File f = had ? h5::File::open(tmp.path(), h5::Access::ReadWrite) : h5::File::create(tmp.path());
  {
    h5::Group root = f.root();
    if (!had) {
      root.set_string_attr("format", kFormat);
      root.set_int64_attr("format_version", kFormatVersion);
    }
    h5::Group runs = root.has("runs") ? root.open_group("runs") : root.create_group("runs");
    int64_t order = 0;
    if (runs.has(run.run_id)) {
      // A re-run keeps its place, so tables keep the order of the sweep.
      order = runs.open_group(run.run_id).int64_attr("order");
      runs.remove(run.run_id);
    } else {
      for (const auto& name : runs.children())
        order = std::max(order, runs.open_group(name).int64_attr("order") + 1);
    }
    h5::Group g = runs.create_group(run.run_id);
    write_run(g, run, order);
  }
  f.close();
  sync_path(tmp.path(), false);
  if (std::rename(tmp.path().c_str(), path_.c_str()) != 0)
    throw_errno(path_, "cannot rename " + tmp.path() + " over it");
  tmp.release();
  sync_path(dir.string(), true);
}

const char* run_status_name(RunStatus s) { return s == RunStatus::Ok ? "ok" : "failed"; }

RunStatus parse_run_status(const std::string& s) {
  if (s == "ok") return RunStatus::Ok;
  if (s == "failed") return RunStatus::Failed;
  throw Error("run status '" + s + "': expected ok or failed");
}

std::map<std::string, RunStatus> ResultStore::run_statuses() const {
  std::map<std::string, RunStatus> out;
  if (!exists()) return out;
  h5::File f = open_results(path_, h5::Access::ReadOnly);
  h5::Group root = f.root();
  if (!root.has("runs")) return out;
  h5::Group runs = root.open_group("runs");
  for (const auto& id : runs.children()) out[id] = parse_run_status(runs.open_group(id).string_attr("status"));
  return out;
}

RunRecord ResultStore::read_run(const std::string& run_id) const {
  if (!exists()) throw IoError(path_ + ": no such file");
  h5::File f = open_results(path_, h5::Access::ReadOnly);
  h5::Group root = f.root();
  if (run_id.empty() || run_id.find('/') != std::string::npos || !root.has("runs") ||
      !root.open_group("runs").has(run_id))
    throw IoError(path_ + ": no run '" + run_id + "'");
  return read_run_group(root.open_group("runs").open_group(run_id));
}

std::vector<RunRecord> ResultStore::read_all() const {
  std::vector<RunRecord> out;
  if (!exists()) return out;
  h5::File f = open_results(path_, h5::Access::ReadOnly);
  h5::Group root = f.root();
  if (!root.has("runs")) return out;
  h5::Group runs = root.open_group("runs");
  std::vector<std::pair<int64_t, std::string>> order;
  for (const auto& id : runs.children()) order.emplace_back(runs.open_group(id).int64_attr("order"), id);
  std::stable_sort(order.begin(), order.end());
  out.reserve(order.size());
  for (const auto& [o, id] : order) out.push_back(read_run_group(runs.open_group(id)));
  return out;
}

}  // namespace ql
