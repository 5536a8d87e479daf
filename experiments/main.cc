// quantlab command line: run, plan, list, table, export-csv.
// Every user-caused error is printed as one line on stderr and exits with status 2 (1 when a
// sweep ran but some of its runs failed).
#include <boost/program_options.hpp>
#include <fstream>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "algorithms/algorithm.h"
#include "core/error.h"
#include "core/model/checkpoint.h"
#include "core/model/tokenizer.h"

#include <nlohmann/json.hpp>
#include "core/numerics.h"
#include "core/parallel.h"
#include "core/quant_spec.h"
#include "experiments/report.h"
#include "experiments/result_store.h"
#include "experiments/runner.h"

namespace po = boost::program_options;

namespace {

const char* kUsage =
    "usage: quantlab <command> [options]\n"
    "commands:\n"
    "  run CONFIG.yaml [key.path=value ...]   run every expanded run not yet stored\n"
    "  plan CONFIG.yaml [key.path=value ...]  list the expanded runs and their ids (no compute)\n"
    "  list                                   algorithms, their options and defaults\n"
    "  table FILE.h5 --rows K --cols K --metric M [--format md|latex|csv] [--over K]\n"
    "  export-csv FILE.h5 -o DIR              runs.csv, layers.csv, slices.csv, ...\n"
    "  tokenize MODEL_DIR FILE [--special]    token ids of each line of FILE (one JSON string per line)\n"
    "  --version                              revision and numeric environment (BLAS kernels, CPU, ...)\n"
    "run/plan options: --threads N  --output FILE.h5  --quiet  --portable (= numerics=portable)\n";

struct Parsed {
  po::variables_map vm;
  std::vector<std::string> positional;
};

Parsed parse(const std::vector<std::string>& args, const po::options_description& desc) {
  po::options_description all(desc);
  all.add_options()("positional", po::value<std::vector<std::string>>(), "");
  po::positional_options_description pos;
  pos.add("positional", -1);
  Parsed p;
  po::store(po::command_line_parser(args).options(all).positional(pos).run(), p.vm);
  po::notify(p.vm);
  if (p.vm.count("positional")) p.positional = p.vm["positional"].as<std::vector<std::string>>();
  return p;
}

int cmd_run(const std::vector<std::string>& args, bool plan_only) {
  po::options_description desc("run options");
  desc.add_options()("threads", po::value<int>()->default_value(0), "threads (0 = all cores)")(
      "output,o", po::value<std::string>()->default_value(""), "results file (overrides output.path)")(
      "quiet,q", po::bool_switch(), "no progress output")(
      "portable", po::bool_switch(),
      "portable numerics: bitwise identical results across x86-64 machines (core/numerics.h)");
  Parsed p = parse(args, desc);
  if (p.positional.empty()) throw ql::Error("expected a config file: quantlab run CONFIG.yaml");
  const std::string config = p.positional[0];
  std::vector<std::string> overrides(p.positional.begin() + 1, p.positional.end());
  if (p.vm["portable"].as<bool>()) overrides.push_back("numerics=portable");
  const ql::AlgorithmRegistry& registry = ql::default_registry();
  std::vector<ql::RunConfig> runs = ql::plan_runs(config, overrides, registry);

  ql::RunnerOptions opts;
  opts.threads = p.vm["threads"].as<int>();
  opts.output = p.vm["output"].as<std::string>();
  opts.quiet = p.vm["quiet"].as<bool>();

  if (plan_only) {
    std::map<std::string, std::map<std::string, ql::RunStatus>> stored;
    std::cout << runs.size() << " runs\n";
    for (std::size_t i = 0; i < runs.size(); ++i) {
      const std::string path = opts.output.empty() ? runs[i].output.path : opts.output;
      if (!stored.count(path)) stored[path] = ql::ResultStore(path).run_statuses();
      auto it = stored[path].find(runs[i].run_id);
      std::string state = it == stored[path].end() ? "new" : it->second == ql::RunStatus::Ok ? "stored" : "failed";
      std::cout << i + 1 << "\t" << runs[i].run_id << "\t" << state << "\t" << runs[i].label
                << "\t-> " << path << "\n";
    }
    return 0;
  }

  ql::SweepSummary s = ql::run_sweep(runs, opts, registry);
  if (!opts.quiet)
    std::cerr << s.total << " runs: " << s.ok << " ok, " << s.failed << " failed, " << s.skipped
              << " already stored\n";
  const ql::RunConfig& first = runs.front();
  if (!first.output.table_cols.empty()) {
    const std::string path = opts.output.empty() ? first.output.path : opts.output;
    // The runs are stored whatever happens here: a table that cannot be drawn (e.g. two runs
    // in one cell) is reported but does not turn a successful sweep into a failure.
    for (const std::string& metric : first.output.table_metrics) {
      try {
        std::string table = ql::pivot_table(path, first.output.table_rows, first.output.table_cols,
                                            metric, first.output.table_format, first.output.table_over);
        std::cout << "\n" << metric << " (" << path << ")\n\n" << table;
      } catch (const ql::Error& e) {
        std::cerr << "quantlab: table of '" << metric << "': " << e.what() << "\n";
      }
    }
  }
  for (auto& path : s.output_paths) std::cerr << "results: " << path << "\n";
  return s.failed > 0 ? 1 : 0;
}

void print_docs(const std::vector<ql::OptionDoc>& docs, const std::string& indent) {
  for (auto& d : docs)
    std::cout << indent << d.name << " (" << d.type << ", default " << d.default_value << "): " << d.doc
              << "\n";
}

int cmd_list(const std::vector<std::string>& args) {
  const ql::AlgorithmRegistry& registry = ql::default_registry();
  std::cout << "Quant-step keys shared by every algorithm with a weight grid:\n";
  print_docs(ql::quant_spec_schema().docs(), "  ");
  std::cout << "  act (map): activation quantization at the layer input:\n";
  print_docs(ql::act_quant_spec_schema().docs(), "    ");
  std::cout << "  targets (list of regex, default [.*]): layers this step quantizes\n"
            << "  ignore (list of regex, default []): layers this step leaves alone\n\n"
            << "Algorithms:\n";
  for (const std::string& name : registry.names()) {
    const ql::AlgorithmInfo& info = registry.get(name);
    std::cout << "  " << name << " [" << ql::scope_name(info.scope) << " scope"
              << (info.uses_weight_spec ? ", weight grid" : ", no weight grid") << "]: " << info.summary
              << "\n";
    if (!info.paper.empty()) std::cout << "    paper: " << info.paper << "\n";
    if (info.options) {
      auto docs = info.options->docs();
      if (docs.empty()) std::cout << "    (no options of its own)\n";
      print_docs(docs, "    ");
    }
  }
  std::cout << "\nnumerics (fast|portable, default fast): fast runs every product on the system "
               "OpenBLAS (bitwise reproducible for one machine, BLAS build and kernel choice); "
               "portable on quantlab's own kernels and elementary functions (bitwise identical "
               "across x86-64 machines with the same build; slower). CLI: --portable\n";
  std::cout << "\nRun config sections (besides seed, numerics, include, quant and sweep):\n";
  for (const ql::ConfigSectionDoc& s : ql::config_section_docs()) {
    std::cout << "  " << s.key << (s.applies_to.empty() ? "" : " [" + s.applies_to + " workload]") << ": "
              << s.summary << "\n";
    print_docs(s.options, "    ");
  }
  auto join = [](const std::vector<std::string>& v) {
    std::string s;
    for (const std::string& x : v) s += (s.empty() ? "" : ", ") + x;
    return s;
  };
  std::cout << "\nModel checkpoints (Hugging Face layout: config.json, model.safetensors or its index, "
               "tokenizer.model or tokenizer.json):\n  architectures: "
            << join(ql::supported_architectures()) << "\n  rope_scaling: " << join(ql::supported_rope_scalings())
            << " (rejected by name: " << join(ql::rejected_rope_scalings()) << ")\n";
  return 0;
}

int cmd_table(const std::vector<std::string>& args) {
  po::options_description desc("table options");
  desc.add_options()("rows", po::value<std::string>()->default_value("label"), "row key")(
      "cols", po::value<std::string>()->required(), "column key")(
      "metric", po::value<std::string>()->required(), "metric name")(
      "format", po::value<std::string>()->default_value("md"), "md | latex | csv")(
      "over", po::value<std::string>()->default_value(""),
      "params key to aggregate over as mean ± sd (n), e.g. calib.draw");
  Parsed p = parse(args, desc);
  if (p.positional.size() != 1) throw ql::Error("expected one results file: quantlab table FILE.h5 ...");
  std::cout << ql::pivot_table(p.positional[0], p.vm["rows"].as<std::string>(),
                               p.vm["cols"].as<std::string>(), p.vm["metric"].as<std::string>(),
                               p.vm["format"].as<std::string>(), p.vm["over"].as<std::string>());
  return 0;
}

int cmd_version() {
  std::cout << "quantlab " << QL_GIT_REV << "\n";
  std::cout << ql::numeric_environment(ql::Numerics::Fast, ql::num_threads()).to_text();
  std::cout << "(mode fast is the default; --portable or numerics: portable selects the portable "
               "kernels listed as portable_kernels)\n";
  return 0;
}

int cmd_export(const std::vector<std::string>& args) {
  po::options_description desc("export-csv options");
  desc.add_options()("output,o", po::value<std::string>()->required(), "output directory");
  Parsed p = parse(args, desc);
  if (p.positional.size() != 1) throw ql::Error("expected one results file: quantlab export-csv FILE.h5 -o DIR");
  ql::export_csv(p.positional[0], p.vm["output"].as<std::string>());
  return 0;
}

// Reads FILE whole first, so a bad line fails before anything is printed.
int cmd_tokenize(const std::vector<std::string>& args) {
  po::options_description desc("tokenize options");
  desc.add_options()("special", po::bool_switch(), "apply the tokenizer's post-processor (BOS/EOS)");
  Parsed p = parse(args, desc);
  if (p.positional.size() != 2) throw ql::Error("expected a model directory and a file: quantlab tokenize MODEL_DIR FILE");
  const ql::Tokenizer tok = ql::Tokenizer::load(p.positional[0]);
  const std::string& file = p.positional[1];
  std::ifstream in(file, std::ios::binary);
  if (!in) throw ql::IoError(file + ": cannot open for reading");
  std::vector<std::string> texts;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    try {
      const nlohmann::json j = nlohmann::json::parse(line);
      if (!j.is_string()) throw ql::IoError(file + ":" + std::to_string(n) + ": expected a JSON string, found " + j.type_name());
      texts.push_back(j.get<std::string>());
    } catch (const nlohmann::json::exception& e) {
      throw ql::IoError(file + ":" + std::to_string(n) + ": expected one JSON-encoded string per line: " + e.what());
    }
  }
  const bool special = p.vm["special"].as<bool>();
  std::string out;
  for (const std::string& t : texts) out += nlohmann::json(special ? tok.encode_with_special_tokens(t) : tok.encode(t)).dump() + "\n";
  std::cout << out;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::cout << kUsage;
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  std::vector<std::string> args(argv + 2, argv + argc);
  try {
    if (cmd == "run") return cmd_run(args, false);
    if (cmd == "plan") return cmd_run(args, true);
    if (cmd == "list") return cmd_list(args);
    if (cmd == "table") return cmd_table(args);
    if (cmd == "export-csv") return cmd_export(args);
    if (cmd == "tokenize") return cmd_tokenize(args);
    if (cmd == "--version" || cmd == "version") return cmd_version();
    std::cerr << "quantlab: unknown command '" << cmd << "'\n" << kUsage;
    return 2;
  } catch (const po::error& e) {
    std::cerr << "quantlab " << cmd << ": " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "quantlab: " << e.what() << "\n";
    return 2;
  }
}
