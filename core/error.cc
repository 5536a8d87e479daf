#include "core/error.h"

namespace ql {

std::string SourceLoc::str() const {
  if (line <= 0) return file.empty() ? std::string("<unknown>") : file;
  return file + ":" + std::to_string(line) + ":" + std::to_string(column);
}

namespace {
std::string format(const SourceLoc& loc, const std::string& key, const std::string& what,
                   const std::string& run) {
  std::string m = loc.str() + ": ";
  if (!key.empty()) m += "key '" + key + "': ";
  m += what;
  if (!run.empty()) m += " (run '" + run + "')";
  return m;
}
}  // namespace

ConfigError::ConfigError(SourceLoc loc, std::string key_path, std::string what,
                         std::string run_label)
    : Error(format(loc, key_path, what, run_label)),
      loc_(std::move(loc)),
      key_path_(std::move(key_path)),
      detail_(std::move(what)),
      run_label_(std::move(run_label)) {}

ConfigError ConfigError::with_run(const std::string& run_label) const {
  return ConfigError(loc_, key_path_, detail_, run_label);
}

}  // namespace ql
