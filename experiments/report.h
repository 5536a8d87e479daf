// Reports from stored results (never re-running anything): a CSV export of every table and
// pivot tables for papers (`quantlab export-csv`, `quantlab table`).
#pragma once
#include <string>
#include <vector>

#include "experiments/run_record.h"

namespace ql {

/// Write the tables of every run as CSV files into `out_dir` (created if missing):
///   runs.csv        run_id, label, status, message, one column per params key starting with
///                   "quant." or "workload." (union over runs in first-appearance order; empty
///                   cell where a run lacks it), then one column per summary metric (its value)
///   params.csv      run_id, label, key, value (every params row)
///   numeric_env.csv run_id, label, key, value (the numeric environment of every run)
///   summary.csv     run_id, label, metric, value, ci_low, ci_high, delta_vs_fp
///   layers.csv      run_id, label, then every LayerRow field (same names)
///   slices.csv      run_id, label, metric, slice_key, slice_value, n (= n_units), n_tokens,
///                   value, ci_low, ci_high, ref_value, delta_vs_fp (= SliceRow::delta),
///                   delta_ci_low, delta_ci_high, flags (flags_to_string)
///   disparity.csv   run_id, label, then every DisparityRow field
///   diagnostics.csv run_id, label, then every DiagnosticRow field
/// RFC 4180 quoting, '\n' line ends, UTF-8. Doubles in the shortest form that round-trips
/// ("nan", "inf", "-inf" for non-finite values). Runs in append order. IoError on I/O failure.
void export_csv(const std::string& h5_path, const std::string& out_dir);
void export_csv(const std::vector<RunRecord>& runs, const std::string& out_dir);

/// A rows x columns table of one metric over `runs`, as text in `format` ("md": GitHub pipe
/// table; "latex": tabular with booktabs rules; "csv").
///
/// Keys (`rows_key`, `cols_key`): "label", "run_id", "status" or a params key such as
/// "quant.0.bits"; a comma-separated list forms a composite key whose value joins the parts
/// with '/' ("quant.0.algorithm,quant.0.granularity" -> "rtn/group"). A run lacking a params
/// key contributes "-" for it. An empty `cols_key` gives a single column named after the metric.
/// Row and column order: first appearance in run order.
///
/// Metric: a summary metric ("out_rel_err"); "METRIC@KEY=VALUE" for a slice row
/// ("out_rel_err@population=minority"); "worst:METRIC@KEY" / "gap:METRIC@KEY" for the disparity
/// summaries worst / gap_between on the levels of slice family KEY.
///
/// Cells: the value as %.4g; "-" when no run falls in the cell or the run lacks the metric;
/// a failed run's status ("failed") when only failed runs fall in it.
///
/// `over` (a params key such as "calib.draw" or "seed"; empty = none): runs of one cell that
/// differ in this key are repeated measurements of one setting, shown as
/// "mean ± sd (n)" (sample sd; core/metrics.h mean_sd) over the ok runs that have the metric.
/// Results that depend on the calibration draw or the rounding path are compared this way.
///
/// Throws ql::Error for: two ok runs in one cell (with `over`: two with the same `over` value),
/// naming both labels and suggesting a params key that separates them; an unknown metric
/// (listing the metrics available), an unknown key, a malformed metric, an unknown format, or
/// no runs.
std::string pivot_table(const std::vector<RunRecord>& runs, const std::string& rows_key,
                        const std::string& cols_key, const std::string& metric,
                        const std::string& format, const std::string& over = "");
/// The same over every run stored in the results file `h5_path` (IoError if it is missing or not
/// a results file).
std::string pivot_table(const std::string& h5_path, const std::string& rows_key,
                        const std::string& cols_key, const std::string& metric,
                        const std::string& format, const std::string& over = "");

}  // namespace ql
