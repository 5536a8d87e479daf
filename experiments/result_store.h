// ResultStore: the HDF5 file of one experiment, holding one group per run (RunRecord).
//
// Layout (every string fixed-length UTF-8; tables are compound datasets, see core/h5.h):
//   /                      attrs format = "quantlab-results", format_version = 1
//   /runs/<run_id>/        attrs run_id, label, config_hash (= run_id), config_yaml,
//                          code_revision, status, message, started_at, seed (uint64),
//                          threads (int64), seconds_total, seconds_calib, seconds_quant,
//                          seconds_eval (double), order (int64: position in append order)
//   /runs/<run_id>/params       key, value
//   /runs/<run_id>/layers       LayerRow fields (ints as int64)
//   /runs/<run_id>/diagnostics  DiagnosticRow fields
//   /runs/<run_id>/summary      SummaryRow fields
//   /runs/<run_id>/slices       SliceRow fields (flags uint32) + flags_text (flags_to_string)
//   /runs/<run_id>/disparity    DisparityRow fields
//   /runs/<run_id>/units/       ids (strings), sums (float64 units x columns), columns
//                               (strings), attr_keys (strings, slice families in order),
//                               attrs/<key> (strings, one per unit); attr token_column
// Column names equal the struct member names. Empty tables are written with 0 rows.
//
// Atomicity: append() copies the current file to "<path>.tmp-<pid>" in the same directory,
// writes the run into the copy, closes and fsyncs it, then renames it over <path> (and fsyncs
// the directory). A crash at any point leaves either the old or the new complete file; on any
// exception the temp file is removed and <path> is untouched.
//
// Concurrency: one writer at a time per file (no locking between processes: two concurrent
// appenders would each rename their own copy and one run would be lost). Not thread-safe (HDF5
// is built without thread safety); readers must not run concurrently with a writer thread.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "experiments/run_record.h"

namespace ql {

class ResultStore {
 public:
  static constexpr const char* kFormat = "quantlab-results";
  static constexpr int64_t kFormatVersion = 1;

  /// A store at `path`. The file need not exist; if it does, it must be a quantlab results file
  /// (IoError naming the file otherwise, also for a newer format_version).
  explicit ResultStore(std::string path);

  const std::string& path() const { return path_; }
  /// True if the results file exists.
  bool exists() const;

  /// Store `run` (creating the file and its parent directories if needed), replacing a stored
  /// run with the same run_id (a re-run of a failed run), which keeps its original position in
  /// read_all(). Atomic as described above. Throws IoError on I/O failure, Error if run_id is
  /// empty or contains '/', ShapeError if run.units is inconsistent (sums rows/ids/attrs sizes).
  void append(const RunRecord& run);

  /// run_id -> status of every stored run; empty if the file does not exist.
  std::map<std::string, RunStatus> run_statuses() const;
  /// One stored run, every table included. IoError if the file or the run does not exist.
  RunRecord read_run(const std::string& run_id) const;
  /// Every stored run in append order (see `order`); empty if the file does not exist.
  std::vector<RunRecord> read_all() const;

 private:
  std::string path_;
};

}  // namespace ql
