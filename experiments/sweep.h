// From a config file to the list of runs it describes: includes, command-line overrides and
// sweep expansion. Everything here works on ConfigNode trees, so every value keeps the
// file:line:column it was written at and later (typed) errors still point at the user's text.
//
// Config file keys handled here (the typed parser never sees them):
//   include: base.yaml | [a.yaml, b.yaml]   paths relative to the including file's directory;
//                                           merged in order, the including file's keys on top
//   sweep:
//     grid: {quant.0.bits: [2, 3, 4], ...}  cartesian product, first key varies slowest
//     zip:  {a.b: [1, 2], c.d: [x, y]}      lists of equal length, paired: one axis
//     experiments:                          one named block of runs each; keys other than
//       - label: gptq                       label/grid/zip are merged onto the base config,
//         quant: [...]                      grid/zip add axes for this experiment only
//         grid: {calib.n_samples: [64, 128]}
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "core/config_node.h"

namespace ql {

/// Load `path`, resolve `include:` (nested includes allowed; a cycle is a ConfigError naming the
/// chain; a missing include is a ConfigError at the include line), then apply `overrides` in
/// order (see apply_override). Returns the whole tree, `sweep:` included, without `include:`.
/// Throws IoError if `path` itself cannot be read, ConfigError for everything else.
ConfigNode load_config(const std::string& path, const std::vector<std::string>& overrides = {});

/// Apply one "dotted.path=value" override, the value parsed as YAML ("a.b=[1, 2]" sets a list).
/// Numeric components index existing list elements; missing map keys are created. Inside
/// `sweep.grid`, `sweep.zip`, `sweep.experiments.N.grid` and `sweep.experiments.N.zip` the rest
/// of the path is one dotted key ("sweep.grid.quant.0.bits=[2,3]"). Values are located at
/// "<command line>:<index>:<column>", index being the 1-based position of the override among
/// all overrides and column the 1-based position within the override text.
/// Throws ConfigError for a text without '=', an empty key, a YAML error in the value, or a
/// path that does not exist (list index out of range, descending into a scalar).
void apply_override(ConfigNode& root, const std::string& text, int index = 1);

/// One concrete run of a sweep.
struct ExpandedRun {
  /// Experiment label, then " name=value" per swept key (name = last path component, or the
  /// full dotted path when two swept keys share one); " #2", " #3", ... make repeats unique.
  std::string label;
  /// The experiment's own label (the implicit experiment's label without `experiments:`).
  std::string experiment;
  /// The resolved config tree of this run: base (root without `sweep`), the experiment's keys
  /// merged on top, then every swept value set at its path. Never contains `sweep`.
  ConfigNode config;
  /// (full dotted path, value as text: the scalar or its flow form) per swept key, in axis
  /// order: global grid keys, experiment grid keys, then zip keys.
  std::vector<std::pair<std::string, std::string>> swept;
};

/// Expand the `sweep:` section of a loaded config into runs. Without `experiments`, there is one
/// implicit experiment labelled with the stem of root.loc().file ("run" if unknown). For each
/// experiment, runs are the grid product (first key slowest) times the zip rows (fastest), so
/// the count is the sum over experiments of prod(grid sizes) * (zip length or 1).
/// Throws ConfigError for: unknown keys directly under `sweep`, a grid/zip value that is not a
/// non-empty list, zip lists of different lengths (naming both keys and lengths), an experiment
/// without a unique `label`, a key swept both globally and by an experiment, and a swept path
/// that does not exist in a run's config (located at the grid/zip key, naming the run).
/// Deterministic; no I/O.
std::vector<ExpandedRun> expand_sweep(const ConfigNode& root);

}  // namespace ql
