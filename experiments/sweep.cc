#include "experiments/sweep.h"

#include <algorithm>
#include <filesystem>
#include <map>

#include "core/options.h"

namespace ql {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// Includes

namespace {


std::string join_range(const std::vector<std::string>& parts, std::size_t from, std::size_t to) {
  std::string s;
  for (std::size_t i = from; i < to; ++i) s += (i > from ? "." : "") + parts[i];
  return s;
}

std::string chain_text(const std::vector<std::string>& chain, const std::string& last) {
  std::string s;
  for (const auto& c : chain) s += c + " -> ";
  return s + last;
}

// `chain` holds the files being loaded (outermost first) by canonical path for the cycle test
// and by display path for the message.
ConfigNode load_with_includes(const std::string& file, std::vector<std::string>& canon_chain,
                              std::vector<std::string>& shown_chain) {
  ConfigNode node = ConfigNode::load_file(file);
  if (node.is_null()) return ConfigNode::map(node.loc());
  if (!node.is_map())
    throw ConfigError(node.loc(), "",
                      "expected a map of config sections at the top level, found '" +
                          node.to_flow() + "'");
  const ConfigNode* inc = node.find("include");
  if (!inc) return node;

  const SourceLoc inc_key_loc = node.key_loc("include");
  std::vector<std::string> names = read_string_list(*inc, "include");
  const fs::path dir = fs::path(file).parent_path();
  ConfigNode merged = ConfigNode::map(node.loc());
  for (std::size_t i = 0; i < names.size(); ++i) {
    const ConfigNode& item = inc->is_sequence() ? inc->at(i) : *inc;
    SourceLoc where = item.loc().line > 0 ? item.loc() : inc_key_loc;
    if (names[i].empty()) throw ConfigError(where, "include", "empty include path");
    fs::path p(names[i]);
    if (p.is_relative()) p = dir / p;
    const std::string shown = p.lexically_normal().string();
    std::error_code ec;
    if (!fs::is_regular_file(p, ec))
      throw ConfigError(where, "include", "included file '" + names[i] + "' not found (looked for '" +
                                              shown + "')");
    const std::string canon = fs::weakly_canonical(p, ec).string();
    if (std::find(canon_chain.begin(), canon_chain.end(), canon) != canon_chain.end())
      throw ConfigError(where, "include", "include cycle: " + chain_text(shown_chain, shown));
    canon_chain.push_back(canon);
    shown_chain.push_back(shown);
    ConfigNode sub = load_with_includes(shown, canon_chain, shown_chain);
    canon_chain.pop_back();
    shown_chain.pop_back();
    merged.merge_from(sub);
  }
  node.erase("include");
  merged.merge_from(node);
  return merged;
}

// Moves every location of a tree parsed from an override's value text to where that text sits
// in the override: line = override index, columns shifted past "key=".
ConfigNode relocate(const ConfigNode& n, int line, int column_shift) {
  auto fix = [&](SourceLoc loc) {
    if (loc.line == 1) {
      loc.line = line;
      loc.column += column_shift;
    } else if (loc.line > 1) {
      loc.line = line;  // multi-line override values: keep the override, lose the column
      loc.column = 0;
    }
    return loc;
  };
  ConfigNode out;
  switch (n.kind()) {
    case ConfigNode::Kind::Null:
    case ConfigNode::Kind::Scalar:
      out = n;
      break;
    case ConfigNode::Kind::Sequence:
      out = ConfigNode::sequence();
      for (const auto& item : n.items()) out.push_back(relocate(item, line, column_shift));
      break;
    case ConfigNode::Kind::Map:
      out = ConfigNode::map();
      for (const auto& [k, v] : n.entries())
        out.set(k, relocate(v, line, column_shift), fix(n.key_loc(k)));
      break;
  }
  out.set_loc(fix(n.loc()));
  return out;
}

// Mutable walk along already-existing components (find/at only); nullptr if absent.
ConfigNode* walk(ConfigNode& root, const std::vector<std::string>& parts, std::size_t n) {
  ConfigNode* cur = &root;
  for (std::size_t i = 0; i < n; ++i) {
    if (cur->is_map()) {
      cur = cur->find(parts[i]);
    } else if (cur->is_sequence()) {
      const std::string& p = parts[i];
      if (p.empty() || p.size() > 9 || !std::all_of(p.begin(), p.end(), [](char c) { return c >= '0' && c <= '9'; })) return nullptr;
      const std::size_t idx = std::stoul(p);
      if (idx >= cur->size()) return nullptr;
      cur = &cur->at(idx);
    } else {
      return nullptr;
    }
    if (!cur) return nullptr;
  }
  return cur;
}

}  // namespace

void apply_override(ConfigNode& root, const std::string& text, int index) {
  const std::size_t eq = text.find('=');
  if (eq == std::string::npos || eq == 0)
    throw ConfigError(SourceLoc{"<command line>", index, 1}, "",
                      "malformed override '" + text + "': expected key.path=value (e.g. quant.0.bits=3)");
  const std::string key = text.substr(0, eq);
  const int shift = static_cast<int>(eq) + 1;
  ConfigNode value;
  try {
    value = relocate(ConfigNode::parse(text.substr(eq + 1), "<command line>"), index, shift);
  } catch (const ConfigError& e) {
    SourceLoc loc = e.loc();
    loc.line = index;
    if (loc.column > 0) loc.column += shift;
    throw ConfigError(loc, key, e.detail());
  }
  const SourceLoc vloc = value.loc();

  // Grid and zip keys are dotted paths themselves: "sweep.grid.quant.0.bits" names the key
  // "quant.0.bits" of the map sweep.grid, not a nested map.
  const std::vector<std::string> parts = split_dotted(key);
  std::size_t split = 0;
  if (parts.size() >= 3 && parts[0] == "sweep" && (parts[1] == "grid" || parts[1] == "zip"))
    split = 2;
  else if (parts.size() >= 5 && parts[0] == "sweep" && parts[1] == "experiments" &&
           (parts[3] == "grid" || parts[3] == "zip"))
    split = 4;
  if (split == 0) {
    root.set_path(key, std::move(value));
    return;
  }
  const std::string container_path = join_range(parts, 0, split);
  ConfigNode* container = walk(root, parts, split);
  if (!container) {
    root.set_path(container_path, ConfigNode::map(vloc));
    container = walk(root, parts, split);
  }
  if (container->is_null()) *container = ConfigNode::map(vloc);
  if (!container->is_map())
    throw ConfigError(vloc, key, "'" + container_path + "' is not a map");
  container->set(join_range(parts, split, parts.size()), std::move(value), vloc);
}

ConfigNode load_config(const std::string& path, const std::vector<std::string>& overrides) {
  std::vector<std::string> canon_chain, shown_chain;
  std::error_code ec;
  canon_chain.push_back(fs::weakly_canonical(fs::path(path), ec).string());
  shown_chain.push_back(path);
  ConfigNode root = load_with_includes(path, canon_chain, shown_chain);
  for (std::size_t i = 0; i < overrides.size(); ++i)
    apply_override(root, overrides[i], static_cast<int>(i) + 1);
  return root;
}

// ---------------------------------------------------------------------------------------------
// Sweep expansion

namespace {

struct Axis {
  std::string path;   // dotted config path the values are written to
  SourceLoc key_loc;  // where the grid/zip key was written
  std::vector<ConfigNode> values;
};

struct AxisSet {
  std::vector<Axis> grid;
  std::vector<Axis> zip;  // all of one length
};

// Safety net against a typo such as a list of thousands of seeds in two grids.
constexpr std::size_t kMaxRuns = 1000000;

std::vector<Axis> read_axes(const ConfigNode* section, const std::string& section_path) {
  std::vector<Axis> axes;
  if (!section || section->is_null()) return axes;
  if (!section->is_map())
    throw ConfigError(section->loc(), section_path,
                      "expected a map from dotted config paths to lists of values, found '" +
                          section->to_flow() + "'");
  for (const auto& [k, v] : section->entries()) {
    const std::string kp = join_path(section_path, k);
    if (!v.is_sequence() || v.size() == 0)
      throw ConfigError(v.loc(), kp,
                        "expected a non-empty list of values to sweep, found '" + v.to_flow() + "'");
    axes.push_back({k, section->key_loc(k), v.items()});
  }
  return axes;
}

void check_zip_lengths(const std::vector<Axis>& zip, const std::string& where) {
  for (std::size_t i = 1; i < zip.size(); ++i)
    if (zip[i].values.size() != zip[0].values.size())
      throw ConfigError(zip[i].key_loc, where + zip[i].path,
                        "zip lists must have equal lengths: '" + zip[0].path + "' has " +
                            std::to_string(zip[0].values.size()) + " values, '" + zip[i].path +
                            "' has " + std::to_string(zip[i].values.size()));
}

std::string value_text(const ConfigNode& v) { return v.is_scalar() ? v.value() : v.to_flow(); }

std::string last_component(const std::string& path) {
  const std::size_t dot = path.rfind('.');
  return dot == std::string::npos ? path : path.substr(dot + 1);
}

std::string implicit_label(const ConfigNode& root) {
  const std::string& file = root.loc().file;
  if (file.empty() || file[0] == '<') return "run";
  const std::string stem = fs::path(file).stem().string();
  return stem.empty() ? "run" : stem;
}

struct Experiment {
  std::string label;
  ConfigNode overrides;  // a map merged onto the base config
  AxisSet axes;          // global axes followed by this experiment's own
};

// Appends the runs of one experiment, grid product outermost (first key slowest), zip innermost.
void expand_experiment(const ConfigNode& base, const Experiment& ex, std::vector<ExpandedRun>& out) {
  std::vector<const Axis*> axes;
  for (const auto& a : ex.axes.grid) axes.push_back(&a);
  for (const auto& a : ex.axes.zip) axes.push_back(&a);

  // Names in labels: the last path component unless two swept paths share it.
  std::vector<std::string> names;
  for (const Axis* a : axes) names.push_back(last_component(a->path));
  std::vector<std::string> shown(names.size());
  for (std::size_t i = 0; i < axes.size(); ++i) {
    const bool clash = std::count(names.begin(), names.end(), names[i]) > 1;
    shown[i] = clash ? axes[i]->path : names[i];
  }

  ConfigNode exp_base = base;
  exp_base.merge_from(ex.overrides);

  const std::size_t n_grid = ex.axes.grid.size();
  const std::size_t zip_len = ex.axes.zip.empty() ? 1 : ex.axes.zip[0].values.size();
  std::vector<std::size_t> odometer(n_grid, 0);
  for (;;) {
    for (std::size_t z = 0; z < zip_len; ++z) {
      // The value chosen on every axis for this run.
      std::vector<const ConfigNode*> chosen;
      for (std::size_t g = 0; g < n_grid; ++g)
        chosen.push_back(&ex.axes.grid[g].values[odometer[g]]);
      for (const auto& a : ex.axes.zip) chosen.push_back(&a.values[z]);

      ExpandedRun run;
      run.label = ex.label;
      run.experiment = ex.label;
      for (std::size_t i = 0; i < axes.size(); ++i) {
        const std::string text = value_text(*chosen[i]);
        run.label += " " + shown[i] + "=" + text;
        run.swept.emplace_back(axes[i]->path, text);
      }
      run.config = exp_base;
      for (std::size_t i = 0; i < axes.size(); ++i) {
        try {
          run.config.set_path(axes[i]->path, *chosen[i]);
        } catch (const ConfigError& e) {
          throw ConfigError(axes[i]->key_loc, axes[i]->path, e.detail(), run.label);
        }
      }
      out.push_back(std::move(run));
    }
    // Advance the odometer: the last grid key varies fastest.
    std::size_t g = n_grid;
    while (g > 0) {
      --g;
      if (++odometer[g] < ex.axes.grid[g].values.size()) break;
      odometer[g] = 0;
      if (g == 0) return;
    }
    if (n_grid == 0) return;
  }
}

// Adds an experiment's own axes after the global ones; a path swept twice is an error.
void add_axes(AxisSet& set, std::vector<Axis> axes, bool zip, const std::string& where) {
  for (auto& a : axes) {
    for (const auto* list : {&set.grid, &set.zip})
      for (const auto& b : *list)
        if (b.path == a.path)
          throw ConfigError(a.key_loc, where + a.path,
                            "'" + a.path + "' is already swept (at " + b.key_loc.str() + ")");
    (zip ? set.zip : set.grid).push_back(std::move(a));
  }
}

}  // namespace

std::vector<ExpandedRun> expand_sweep(const ConfigNode& root) {
  ConfigNode base = root;
  base.erase("sweep");
  const ConfigNode* sweep = root.find("sweep");

  std::vector<Experiment> experiments;
  AxisSet global;
  if (sweep && !sweep->is_null()) {
    if (!sweep->is_map())
      throw ConfigError(sweep->loc(), "sweep",
                        "expected a map with keys grid, zip, experiments, found '" +
                            sweep->to_flow() + "'");
    const std::vector<std::string> valid = {"grid", "zip", "experiments"};
    for (const auto& [k, v] : sweep->entries())
      if (std::find(valid.begin(), valid.end(), k) == valid.end())
        throw_unknown_key(*sweep, k, "sweep", valid);
    add_axes(global, read_axes(sweep->find("grid"), "sweep.grid"), false, "sweep.grid.");
    add_axes(global, read_axes(sweep->find("zip"), "sweep.zip"), true, "sweep.zip.");
    check_zip_lengths(global.zip, "sweep.zip.");

    if (const ConfigNode* list = sweep->find("experiments")) {
      if (!list->is_sequence() || list->size() == 0)
        throw ConfigError(list->loc(), "sweep.experiments",
                          "expected a non-empty list of experiments, found '" + list->to_flow() +
                              "'");
      std::map<std::string, SourceLoc> seen;
      for (std::size_t i = 0; i < list->size(); ++i) {
        const ConfigNode& entry = list->at(i);
        const std::string ep = "sweep.experiments." + std::to_string(i);
        if (!entry.is_map())
          throw ConfigError(entry.loc(), ep,
                            "expected a map with a 'label' and config keys, found '" +
                                entry.to_flow() + "'");
        const ConfigNode* label = entry.find("label");
        if (!label) throw ConfigError(entry.loc(), ep, "missing required key 'label'");
        Experiment ex;
        ex.label = read_string(*label, ep + ".label");
        if (ex.label.empty()) throw ConfigError(label->loc(), ep + ".label", "empty label");
        auto [it, fresh] = seen.emplace(ex.label, label->loc());
        if (!fresh)
          throw ConfigError(label->loc(), ep + ".label",
                            "duplicate experiment label '" + ex.label + "' (first at " +
                                it->second.str() + ")");
        ex.axes = global;
        add_axes(ex.axes, read_axes(entry.find("grid"), ep + ".grid"), false, ep + ".grid.");
        add_axes(ex.axes, read_axes(entry.find("zip"), ep + ".zip"), true, ep + ".zip.");
        check_zip_lengths(ex.axes.zip, ep + ".zip.");
        ex.overrides = ConfigNode::map(entry.loc());
        for (const auto& [k, v] : entry.entries()) {
          if (k == "label" || k == "grid" || k == "zip") continue;
          if (k == "sweep")
            throw ConfigError(entry.key_loc(k), ep + ".sweep",
                              "an experiment cannot hold a nested 'sweep'; use its own grid/zip");
          ex.overrides.set(k, v, entry.key_loc(k));
        }
        experiments.push_back(std::move(ex));
      }
    }
  }
  if (experiments.empty()) {
    Experiment ex;
    ex.label = implicit_label(root);
    ex.overrides = ConfigNode::map();
    ex.axes = global;
    experiments.push_back(std::move(ex));
  }

  std::size_t total = 0;
  for (const auto& ex : experiments) {
    std::size_t n = ex.axes.zip.empty() ? 1 : ex.axes.zip[0].values.size();
    for (const auto& a : ex.axes.grid) {
      n *= a.values.size();
      if (n > kMaxRuns) break;
    }
    total += n;
    if (total > kMaxRuns)
      throw ConfigError(sweep ? sweep->loc() : root.loc(), "sweep",
                        "the sweep expands to more than " + std::to_string(kMaxRuns) + " runs");
  }

  std::vector<ExpandedRun> runs;
  runs.reserve(total);
  for (const auto& ex : experiments) expand_experiment(base, ex, runs);

  std::map<std::string, int> count;
  for (auto& r : runs) {
    const int k = ++count[r.label];
    if (k > 1) r.label += " #" + std::to_string(k);
  }
  return runs;
}

}  // namespace ql
