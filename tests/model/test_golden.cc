// Golden tests against ../shared/data/austen-llama-7m/golden/golden.json, computed by an
// independent PyTorch implementation: FP stream and slice perplexities (1e-4 relative) and
// RTN fake-quant perplexities (1e-3 relative), each through the whole runner (config ->
// checkpoint -> calibration/quantization -> evaluation -> slices).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sys/wait.h>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include "experiments/runner.h"

namespace fs = std::filesystem;

namespace ql {
namespace {

const fs::path kData = QL_SHARED_DATA_DIR;

bool have_data() { return fs::exists(kData / "austen-llama-7m" / "golden" / "golden.json"); }

nlohmann::json golden() {
  std::ifstream in(kData / "austen-llama-7m" / "golden" / "golden.json");
  return nlohmann::json::parse(in);
}

/// One run of a model config given as YAML text (data paths absolute).
RunRecord run_yaml(const std::string& body, WorkloadCache& cache) {
  const std::string d = kData.string();
  std::string yaml = "workload: {kind: model, path: " + d + "/austen-llama-7m}\n" +
                     "calib: {text: " + d + "/text/austen_train.txt, n_samples: 4, seq_len: 256, rule: strided}\n" +
                     "slices: {n_boot: 20}\n" + body;
  ConfigNode root = ConfigNode::parse(yaml, "golden.yaml");
  RunConfig rc = parse_run_config(root, "golden", "golden.yaml", default_registry());
  RunRecord r = execute_run(rc, cache, default_registry());
  EXPECT_EQ(r.status, RunStatus::Ok) << r.message;
  return r;
}

double find(const RunRecord& r, const std::string& metric, const std::string& key = "__all__",
            const std::string& value = "__all__", bool reference = false) {
  for (auto& s : r.slices)
    if (s.metric == metric && s.slice_key == key && s.slice_value == value)
      return reference ? s.ref_value : s.value;
  ADD_FAILURE() << "no slice row " << metric << " " << key << "=" << value;
  return NAN;
}

#define REQUIRE_DATA() \
  if (!have_data()) GTEST_SKIP() << "../shared/data not found at " << kData << "; golden tests need it"

TEST(Golden, FpStreamPerplexities) {
  REQUIRE_DATA();
  nlohmann::json g = golden();
  WorkloadCache cache;
  const std::string d = kData.string();
  RunRecord r = run_yaml("eval: {seq_len: 256, streams: [{name: persuasion, path: " + d +
                             "/text/persuasion.txt}, {name: wikitext2, path: " + d + "/text/wikitext2_test.txt}]}\n"
                             "quant: [{algorithm: fp}]\n",
                         cache);
  for (const char* set : {"persuasion", "wikitext2"}) {
    const double want = g["stream_ppl"][set]["ppl"].get<double>();
    const double got = find(r, std::string(set) + "/ppl");
    EXPECT_NEAR(got / want - 1.0, 0.0, 1e-4) << set << ": got " << got << ", golden " << want;
    EXPECT_EQ(find(r, std::string(set) + "/ppl", "__all__", "__all__", true), got)
        << "the FP run's reference equals its value";
    EXPECT_EQ(find(r, std::string(set) + "/kl_mean"), 0.0);
  }
}

TEST(Golden, FpSlicePerplexities) {
  REQUIRE_DATA();
  nlohmann::json g = golden();
  WorkloadCache cache;
  RunRecord r = run_yaml("eval: {seq_len: 256, slices: [{name: slices, path: " + kData.string() +
                             "/text/slices.jsonl}]}\nquant: [{algorithm: fp}]\n",
                         cache);
  for (auto& [key, entry] : g["slice_ppl"].items()) {
    const std::size_t eq = key.find('=');
    const std::string fam = key.substr(0, eq), val = key.substr(eq + 1);
    const double want = entry["ppl"].get<double>();
    const double got = find(r, "slices/ppl", fam, val);
    EXPECT_NEAR(got / want - 1.0, 0.0, 1e-4) << key << ": got " << got << ", golden " << want;
    for (auto& s : r.slices)
      if (s.metric == "slices/ppl" && s.slice_key == fam && s.slice_value == val) {
        EXPECT_EQ(s.n_tokens, entry["scored_tokens"].get<int64_t>()) << key;
        EXPECT_EQ(s.n_units, entry["documents"].get<int64_t>()) << key;
      }
  }
}

TEST(Golden, RtnPerplexitiesOnPersuasion) {
  REQUIRE_DATA();
  nlohmann::json g = golden();
  WorkloadCache cache;
  for (auto& [name, entry] : g["rtn_ppl"].items()) {
    // "w4_g64" -> bits 4, group 64; "g-1" = per output row.
    const int bits = std::stoi(name.substr(1, name.find('_') - 1));
    const int group = std::stoi(name.substr(name.find("_g") + 2));
    std::string step = "{algorithm: rtn, bits: " + std::to_string(bits) +
                       ", scheme: asym, range: minmax, scale_dtype: fp32, " +
                       (group < 0 ? std::string("granularity: channel}")
                                  : "granularity: group, group_size: " + std::to_string(group) + "}");
    // kl: false skips the FP pass (the golden numbers are the quantized model's own ppl).
    RunRecord r = run_yaml("eval: {seq_len: 256, kl: false, streams: [{name: persuasion, path: " +
                               kData.string() + "/text/persuasion.txt}]}\nquant: [" + step + "]\n",
                           cache);
    const double want = entry["ppl"].get<double>();
    const double got = find(r, "persuasion/ppl");
    EXPECT_NEAR(got / want - 1.0, 0.0, 1e-3) << name << ": got " << got << ", golden " << want;
    EXPECT_TRUE(std::isnan(find(r, "persuasion/ppl", "__all__", "__all__", true)))
        << "without the FP pass there is no reference";
  }
}

}  // namespace
}  // namespace ql

namespace ql {
namespace {

TEST(ModelRunner, KlAndAgreementTrackBits) {
  REQUIRE_DATA();
  WorkloadCache cache;
  const std::string eval = "eval: {seq_len: 256, streams: [{name: p, path: " + kData.string() +
                           "/text/persuasion.txt, max_windows: 24}]}\n";
  RunRecord w8 = run_yaml(eval + "quant: [{algorithm: rtn, bits: 8}]\n", cache);
  RunRecord w3 = run_yaml(eval + "quant: [{algorithm: rtn, bits: 3}]\n", cache);
  EXPECT_GT(find(w8, "p/kl_mean"), 0.0);
  EXPECT_GT(find(w3, "p/kl_mean"), 10 * find(w8, "p/kl_mean"));
  EXPECT_LT(find(w3, "p/top1_agree"), find(w8, "p/top1_agree"));
  EXPECT_GT(find(w3, "p/ppl"), find(w3, "p/ppl", "__all__", "__all__", true));
  // Token slices exist with counts, and every linear of every block has a layer row.
  bool freq = false, pos = false;
  for (auto& s : w3.slices) {
    freq = freq || (s.slice_key == "token_freq" && s.n_tokens > 0);
    pos = pos || (s.slice_key == "position" && s.n_tokens > 0);
  }
  EXPECT_TRUE(freq);
  EXPECT_TRUE(pos);
  EXPECT_EQ(w3.layers.size(), 6u * 7u);
  for (auto& l : w3.layers) {
    EXPECT_EQ(l.bits, 3) << l.layer;
    EXPECT_GT(l.rel_err_h, 0.0) << l.layer;
  }
}

TEST(ModelRunner, CorruptCheckpointIsOneErrorBeforeAnyRun) {
  REQUIRE_DATA();
  const fs::path dir = fs::temp_directory_path() / ("quantlab_corrupt_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir / "model");
  const fs::path src = kData / "austen-llama-7m";
  fs::copy_file(src / "config.json", dir / "model" / "config.json");
  fs::copy_file(src / "tokenizer.model", dir / "model" / "tokenizer.model");
  {  // a truncated weights file: the header promises more bytes than the file has
    std::ifstream in(src / "model.safetensors", std::ios::binary);
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), {});
    std::ofstream out(dir / "model" / "model.safetensors", std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size() / 2));
  }
  std::ofstream(dir / "c.yaml") << "workload: {kind: model, path: model}\n"
                                << "calib: {text: " << kData.string() << "/text/persuasion.txt, n_samples: 2}\n"
                                << "eval: {streams: [{name: p, path: " << kData.string()
                                << "/text/persuasion.txt, max_windows: 2}]}\n"
                                << "quant: [{algorithm: rtn, bits: 4}]\n"
                                << "sweep: {grid: {quant.0.bits: [4, 3]}}\n";
  const fs::path out = dir / "r.h5";
  const std::string cmd = std::string(QL_BINARY_DIR) + "/quantlab run " + (dir / "c.yaml").string() +
                          " --output " + out.string() + " --quiet 2> " + (dir / "err.txt").string();
  const int rc = std::system(cmd.c_str());
  EXPECT_NE(WEXITSTATUS(rc), 0);
  std::ifstream err(dir / "err.txt");
  std::string line, all;
  int lines = 0;
  while (std::getline(err, line)) {
    ++lines;
    all += line;
  }
  EXPECT_EQ(lines, 1) << all;
  EXPECT_NE(all.find("model.safetensors"), std::string::npos) << all;
  EXPECT_FALSE(fs::exists(out)) << "nothing is written when the checkpoint cannot be read";
  fs::remove_all(dir);
}

}  // namespace
}  // namespace ql

#include "core/model/tokenizer.h"

namespace ql {
namespace {

TEST(ModelRunner, PreTokenizedInputsMatchTextAndNeedNoTokenizer) {
  REQUIRE_DATA();
  const fs::path dir = fs::temp_directory_path() / ("quantlab_ids_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir / "model");
  const fs::path src = kData / "austen-llama-7m";
  // The same 30 documents as JSONL text and as token ids ([BOS] + encode(text) per line).
  Tokenizer tok = Tokenizer::load(src.string());
  std::ifstream in(kData / "text" / "slices.jsonl");
  std::ofstream jsonl(dir / "docs.jsonl"), ids(dir / "docs.ids");
  std::string line;
  for (int i = 0; i < 30 && std::getline(in, line); ++i) {
    jsonl << line << "\n";
    nlohmann::json j = nlohmann::json::parse(line);
    ids << tok.bos_id();
    for (int32_t t : tok.encode(j["text"].get<std::string>())) ids << " " << t;
    ids << "\n";
  }
  jsonl.close();
  ids.close();
  // A checkpoint directory whose only tokenizer is a tokenizer.json.
  fs::copy_file(src / "config.json", dir / "model" / "config.json");
  fs::create_symlink(src / "model.safetensors", dir / "model" / "model.safetensors");
  std::ofstream(dir / "model" / "tokenizer.json") << "{}";

  WorkloadCache cache;
  auto run = [&](const std::string& yaml) {
    RunConfig rc = parse_run_config(ConfigNode::parse(yaml, (dir / "c.yaml").string()), "ids", "c.yaml",
                                    default_registry());
    return execute_run(rc, cache, default_registry());
  };
  RunRecord both = run("workload: {kind: model, path: " + src.string() + "}\n"
                       "calib: {ids: " + (dir / "docs.ids").string() + ", n_samples: 2, seq_len: 64}\n"
                       "eval: {slices: [{name: j, path: " + (dir / "docs.jsonl").string() + "}],"
                       " token_ids: [{name: t, path: " + (dir / "docs.ids").string() + "}]}\n"
                       "slices: {n_boot: 10}\nquant: [{algorithm: rtn, bits: 3}]\n");
  ASSERT_EQ(both.status, RunStatus::Ok) << both.message;
  // Same windows and logits; the totals are summed in another order (JSONL units are grouped
  // by their slice cells), so equal up to double rounding.
  EXPECT_NEAR(find(both, "j/ppl") / find(both, "t/ppl"), 1.0, 1e-12);
  EXPECT_NEAR(find(both, "j/kl_mean") / find(both, "t/kl_mean"), 1.0, 1e-12);

  RunRecord no_tok = run("workload: {kind: model, path: " + (dir / "model").string() + "}\n"
                         "calib: {ids: " + (dir / "docs.ids").string() + ", n_samples: 2, seq_len: 64}\n"
                         "eval: {token_ids: [{name: t, path: " + (dir / "docs.ids").string() + "}]}\n"
                         "slices: {n_boot: 10}\nquant: [{algorithm: rtn, bits: 3}]\n");
  ASSERT_EQ(no_tok.status, RunStatus::Ok) << no_tok.message;
  EXPECT_NEAR(find(no_tok, "t/ppl") / find(both, "t/ppl"), 1.0, 1e-12);

  RunRecord text = run("workload: {kind: model, path: " + (dir / "model").string() + "}\n"
                       "calib: {text: " + (kData / "text" / "persuasion.txt").string() + ", n_samples: 2}\n"
                       "eval: {token_ids: [{name: t, path: " + (dir / "docs.ids").string() + "}]}\n"
                       "quant: [{algorithm: fp}]\n");
  EXPECT_EQ(text.status, RunStatus::Failed);
  EXPECT_NE(text.message.find("tokenizer.json"), std::string::npos) << text.message;
  fs::remove_all(dir);
}

}  // namespace
}  // namespace ql
