#include "experiments/config.h"

#include <algorithm>
#include <filesystem>
#include <limits>
#include <regex>
#include <set>

#include "core/options.h"
#include "experiments/hash.h"
#include "experiments/pipeline.h"

namespace ql {
namespace {

const std::vector<std::string> kTopKeys = {"seed", "numerics", "calib", "eval", "slices",
                                           "quant", "output", "workload"};

ConfigNode string_list_node(const std::vector<std::string>& v) {
  ConfigNode s = ConfigNode::sequence();
  for (auto& x : v) s.push_back(ConfigNode::scalar(x));
  return s;
}

/// A path as written in a config, resolved against the directory of the file that wrote it
/// (command-line overrides resolve against the working directory).
std::string resolve_path(const ConfigNode& n, const std::string& path) {
  namespace fs = std::filesystem;
  const std::string& file = n.loc().file;
  fs::path p(path);
  if (p.is_absolute() || file.empty() || file[0] == '<') return fs::absolute(p).lexically_normal().string();
  return (fs::absolute(fs::path(file)).parent_path() / p).lexically_normal().string();
}

const OptionSchema<CalibConfig>& synthetic_calib_schema() {
  static const OptionSchema<CalibConfig> s = [] {
    OptionSchema<CalibConfig> o;
    o.add("tokens", &CalibConfig::tokens, "calibration tokens per layer", {1, 1 << 24});
    o.add_custom(
        "populations", "list of names",
        "populations calibration data are drawn from (default: all, split by share)",
        [](CalibConfig& c, const ConfigNode& n, const std::string& p) {
          c.populations = read_string_list(n, p);
        },
        [](const CalibConfig& c) { return string_list_node(c.populations); });
    return o;
  }();
  return s;
}

CalibSource parse_calib_source(const ConfigNode& n, const std::string& path);

const OptionSchema<CalibConfig>& model_calib_schema() {
  static const OptionSchema<CalibConfig> s = [] {
    OptionSchema<CalibConfig> o;
    o.add_custom(
        "text", "path", "calibration text file, tokenized with the stream protocol (required)",
        [](CalibConfig& c, const ConfigNode& n, const std::string& p) {
          c.text = resolve_path(n, read_string(n, p));
        },
        [](const CalibConfig& c) { return ConfigNode::scalar(c.text); });
    o.add_custom(
        "ids", "path", "pre-tokenized calibration data instead of text: one document per line of token ids",
        [](CalibConfig& c, const ConfigNode& n, const std::string& p) {
          c.ids = resolve_path(n, read_string(n, p));
        },
        [](const CalibConfig& c) { return ConfigNode::scalar(c.ids); });
    o.add_custom(
        "sources", "list of {name, text | ids, share}",
        "a calibration mixture instead of text / ids: windows from each source in proportion to its share "
        "(e.g. 0.9 wikitext2 + 0.1 austen), each tagged with its source",
        [](CalibConfig& c, const ConfigNode& n, const std::string& p) {
          if (!n.is_sequence() || n.size() == 0) throw ConfigError(n.loc(), p, "expected a list of {name, text, share}");
          for (std::size_t i = 0; i < n.size(); ++i) c.sources.push_back(parse_calib_source(n.at(i), join_path(p, std::to_string(i))));
        },
        [](const CalibConfig& c) {
          ConfigNode l = ConfigNode::sequence();
          for (const CalibSource& s : c.sources) {
            ConfigNode m = ConfigNode::map();
            m.set("name", ConfigNode::scalar(s.name));
            m.set(s.ids.empty() ? "text" : "ids", ConfigNode::scalar(s.ids.empty() ? s.text : s.ids));
            m.set("share", ConfigNode::scalar(format_double(s.share)));
            l.push_back(m);
          }
          return l;
        });
    o.add("n_samples", &CalibConfig::n_samples, "calibration windows", {1, 1 << 20});
    o.add("seq_len", &CalibConfig::seq_len, "tokens per calibration window", {2, 1 << 20});
    o.add("seed", &CalibConfig::seed, "seed of the random window rule", {0, 9.2e18});
    o.add_custom(
        "rule", "random|strided",
        "random: offsets drawn from the seed; strided: window i starts at i*((len-seq_len)//n_samples), the GPTQ reference's rule",
        [](CalibConfig& c, const ConfigNode& n, const std::string& p) {
          c.rule = read_choice(n, p, {"random", "strided"}) == "strided" ? CalibRule::Strided : CalibRule::Random;
        },
        [](const CalibConfig& c) { return ConfigNode::scalar(c.rule == CalibRule::Strided ? "strided" : "random"); });
    o.add("draw", &CalibConfig::draw,
          "which calibration draw (set of windows) to use, in [0, draws): strided windows shifted "
          "by draw*(stride//draws), or an independent random set; sweep it to compare results "
          "over calibration draws",
          {0, 1 << 20});
    o.add("draws", &CalibConfig::draws,
          "number of calibration draws the strided offsets are spaced for (draw 0 of any count is "
          "the plain rule)",
          {1, 1 << 20});
    o.add_custom(
        "propagate", "quantized|fp",
        "inputs of block b+1 during calibration: outputs of the quantized blocks (GPTQ) or of the FP blocks",
        [](CalibConfig& c, const ConfigNode& n, const std::string& p) {
          c.propagate = read_choice(n, p, {"quantized", "fp"}) == "fp" ? Propagate::Fp : Propagate::Quantized;
        },
        [](const CalibConfig& c) { return ConfigNode::scalar(c.propagate == Propagate::Fp ? "fp" : "quantized"); });
    o.add("true_sequential", &CalibConfig::true_sequential,
          "quantize q/k/v, o, gate/up, down in turn, re-collecting statistics after each stage");
    o.validator([](const CalibConfig& c, const ConfigNode& map, const std::string& path) {
      if (c.draw >= c.draws)
        throw ConfigError(map.find("draw") ? map.find("draw")->loc() : map.loc(),
                          join_path(path, "draw"),
                          "expected a draw in [0, draws) = [0, " + std::to_string(c.draws) +
                              "), found " + std::to_string(c.draw));
      if (static_cast<int>(!c.text.empty()) + static_cast<int>(!c.ids.empty()) + static_cast<int>(!c.sources.empty()) != 1)
        throw ConfigError(map.loc(), join_path(path, "text"),
                          "expected exactly one of 'text' (a text file), 'ids' (a token-id file) or 'sources' (a "
                          "mixture)");
      if (!c.sources.empty() && static_cast<std::size_t>(c.n_samples) < c.sources.size())
        throw ConfigError(map.find("n_samples") ? map.find("n_samples")->loc() : map.loc(), join_path(path, "n_samples"),
                          "expected at least one window per source (" + std::to_string(c.sources.size()) +
                              " sources), found " + std::to_string(c.n_samples));
    });
    return o;
  }();
  return s;
}

const OptionSchema<EvalConfig>& synthetic_eval_schema() {
  static const OptionSchema<EvalConfig> s = [] {
    OptionSchema<EvalConfig> o;
    o.add("units", &EvalConfig::units,
          "evaluation units (document-like token groups; the bootstrap resamples units)",
          {2, 1 << 20});
    o.add("unit_tokens", &EvalConfig::unit_tokens, "tokens per evaluation unit", {1, 1 << 20});
    return o;
  }();
  return s;
}

CalibSource parse_calib_source(const ConfigNode& n, const std::string& path) {
  if (!n.is_map())
    throw ConfigError(n.loc(), path, "expected a map {name, text | ids, share}, found '" + n.to_flow() + "'");
  CalibSource s;
  for (auto& [k, v] : n.entries()) {
    const std::string kp = join_path(path, k);
    if (k == "name") s.name = read_string(v, kp);
    else if (k == "text") s.text = resolve_path(v, read_string(v, kp));
    else if (k == "ids") s.ids = resolve_path(v, read_string(v, kp));
    else if (k == "share") s.share = read_double(v, kp, 0.0, std::numeric_limits<double>::max());
    else throw_unknown_key(n, k, path, {"name", "text", "ids", "share"});
  }
  if (s.name.empty() || s.text.empty() == s.ids.empty())
    throw ConfigError(n.loc(), path, "expected 'name' and exactly one of 'text' or 'ids'");
  if (!(s.share > 0))
    throw ConfigError(n.find("share") ? n.find("share")->loc() : n.loc(), join_path(path, "share"),
                      "expected a positive share of the windows, found " + format_double(s.share));
  return s;
}

EvalSet parse_eval_set(const ConfigNode& n, const std::string& path, EvalSetKind kind) {
  if (!n.is_map())
    throw ConfigError(n.loc(), path, "expected a map {name, path, max_windows}, found '" + n.to_flow() + "'");
  EvalSet e;
  e.kind = kind;
  for (auto& [k, v] : n.entries()) {
    const std::string kp = join_path(path, k);
    if (k == "name") e.name = read_string(v, kp);
    else if (k == "path") e.path = resolve_path(v, read_string(v, kp));
    else if (k == "max_windows") e.max_windows = read_int(v, kp, 0, 1LL << 40);
    else throw_unknown_key(n, k, path, {"name", "path", "max_windows"});
  }
  if (e.name.empty() || e.path.empty())
    throw ConfigError(n.loc(), path, "expected both 'name' and 'path'");
  return e;
}

ConfigNode emit_eval_set(const EvalSet& e) {
  ConfigNode m = ConfigNode::map();
  m.set("name", ConfigNode::scalar(e.name));
  m.set("path", ConfigNode::scalar(e.path));
  m.set("max_windows", ConfigNode::scalar(std::to_string(e.max_windows)));
  return m;
}

const OptionSchema<EvalConfig>& model_eval_schema() {
  static const OptionSchema<EvalConfig> s = [] {
    OptionSchema<EvalConfig> o;
    o.add_custom(
        "streams", "list of {name, path, max_windows}",
        "texts scored as one stream each: BOS + documents joined by a blank line, non-overlapping windows",
        [](EvalConfig& c, const ConfigNode& n, const std::string& p) {
          if (!n.is_sequence()) throw ConfigError(n.loc(), p, "expected a list of {name, path}");
          for (std::size_t i = 0; i < n.size(); ++i)
            c.sets.push_back(parse_eval_set(n.at(i), join_path(p, std::to_string(i)), EvalSetKind::Stream));
        },
        [](const EvalConfig& c) {
          ConfigNode l = ConfigNode::sequence();
          for (auto& e : c.sets)
            if (e.kind == EvalSetKind::Stream) l.push_back(emit_eval_set(e));
          return l;
        });
    o.add_custom(
        "slices", "list of {name, path, max_windows}",
        "JSONL files of documents {text, slice: {key: value}}; every slice attribute becomes a slice family",
        [](EvalConfig& c, const ConfigNode& n, const std::string& p) {
          if (!n.is_sequence()) throw ConfigError(n.loc(), p, "expected a list of {name, path}");
          for (std::size_t i = 0; i < n.size(); ++i)
            c.sets.push_back(parse_eval_set(n.at(i), join_path(p, std::to_string(i)), EvalSetKind::Jsonl));
        },
        [](const EvalConfig& c) {
          ConfigNode l = ConfigNode::sequence();
          for (auto& e : c.sets)
            if (e.kind == EvalSetKind::Jsonl) l.push_back(emit_eval_set(e));
          return l;
        });
    o.add_custom(
        "token_ids", "list of {name, path, max_windows}",
        "pre-tokenized documents: one document per line of whitespace-separated token ids (BOS included if wanted)",
        [](EvalConfig& c, const ConfigNode& n, const std::string& p) {
          if (!n.is_sequence()) throw ConfigError(n.loc(), p, "expected a list of {name, path}");
          for (std::size_t i = 0; i < n.size(); ++i)
            c.sets.push_back(parse_eval_set(n.at(i), join_path(p, std::to_string(i)), EvalSetKind::Ids));
        },
        [](const EvalConfig& c) {
          ConfigNode l = ConfigNode::sequence();
          for (auto& e : c.sets)
            if (e.kind == EvalSetKind::Ids) l.push_back(emit_eval_set(e));
          return l;
        });
    o.add("seq_len", &EvalConfig::seq_len, "evaluation window length", {2, 1 << 20});
    o.add("kl", &EvalConfig::kl,
          "evaluate the FP model beside the quantized one (KL, top-1 agreement, paired deltas); false: quantized model only");
    o.add_custom(
        "freq_corpus", "path", "text whose token counts rank the frequency buckets (default: calib.text)",
        [](EvalConfig& c, const ConfigNode& n, const std::string& p) {
          c.freq_corpus = resolve_path(n, read_string(n, p));
        },
        [](const EvalConfig& c) { return ConfigNode::scalar(c.freq_corpus); });
    o.add_custom(
        "rank_edges", "list of int", "frequency-rank band edges of the token_freq slices",
        [](EvalConfig& c, const ConfigNode& n, const std::string& p) {
          if (!n.is_sequence()) throw ConfigError(n.loc(), p, "expected a list of increasing ranks");
          c.rank_edges.clear();
          for (std::size_t i = 0; i < n.size(); ++i) {
            long long v = read_int(n.at(i), join_path(p, std::to_string(i)), 1, 1LL << 40);
            if (!c.rank_edges.empty() && v <= c.rank_edges.back())
              throw ConfigError(n.at(i).loc(), join_path(p, std::to_string(i)), "expected increasing ranks");
            c.rank_edges.push_back(v);
          }
        },
        [](const EvalConfig& c) {
          ConfigNode l = ConfigNode::sequence();
          for (auto v : c.rank_edges) l.push_back(ConfigNode::scalar(std::to_string(v)));
          return l;
        });
    o.validator([](const EvalConfig& c, const ConfigNode& map, const std::string& path) {
      if (c.sets.empty())
        throw ConfigError(map.loc(), path, "expected at least one of 'streams', 'slices' or 'token_ids'");
      std::set<std::string> names;
      for (auto& e : c.sets)
        if (!names.insert(e.name).second)
          throw ConfigError(map.loc(), path, "evaluation set name '" + e.name + "' is used twice");
    });
    return o;
  }();
  return s;
}

const OptionSchema<ModelWorkload>& model_workload_schema() {
  static const OptionSchema<ModelWorkload> s = [] {
    OptionSchema<ModelWorkload> o;
    o.add_custom(
        "path", "path", "checkpoint directory: config.json, model.safetensors (or sharded + index), tokenizer.model",
        [](ModelWorkload& m, const ConfigNode& n, const std::string& p) {
          m.path = resolve_path(n, read_string(n, p));
        },
        [](const ModelWorkload& m) { return ConfigNode::scalar(m.path); });
    o.add("architecture", &ModelWorkload::architecture,
          "if set, the checkpoint's architecture must equal it (e.g. LlamaForCausalLM)");
    o.validator([](const ModelWorkload& m, const ConfigNode& map, const std::string& path) {
      if (m.path.empty()) throw ConfigError(map.loc(), join_path(path, "path"), "expected a checkpoint directory");
    });
    return o;
  }();
  return s;
}

const OptionSchema<BootstrapOptions>& slices_schema() {
  static const OptionSchema<BootstrapOptions> s = [] {
    OptionSchema<BootstrapOptions> o;
    o.add("n_boot", &BootstrapOptions::n_boot, "bootstrap replicates (0: no intervals)",
          {0, 1e6});
    o.add_custom(
        "seed", "int", "seed of the bootstrap replicate index sets",
        [](BootstrapOptions& b, const ConfigNode& n, const std::string& p) {
          b.seed = static_cast<uint64_t>(read_int(n, p, 0, std::numeric_limits<long long>::max()));
        },
        [](const BootstrapOptions& b) { return ConfigNode::scalar(std::to_string(b.seed)); });
    o.add("ci_level", &BootstrapOptions::ci_level, "confidence level of percentile intervals",
          {1e-6, 1 - 1e-9});
    o.add("stratify", &BootstrapOptions::stratify,
          "resample units within each slice cell (keeps design sizes); false = i.i.d.");
    o.add("min_units", &BootstrapOptions::min_units, "flag slices with fewer units",
          {0, 1e12});
    o.add("min_tokens", &BootstrapOptions::min_tokens, "flag slices with fewer tokens",
          {0, 1e15});
    return o;
  }();
  return s;
}

const OptionSchema<OutputConfig>& output_schema() {
  static const OptionSchema<OutputConfig> s = [] {
    OptionSchema<OutputConfig> o;
    o.add("path", &OutputConfig::path, "HDF5 results file (default results/<config>.h5)");
    o.add_custom(
        "table", "map",
        "table printed after the run: {rows, cols, metrics, format, over} (over: a params key such "
        "as calib.draw whose runs are aggregated as mean ± sd (n))",
        [](OutputConfig& c, const ConfigNode& n, const std::string& p) {
          if (!n.is_map())
            throw ConfigError(n.loc(), p, "expected a map {rows, cols, metrics, format}, found '" +
                                              n.to_flow() + "'");
          const std::vector<std::string> keys = {"rows", "cols", "metrics", "format", "over"};
          for (auto& [k, v] : n.entries()) {
            std::string kp = join_path(p, k);
            if (k == "rows") c.table_rows = read_string(v, kp);
            else if (k == "cols") c.table_cols = read_string(v, kp);
            else if (k == "metrics") c.table_metrics = read_string_list(v, kp);
            else if (k == "format") c.table_format = read_choice(v, kp, {"md", "latex", "csv"});
            else if (k == "over") c.table_over = read_string(v, kp);
            else throw_unknown_key(n, k, p, keys);
          }
          if (c.table_cols.empty() || c.table_metrics.empty())
            throw ConfigError(n.loc(), p, "expected both 'cols' and 'metrics'");
        },
        [](const OutputConfig& c) {
          ConfigNode m = ConfigNode::map();
          m.set("rows", ConfigNode::scalar(c.table_rows));
          m.set("cols", ConfigNode::scalar(c.table_cols));
          m.set("metrics", string_list_node(c.table_metrics));
          m.set("format", ConfigNode::scalar(c.table_format));
          if (!c.table_over.empty()) m.set("over", ConfigNode::scalar(c.table_over));
          return m;
        });
    return o;
  }();
  return s;
}

void check_regexes(const std::vector<std::string>& res, const ConfigNode& node,
                   const std::string& path) {
  for (std::size_t i = 0; i < res.size(); ++i) {
    try {
      std::regex re(res[i]);
    } catch (const std::regex_error& e) {
      const ConfigNode& at = node.is_sequence() && i < node.size() ? node.at(i) : node;
      throw ConfigError(at.loc(), path, "expected a regular expression, found '" + res[i] +
                                            "' (" + e.what() + ")");
    }
  }
}

QuantStep parse_step(const ConfigNode& n, const std::string& path,
                     const AlgorithmRegistry& registry) {
  if (!n.is_map())
    throw ConfigError(n.loc(), path,
                      "expected a map such as {algorithm: rtn, bits: 4}, found '" + n.to_flow() + "'");
  QuantStep step;
  step.loc = n.loc();
  const ConfigNode* alg = n.find("algorithm");
  if (!alg) throw ConfigError(n.loc(), path, "expected an 'algorithm' key (one of the registered algorithms)");
  step.algorithm = read_choice(*alg, join_path(path, "algorithm"), registry.names());
  const AlgorithmInfo& info = registry.get(step.algorithm);

  ConfigNode weight_map = ConfigNode::map(n.loc());
  ConfigNode option_map = ConfigNode::map(n.loc());
  const auto& wschema = quant_spec_schema();
  for (auto& [key, value] : n.entries()) {
    const std::string kp = join_path(path, key);
    if (key == "algorithm") continue;
    if (wschema.has(key)) {
      if (!info.uses_weight_spec)
        throw ConfigError(n.key_loc(key), kp,
                          "algorithm '" + step.algorithm + "' has no weight grid; remove this key");
      weight_map.set(key, value, n.key_loc(key));
    } else if (key == "act") {
      step.act = act_quant_spec_schema().parse(value, kp);
    } else if (key == "targets") {
      step.targets = read_string_list(value, kp);
      check_regexes(step.targets, value, kp);
    } else if (key == "ignore") {
      step.ignore = read_string_list(value, kp);
      check_regexes(step.ignore, value, kp);
    } else if (info.options && info.options->has(key)) {
      option_map.set(key, value, n.key_loc(key));
    } else {
      std::vector<std::string> valid = {"algorithm", "act", "targets", "ignore"};
      if (info.uses_weight_spec)
        for (auto& k : wschema.keys()) valid.push_back(k);
      if (info.options)
        for (auto& k : info.options->keys()) valid.push_back(k);
      throw_unknown_key(n, key, path, valid);
    }
  }
  if (info.uses_weight_spec) {
    // No silent default grid: a step of a quantizing algorithm states its bits.
    if (!n.find("bits"))
      throw ConfigError(n.loc(), join_path(path, "bits"),
                        "expected 'bits' (2..8, or 16 to keep the weights in float) for algorithm '" +
                            step.algorithm + "'");
    step.weight = wschema.parse(weight_map, path);
  } else {
    step.weight = QuantSpec{};
    step.weight.bits = 16;
  }
  if (info.options) {
    step.options = info.options->defaults();
    for (auto& [key, value] : option_map.entries())
      info.options->parse_key(step.options, key, value, join_path(path, key));
    info.options->validate(step.options, option_map, path);
  }
  return step;
}

ConfigNode emit_step(const QuantStep& s, const AlgorithmRegistry& registry) {
  const AlgorithmInfo& info = registry.get(s.algorithm);
  ConfigNode m = ConfigNode::map();
  m.set("algorithm", ConfigNode::scalar(s.algorithm));
  if (info.uses_weight_spec) {
    const ConfigNode grid = quant_spec_schema().emit(s.weight);
    for (auto& [k, v] : grid.entries()) m.set(k, v);
  }
  m.set("act", act_quant_spec_schema().emit(s.act));
  m.set("targets", string_list_node(s.targets));
  m.set("ignore", string_list_node(s.ignore));
  if (info.options) info.options->emit(s.options, m);
  return m;
}


/// Parse the synthetic workload with the data sizes of calib:/eval: already in place, and
/// report the validator's findings about those sizes at the calib:/eval: keys the user wrote.
void parse_synthetic(RunConfig& rc, const ConfigNode& workload_map, const ConfigNode& root) {
  SyntheticSpec& spec = rc.workload.synthetic;
  spec.calib_tokens = static_cast<int>(rc.calib.tokens);
  spec.calib_populations = rc.calib.populations;
  spec.eval_units = static_cast<int>(rc.eval.units);
  spec.unit_tokens = static_cast<int>(rc.eval.unit_tokens);
  try {
    synthetic_spec_schema().parse_into(spec, workload_map, "workload");
  } catch (const ConfigError& e) {
    static const std::vector<std::pair<std::string, std::string>> moved = {
        {"workload.calib_tokens", "calib.tokens"},
        {"workload.calib_populations", "calib.populations"},
        {"workload.eval_units", "eval.units"},
        {"workload.unit_tokens", "eval.unit_tokens"}};
    for (auto& [from, to] : moved) {
      if (e.key_path().rfind(from, 0) != 0) continue;
      std::string path = to + e.key_path().substr(from.size());
      const std::string section = to.substr(0, to.find('.'));
      const ConfigNode* sec = root.find(section);
      const ConfigNode* at = sec ? sec->get_path(path.substr(section.size() + 1)) : nullptr;
      SourceLoc loc = at ? at->loc() : sec ? sec->loc() : root.loc();
      throw ConfigError(loc, path, e.detail());
    }
    throw;
  }
}
}  // namespace

RunConfig parse_run_config(const ConfigNode& root, const std::string& label,
                           const std::string& config_path, const AlgorithmRegistry& registry) {
  RunConfig rc;
  rc.label = label;
  try {
    if (!root.is_map())
      throw ConfigError(root.loc(), "", "expected a map of sections (seed, workload, quant, ...)");
    // The workload kind decides which calib:/eval: keys exist.
    if (const ConfigNode* w = root.find("workload"); w && w->is_map())
      if (const ConfigNode* kind = w->find("kind"))
        rc.workload.kind =
            read_choice(*kind, "workload.kind", {"synthetic", "model"}) == "model" ? WorkloadKind::Model : WorkloadKind::Synthetic;
    const bool model = rc.workload.is_model();
    // calib: and eval: first: they size the workload's data, which its validator checks.
    if (const ConfigNode* n = root.find("calib"))
      rc.calib = (model ? model_calib_schema() : synthetic_calib_schema()).parse(*n, "calib");
    else if (model)
      throw ConfigError(root.loc(), "calib", "expected a 'calib' section with the calibration text");
    if (const ConfigNode* n = root.find("eval"))
      rc.eval = (model ? model_eval_schema() : synthetic_eval_schema()).parse(*n, "eval");
    else if (model)
      throw ConfigError(root.loc(), "eval", "expected an 'eval' section with streams and/or slices");
    if (model && rc.eval.freq_corpus.empty()) {
      const CalibConfig& c = rc.calib;
      rc.eval.freq_corpus = !c.text.empty() ? c.text
                            : !c.ids.empty() ? c.ids
                            : c.sources.front().ids.empty() ? c.sources.front().text
                                                            : c.sources.front().ids;
      rc.eval.freq_corpus_is_ids = !c.ids.empty() || (c.text.empty() && c.ids.empty() && !c.sources.front().ids.empty());
    }
    for (auto& [key, value] : root.entries()) {
      if (key == "seed") {
        rc.seed = static_cast<uint64_t>(read_int(value, key, 0, std::numeric_limits<long long>::max()));
      } else if (key == "numerics") {
        rc.numerics = parse_numerics(read_choice(value, key, {"fast", "portable"}));
      } else if (key == "workload") {
        if (!value.is_map())
          throw ConfigError(value.loc(), key, "expected a map with 'kind: synthetic' and its options");
        ConfigNode rest = value;
        rest.erase("kind");
        if (model)
          rc.workload.model = model_workload_schema().parse(rest, "workload");
        else
          parse_synthetic(rc, rest, root);
      } else if (key == "calib" || key == "eval") {
        // parsed above
      } else if (key == "slices") {
        rc.slices = slices_schema().parse(value, key);
      } else if (key == "output") {
        rc.output = output_schema().parse(value, key);
      } else if (key == "quant") {
        if (!value.is_sequence() || value.size() == 0)
          throw ConfigError(value.loc(), key,
                            "expected a non-empty list of steps such as [{algorithm: rtn, bits: 4}], found '" +
                                value.to_flow() + "'");
        for (std::size_t i = 0; i < value.size(); ++i)
          rc.quant.push_back(parse_step(value.at(i), "quant." + std::to_string(i), registry));
      } else {
        throw_unknown_key(root, key, "", kTopKeys);
      }
    }
    if (!root.find("workload")) parse_synthetic(rc, ConfigNode::map(root.loc()), root);
    if (model && rc.workload.model.path.empty())
      throw ConfigError(root.loc(), "workload.path", "expected a checkpoint directory");
    if (rc.quant.empty())
      throw ConfigError(root.loc(), "quant", "expected a 'quant' list (use [{algorithm: fp}] for the FP reference)");
    validate_pipeline(rc, registry);
  } catch (const ConfigError& e) {
    throw e.with_run(label);
  }

  if (rc.output.path.empty())
    rc.output.path =
        "results/" + std::filesystem::path(config_path).stem().string() + ".h5";

  ConfigNode c = ConfigNode::map();
  c.set("seed", ConfigNode::scalar(std::to_string(rc.seed)));
  c.set("numerics", ConfigNode::scalar(numerics_name(rc.numerics)));
  ConfigNode w = ConfigNode::map();
  w.set("kind", ConfigNode::scalar(workload_kind_name(rc.workload.kind)));
  const ConfigNode spec_node = rc.workload.is_model()
                                   ? model_workload_schema().emit(rc.workload.model)
                                   : synthetic_spec_schema().emit(rc.workload.synthetic);
  for (auto& [k, v] : spec_node.entries()) w.set(k, v);
  c.set("workload", w);
  if (rc.workload.is_model()) {
    c.set("calib", model_calib_schema().emit(rc.calib));
    c.set("eval", model_eval_schema().emit(rc.eval));
  } else {
    CalibConfig resolved_calib = rc.calib;
    if (resolved_calib.populations.empty())
      for (auto& p : rc.workload.synthetic.populations) resolved_calib.populations.push_back(p.name);
    c.set("calib", synthetic_calib_schema().emit(resolved_calib));
    c.set("eval", synthetic_eval_schema().emit(rc.eval));
  }
  c.set("slices", slices_schema().emit(rc.slices));
  ConfigNode q = ConfigNode::sequence();
  for (auto& s : rc.quant) q.push_back(emit_step(s, registry));
  c.set("quant", q);
  rc.canonical = c;
  rc.run_id = run_id_of(c.to_yaml());
  return rc;
}

std::vector<ConfigSectionDoc> config_section_docs() {
  return {
      {"workload", "synthetic", "workload: {kind: synthetic, ...}: a suite of independent layers",
       synthetic_spec_schema().docs()},
      {"workload", "model", "workload: {kind: model, ...}: a Hugging Face checkpoint directory",
       model_workload_schema().docs()},
      {"calib", "synthetic", "calibration inputs drawn from the suite's populations",
       synthetic_calib_schema().docs()},
      {"calib", "model", "calibration windows and block-sequential capture",
       model_calib_schema().docs()},
      {"eval", "synthetic", "evaluation units (the bootstrap resamples units)", synthetic_eval_schema().docs()},
      {"eval", "model", "evaluation streams, slice files and token buckets", model_eval_schema().docs()},
      {"slices", "", "per-slice confidence intervals and flags (FAIRNESS.md)", slices_schema().docs()},
      {"output", "", "results file and the table printed after a run", output_schema().docs()},
  };
}

std::string RunConfig::workload_key() const {
  // The numeric mode too: generated inputs and FP outputs are products.
  std::string k = "seed: " + std::to_string(seed) + "\nnumerics: " + numerics_name(numerics) + "\n";
  for (const char* s : {"workload", "calib", "eval"})
    if (const ConfigNode* n = canonical.find(s)) k += std::string(s) + ":\n" + n->to_yaml();
  return k;
}

const char* workload_kind_name(WorkloadKind k) { return k == WorkloadKind::Model ? "model" : "synthetic"; }

const char* eval_set_kind_name(EvalSetKind k) {
  switch (k) {
    case EvalSetKind::Stream: return "stream";
    case EvalSetKind::Jsonl: return "jsonl";
    case EvalSetKind::Ids: return "ids";
  }
  return "?";
}

int layer_group_size(const QuantSpec& spec) {
  switch (spec.granularity) {
    case Granularity::PerTensor: return 0;
    case Granularity::PerChannel: return -1;
    case Granularity::PerGroup: return spec.group_size;
  }
  return -1;
}

int RunConfig::weight_bits() const {
  int b = 16;
  for (auto& s : quant) b = std::min(b, s.weight.bits);
  return b;
}

std::string RunConfig::activation() const {
  std::string a = "a16";
  for (auto& s : quant)
    if (s.act.quantized()) a = s.act.str();
  return a;
}

std::string RunConfig::pipeline_name() const {
  std::string p;
  for (auto& s : quant) p += (p.empty() ? "" : "+") + s.algorithm;
  return p;
}

namespace {
void flatten_into(const ConfigNode& n, const std::string& prefix, std::vector<ParamRow>& out) {
  if (n.is_map()) {
    for (auto& [k, v] : n.entries()) flatten_into(v, join_path(prefix, k), out);
  } else if (n.is_sequence()) {
    bool scalars = true;
    for (auto& e : n.items()) scalars = scalars && (e.is_scalar() || e.is_null());
    if (scalars) {
      out.push_back({prefix, n.to_flow()});
    } else {
      for (std::size_t i = 0; i < n.size(); ++i)
        flatten_into(n.at(i), join_path(prefix, std::to_string(i)), out);
    }
  } else {
    out.push_back({prefix, n.is_null() ? "" : n.value()});
  }
}
}  // namespace

std::vector<ParamRow> flatten_params(const ConfigNode& node) {
  std::vector<ParamRow> out;
  flatten_into(node, "", out);
  return out;
}

}  // namespace ql
