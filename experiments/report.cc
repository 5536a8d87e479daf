#include "experiments/report.h"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>

#include "core/error.h"
#include "core/metrics.h"
#include "experiments/result_store.h"

namespace ql {
namespace fs = std::filesystem;

namespace {

// ---- text helpers -----------------------------------------------------------------------------

// Shortest decimal form that parses back to the same double (std::to_chars without precision).
std::string round_trip(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, res.ptr);
}

std::string four_digits(double v) {
  if (std::isnan(v)) return "nan";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.4g", v);
  return buf;
}

// RFC 4180: a field with a comma, quote or line break is quoted, quotes doubled.
std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\r\n") == std::string::npos) return s;
  std::string out = "\"";
  for (char c : s) {
    if (c == '"') out += '"';
    out += c;
  }
  return out + "\"";
}

std::string csv_line(const std::vector<std::string>& fields) {
  std::string line;
  for (size_t i = 0; i < fields.size(); ++i) {
    if (i) line += ',';
    line += csv_field(fields[i]);
  }
  return line + "\n";
}

std::string join(const std::vector<std::string>& v, const std::string& sep) {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) out += (i ? sep : "") + v[i];
  return out;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  std::istringstream in(s);
  while (std::getline(in, cur, sep)) {
    // Trim spaces so "a, b" works as well as "a,b".
    const auto b = cur.find_first_not_of(' ');
    const auto e = cur.find_last_not_of(' ');
    out.push_back(b == std::string::npos ? std::string() : cur.substr(b, e - b + 1));
  }
  return out;
}

// Keeps first-appearance order of distinct strings.
class OrderedSet {
 public:
  size_t add(const std::string& s) {
    auto it = index_.find(s);
    if (it != index_.end()) return it->second;
    index_.emplace(s, items_.size());
    items_.push_back(s);
    return items_.size() - 1;
  }
  const std::vector<std::string>& items() const { return items_; }
  bool contains(const std::string& s) const { return index_.count(s) > 0; }

 private:
  std::map<std::string, size_t> index_;
  std::vector<std::string> items_;
};

const std::string* find_param(const RunRecord& r, const std::string& key) {
  for (const auto& p : r.params)
    if (p.key == key) return &p.value;
  return nullptr;
}

// ---- CSV export -------------------------------------------------------------------------------

class CsvFile {
 public:
  CsvFile(const fs::path& path, const std::vector<std::string>& header)
      : path_(path.string()), out_(path, std::ios::binary | std::ios::trunc) {
    if (!out_) throw IoError(path_ + ": cannot open for writing");
    row(header);
  }
  void row(const std::vector<std::string>& fields) { out_ << csv_line(fields); }
  void close() {
    out_.close();
    if (!out_) throw IoError(path_ + ": write failed");
  }

 private:
  std::string path_;
  std::ofstream out_;
};

bool report_param(const std::string& key) {
  return key.rfind("quant.", 0) == 0 || key.rfind("workload.", 0) == 0;
}

void write_runs_csv(const std::vector<RunRecord>& runs, const fs::path& dir) {
  OrderedSet params, metrics;
  for (const auto& r : runs) {
    for (const auto& p : r.params)
      if (report_param(p.key)) params.add(p.key);
    for (const auto& s : r.summary) metrics.add(s.metric);
  }
  std::vector<std::string> header{"run_id", "label", "status", "message"};
  for (const auto& k : params.items()) header.push_back(k);
  for (const auto& m : metrics.items()) header.push_back(m);
  CsvFile f(dir / "runs.csv", header);
  for (const auto& r : runs) {
    std::vector<std::string> row{r.run_id, r.label, run_status_name(r.status), r.message};
    for (const auto& k : params.items()) {
      const std::string* v = find_param(r, k);
      row.push_back(v ? *v : "");
    }
    for (const auto& m : metrics.items()) {
      std::string cell;
      for (const auto& s : r.summary)
        if (s.metric == m) cell = round_trip(s.value);
      row.push_back(cell);
    }
    f.row(row);
  }
  f.close();
}

void write_table_csvs(const std::vector<RunRecord>& runs, const fs::path& dir) {
  const auto d = round_trip;
  CsvFile params(dir / "params.csv", {"run_id", "label", "key", "value"});
  CsvFile numeric_env(dir / "numeric_env.csv", {"run_id", "label", "key", "value"});
  CsvFile summary(dir / "summary.csv",
                  {"run_id", "label", "metric", "value", "ci_low", "ci_high", "delta_vs_fp"});
  CsvFile layers(dir / "layers.csv",
                 {"run_id", "label", "layer", "algorithm", "scheme", "bits", "group_size", "bpw",
                  "weight_mse", "rel_err_h", "rel_err_eval", "out_mse", "sqnr_db", "cosine",
                  "max_abs", "seconds"});
  CsvFile slices(dir / "slices.csv",
                 {"run_id", "label", "metric", "slice_key", "slice_value", "n", "n_tokens",
                  "value", "ci_low", "ci_high", "ref_value", "delta_vs_fp", "delta_ci_low",
                  "delta_ci_high", "flags"});
  CsvFile disparity(dir / "disparity.csv",
                    {"run_id", "label", "metric", "slice_key", "summary", "on", "worst_slice",
                     "value", "ci_low", "ci_high", "p_worst"});
  CsvFile diagnostics(dir / "diagnostics.csv",
                      {"run_id", "label", "layer", "step", "algorithm", "name", "value"});
  for (const auto& r : runs) {
    for (const auto& p : r.params) params.row({r.run_id, r.label, p.key, p.value});
    for (const auto& p : r.numeric_env) numeric_env.row({r.run_id, r.label, p.key, p.value});
    for (const auto& s : r.summary)
      summary.row({r.run_id, r.label, s.metric, d(s.value), d(s.ci_low), d(s.ci_high),
                   d(s.delta_vs_fp)});
    for (const auto& l : r.layers)
      layers.row({r.run_id, r.label, l.layer, l.algorithm, l.scheme, std::to_string(l.bits),
                  std::to_string(l.group_size), d(l.bpw), d(l.weight_mse), d(l.rel_err_h),
                  d(l.rel_err_eval), d(l.out_mse), d(l.sqnr_db), d(l.cosine), d(l.max_abs),
                  d(l.seconds)});
    for (const auto& s : r.slices)
      slices.row({r.run_id, r.label, s.metric, s.slice_key, s.slice_value,
                  std::to_string(s.n_units), std::to_string(s.n_tokens), d(s.value), d(s.ci_low),
                  d(s.ci_high), d(s.ref_value), d(s.delta), d(s.delta_ci_low),
                  d(s.delta_ci_high), flags_to_string(s.flags)});
    for (const auto& x : r.disparity)
      disparity.row({r.run_id, r.label, x.metric, x.slice_key, x.summary, x.on, x.worst_slice,
                     d(x.value), d(x.ci_low), d(x.ci_high), d(x.p_worst)});
    for (const auto& x : r.diagnostics)
      diagnostics.row({r.run_id, r.label, x.layer, std::to_string(x.step), x.algorithm, x.name,
                       d(x.value)});
  }
  params.close();
  numeric_env.close();
  summary.close();
  layers.close();
  slices.close();
  disparity.close();
  diagnostics.close();
}

// ---- pivot ------------------------------------------------------------------------------------

struct MetricSpec {
  enum class Kind { Summary, Slice, Disparity } kind = Kind::Summary;
  std::string metric, key, value;  // value: slice value (Slice)
  std::string summary;             // disparity summary name (Disparity)
};

[[noreturn]] void bad_metric(const std::string& m) {
  throw Error("malformed metric '" + m +
              "': expected METRIC, METRIC@KEY=VALUE, worst:METRIC@KEY or gap:METRIC@KEY");
}

MetricSpec parse_metric(const std::string& m) {
  MetricSpec s;
  std::string rest = m;
  if (m.rfind("worst:", 0) == 0 || m.rfind("gap:", 0) == 0) {
    s.kind = MetricSpec::Kind::Disparity;
    s.summary = m[0] == 'w' ? "worst" : "gap_between";
    rest = m.substr(m.find(':') + 1);
    const auto at = rest.find('@');
    if (at == std::string::npos || at == 0 || at + 1 == rest.size() ||
        rest.find('=') != std::string::npos)
      bad_metric(m);
    s.metric = rest.substr(0, at);
    s.key = rest.substr(at + 1);
    return s;
  }
  const auto at = rest.find('@');
  if (at == std::string::npos) {
    if (rest.empty()) bad_metric(m);
    s.metric = rest;
    return s;
  }
  const auto eq = rest.find('=', at);
  if (at == 0 || eq == std::string::npos || eq == at + 1 || eq + 1 == rest.size()) bad_metric(m);
  s.kind = MetricSpec::Kind::Slice;
  s.metric = rest.substr(0, at);
  s.key = rest.substr(at + 1, eq - at - 1);
  s.value = rest.substr(eq + 1);
  return s;
}

// Disparity rows on the slice levels (FAIRNESS.md §4.4 calls them "level"; accept the plural).
bool on_levels(const std::string& on) { return on == "levels" || on == "level"; }

std::optional<double> lookup(const RunRecord& r, const MetricSpec& s) {
  switch (s.kind) {
    case MetricSpec::Kind::Summary:
      for (const auto& x : r.summary)
        if (x.metric == s.metric) return x.value;
      break;
    case MetricSpec::Kind::Slice:
      for (const auto& x : r.slices)
        if (x.metric == s.metric && x.slice_key == s.key && x.slice_value == s.value)
          return x.value;
      break;
    case MetricSpec::Kind::Disparity:
      for (const auto& x : r.disparity)
        if (x.metric == s.metric && x.slice_key == s.key && x.summary == s.summary &&
            on_levels(x.on))
          return x.value;
      break;
  }
  return std::nullopt;
}

[[noreturn]] void unknown_metric(const std::vector<RunRecord>& runs, const std::string& m) {
  OrderedSet summary, disparity;
  // metric@key -> values, in first-appearance order.
  OrderedSet slice_fams;
  std::map<std::string, OrderedSet> slice_values;
  for (const auto& r : runs) {
    for (const auto& x : r.summary) summary.add(x.metric);
    for (const auto& x : r.slices) {
      if (x.slice_key == "__all__") continue;  // the overall rows are the summary metrics
      const std::string fam = x.metric + "@" + x.slice_key;
      slice_fams.add(fam);
      slice_values[fam].add(x.slice_value);
    }
    for (const auto& x : r.disparity)
      if (on_levels(x.on) && (x.summary == "worst" || x.summary == "gap_between"))
        disparity.add((x.summary == "worst" ? "worst:" : "gap:") + x.metric + "@" + x.slice_key);
  }
  std::vector<std::string> slices;
  for (const auto& fam : slice_fams.items())
    slices.push_back(fam + "={" + join(slice_values[fam].items(), ",") + "}");
  std::string msg = "unknown metric '" + m + "'; summary metrics: " +
                    (summary.items().empty() ? "(none)" : join(summary.items(), ", "));
  if (!slices.empty()) msg += "; slice metrics: " + join(slices, ", ");
  if (!disparity.items().empty()) msg += "; disparity: " + join(disparity.items(), ", ");
  throw Error(msg);
}

/// A stored number as a reader writes it: the shortest round-trip form stores 20 as "2e+01";
/// whole numbers below 1e15 print as integers. Other values unchanged.
std::string readable_value(const std::string& s) {
  if (s.find_first_of("eE") == std::string::npos) return s;
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (end == s.c_str() || *end != '\0' || !(std::fabs(v) < 1e15) || v != std::floor(v)) return s;
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.0f", v);
  return buf;
}

struct KeyResolver {
  std::vector<std::string> parts;

  KeyResolver(const std::string& key, const std::vector<RunRecord>& runs) {
    if (key.empty()) return;
    parts = split(key, ',');
    for (const auto& p : parts) {
      if (p.empty()) throw Error("key '" + key + "': empty part in composite key");
      if (p == "label" || p == "run_id" || p == "status") continue;
      bool found = false;
      for (const auto& r : runs) found = found || find_param(r, p) != nullptr;
      if (!found) {
        OrderedSet known;
        for (const auto& r : runs)
          for (const auto& q : r.params) known.add(q.key);
        throw Error("unknown key '" + p + "': expected label, run_id, status or a params key (" +
                    join(known.items(), ", ") + ")");
      }
    }
  }
  bool empty() const { return parts.empty(); }
  std::string display() const { return join(parts, "/"); }
  std::string value(const RunRecord& r) const {
    std::vector<std::string> v;
    for (const auto& p : parts) {
      if (p == "label") v.push_back(r.label);
      else if (p == "run_id") v.push_back(r.run_id);
      else if (p == "status") v.push_back(run_status_name(r.status));
      else {
        const std::string* x = find_param(r, p);
        v.push_back(x ? readable_value(*x) : "-");
      }
    }
    return join(v, "/");
  }
};

// Params keys whose values differ between two runs (what would separate them), excluding `used`.
std::vector<std::string> separating_keys(const RunRecord& a, const RunRecord& b,
                                         const std::set<std::string>& used) {
  std::vector<std::string> out;
  for (const auto& p : a.params) {
    if (used.count(p.key)) continue;
    const std::string* q = find_param(b, p.key);
    if (!q || *q != p.value) out.push_back(p.key);
  }
  for (const auto& p : b.params)
    if (!used.count(p.key) && !find_param(a, p.key)) out.push_back(p.key);
  return out;
}

/// "mean ± sd (n)" of repeated measurements; "-" without any.
std::string aggregate_cell(const std::vector<double>& values) {
  if (values.empty()) return "-";
  const MeanSd m = mean_sd(values);
  return four_digits(m.mean) + " ± " + four_digits(m.sd) + " (" + std::to_string(m.n) + ")";
}

std::string latex_escape(const std::string& s) {
  const std::string pm = "±";
  if (size_t at = s.find(pm); at != std::string::npos)
    return latex_escape(s.substr(0, at)) + "$\\pm$" + latex_escape(s.substr(at + pm.size()));
  std::string out;
  for (char c : s) {
    switch (c) {
      case '\\': out += "\\textbackslash{}"; break;
      case '&': case '%': case '$': case '#': case '_': case '{': case '}':
        out += '\\';
        out += c;
        break;
      case '~': out += "\\textasciitilde{}"; break;
      case '^': out += "\\textasciicircum{}"; break;
      default: out += c;
    }
  }
  return out;
}

std::string md_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '|') out += '\\';
    out += c;
  }
  return out;
}

std::string render(const std::vector<std::vector<std::string>>& grid, const std::string& format) {
  std::string out;
  const size_t ncol = grid.front().size();
  if (format == "md") {
    for (size_t i = 0; i < grid.size(); ++i) {
      out += "|";
      for (const auto& c : grid[i]) out += " " + md_escape(c) + " |";
      out += "\n";
      if (i == 0) {
        out += "| --- |";
        for (size_t j = 1; j < ncol; ++j) out += " ---: |";
        out += "\n";
      }
    }
  } else if (format == "latex") {
    out += "\\begin{tabular}{l" + std::string(ncol - 1, 'r') + "}\n\\toprule\n";
    for (size_t i = 0; i < grid.size(); ++i) {
      for (size_t j = 0; j < ncol; ++j) out += (j ? " & " : "") + latex_escape(grid[i][j]);
      out += " \\\\\n";
      if (i == 0) out += "\\midrule\n";
    }
    out += "\\bottomrule\n\\end{tabular}\n";
  } else {
    for (const auto& row : grid) out += csv_line(row);
  }
  return out;
}

}  // namespace

void export_csv(const std::vector<RunRecord>& runs, const std::string& out_dir) {
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) throw IoError(out_dir + ": cannot create directory (" + ec.message() + ")");
  write_runs_csv(runs, out_dir);
  write_table_csvs(runs, out_dir);
}

void export_csv(const std::string& h5_path, const std::string& out_dir) {
  ResultStore store(h5_path);
  if (!store.exists()) throw IoError(h5_path + ": no such file");
  export_csv(store.read_all(), out_dir);
}

std::string pivot_table(const std::vector<RunRecord>& runs, const std::string& rows_key,
                        const std::string& cols_key, const std::string& metric,
                        const std::string& format, const std::string& over) {
  if (format != "md" && format != "latex" && format != "csv")
    throw Error("unknown table format '" + format + "': expected md, latex or csv");
  if (runs.empty()) throw Error("no runs to tabulate");
  if (rows_key.empty()) throw Error("the rows key must not be empty");
  const MetricSpec spec = parse_metric(metric);
  bool known = false;
  for (const auto& r : runs) known = known || lookup(r, spec).has_value();
  if (!known) unknown_metric(runs, metric);
  const KeyResolver rows(rows_key, runs), cols(cols_key, runs);

  if (!over.empty()) {
    bool found = false;
    for (const auto& r : runs) found = found || find_param(r, over) != nullptr;
    if (!found) throw Error("no run has the params key '" + over + "' given to aggregate over");
  }
  struct Cell {
    const RunRecord* ok = nullptr;
    std::vector<const RunRecord*> all_ok;  // with `over`: every ok run, distinct `over` values
    std::vector<double> values;            // their values of the metric
    std::optional<double> value;
    std::string failed;  // status of a non-ok run in the cell
  };
  auto over_value = [&](const RunRecord& r) {
    const std::string* v = find_param(r, over);
    return v ? *v : std::string("-");
  };
  OrderedSet row_names, col_names;
  std::map<std::pair<size_t, size_t>, Cell> cells;
  for (const auto& r : runs) {
    const size_t i = row_names.add(rows.value(r));
    const size_t j = col_names.add(cols.empty() ? metric : cols.value(r));
    Cell& c = cells[{i, j}];
    if (r.status != RunStatus::Ok) {
      if (c.failed.empty()) c.failed = run_status_name(r.status);
      continue;
    }
    const RunRecord* clash = nullptr;
    if (over.empty()) {
      clash = c.ok;
    } else {
      for (const RunRecord* o : c.all_ok)
        if (over_value(*o) == over_value(r)) clash = o;
    }
    if (clash) {
      std::set<std::string> used(rows.parts.begin(), rows.parts.end());
      used.insert(cols.parts.begin(), cols.parts.end());
      if (!over.empty()) used.insert(over);
      auto sep = separating_keys(*clash, r, used);
      if (sep.size() > 3) sep.resize(3);
      throw Error("runs '" + clash->label + "' and '" + r.label + "' fall in the same cell (row '" +
                  row_names.items()[i] + "', column '" + col_names.items()[j] +
                  "'); add a key to the rows or columns that separates them" +
                  (sep.empty() ? std::string(", e.g. label or run_id")
                               : ", e.g. " + join(sep, " or ")));
    }
    c.ok = &r;
    c.value = lookup(r, spec);
    c.all_ok.push_back(&r);
    if (c.value) c.values.push_back(*c.value);
  }

  std::vector<std::vector<std::string>> grid;
  grid.push_back({cols.empty() ? rows.display() : rows.display() + " \\ " + cols.display()});
  for (const auto& c : col_names.items()) grid.front().push_back(c);
  for (size_t i = 0; i < row_names.items().size(); ++i) {
    std::vector<std::string> line{row_names.items()[i]};
    for (size_t j = 0; j < col_names.items().size(); ++j) {
      auto it = cells.find({i, j});
      if (it == cells.end()) line.push_back("-");
      else if (it->second.ok && !over.empty()) line.push_back(aggregate_cell(it->second.values));
      else if (it->second.ok) line.push_back(it->second.value ? four_digits(*it->second.value) : "-");
      else line.push_back(it->second.failed);
    }
    grid.push_back(std::move(line));
  }
  return render(grid, format);
}

std::string pivot_table(const std::string& h5_path, const std::string& rows_key,
                        const std::string& cols_key, const std::string& metric,
                        const std::string& format, const std::string& over) {
  ResultStore store(h5_path);
  if (!store.exists()) throw IoError(h5_path + ": no such file");
  return pivot_table(store.read_all(), rows_key, cols_key, metric, format, over);
}

}  // namespace ql
