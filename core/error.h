// Error hierarchy for everything a user can cause (config, shapes, I/O, numerics).
// Internal invariants use assert; these exceptions carry a message meant for a person and are
// printed as one line by the CLI, which then exits non-zero.
// No exception may cross an OpenMP region: use ql::ParallelErrors (core/parallel.h).
#pragma once
#include <stdexcept>
#include <string>

namespace ql {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A position in a config source: file plus 1-based line and column (0 = unknown).
struct SourceLoc {
  std::string file;
  int line = 0;
  int column = 0;
  std::string str() const;  // "file:line:column", or "file" when line is unknown
};

/// A config value that is missing, malformed or out of range. The message reads
/// "file:line:col: key 'quant.0.bits': expected an integer in [2, 8] or 16, found '9' (run 'rtn bits=9')".
class ConfigError : public Error {
 public:
  ConfigError(SourceLoc loc, std::string key_path, std::string what, std::string run_label = "");
  const SourceLoc& loc() const { return loc_; }
  const std::string& key_path() const { return key_path_; }
  const std::string& detail() const { return detail_; }
  const std::string& run_label() const { return run_label_; }
  /// The same error attributed to an expanded run of a sweep.
  ConfigError with_run(const std::string& run_label) const;

 private:
  SourceLoc loc_;
  std::string key_path_, detail_, run_label_;
};

class ShapeError : public Error { public: using Error::Error; };
class IoError : public Error { public: using Error::Error; };
class NumericError : public Error { public: using Error::Error; };

}  // namespace ql
