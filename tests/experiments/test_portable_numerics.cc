// `numerics: portable` gives the same bits whatever kernels the machine would pick: the same
// sweeps run as subprocesses under different OpenBLAS kernels (OPENBLAS_CORETYPE), glibc libm
// variants (GLIBC_TUNABLES masking FMA/AVX2, which switches exp/log/pow/sin/cos to their SSE2
// implementations) and portable-kernel instruction sets (QL_PORTABLE_KERNELS) must store
// bitwise-equal numbers (everything but wall-clock times). The same environments in `fast` mode
// must give different numbers, which shows the environments really differ.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "experiments/result_store.h"

namespace fs = std::filesystem;

namespace ql {
namespace {

const fs::path kSource = QL_SOURCE_DIR;
const fs::path kBinary = QL_BINARY_DIR;
const fs::path kData = QL_SHARED_DATA_DIR;

/// Two kernel environments that differ in every way this machine allows: Haswell (AVX2+FMA)
/// against Sandybridge (AVX, no FMA) OpenBLAS kernels; default against SSE2-only libm; the
/// widest against the baseline portable gemm.
const std::vector<std::string> kEnvs = {
    "OPENBLAS_CORETYPE=Haswell",
    "OPENBLAS_CORETYPE=Sandybridge QL_PORTABLE_KERNELS=baseline "
    "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX2,-FMA,-AVX512F"};

std::string skip_reason() {
#if !defined(__x86_64__)
  return "the kernel environments are x86-64 OpenBLAS kernels";
#else
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma"))
    return "this CPU cannot run OpenBLAS's Haswell kernels (needs AVX2 and FMA)";
  return "";
#endif
}

fs::path scratch(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / ("quantlab_portable_" + std::to_string(::getpid()));
  fs::create_directories(d);
  return d / name;
}

/// quantlab run CONFIG (overrides) under `env`, into `out`; the exit status.
int run_quantlab(const std::string& env, const fs::path& config, const std::string& overrides,
                 const fs::path& out) {
  fs::remove(out);
  const std::string cmd = "env " + env + " " + (kBinary / "quantlab").string() + " run " +
                          config.string() + " " + overrides + " --output " + out.string() +
                          " --quiet > " + out.string() + ".log 2>&1";
  return std::system(cmd.c_str());
}

template <class T>
bool same_bits(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

/// Every stored number of a run except wall-clock times, as (name, value) in a fixed order.
std::vector<std::pair<std::string, double>> numbers(const RunRecord& r) {
  std::vector<std::pair<std::string, double>> v;
  for (auto& s : r.summary)
    for (double x : {s.value, s.ci_low, s.ci_high, s.delta_vs_fp}) v.push_back({"summary " + s.metric, x});
  for (auto& l : r.layers)
    for (double x : {l.bpw, l.weight_mse, l.rel_err_h, l.rel_err_eval, l.out_mse, l.sqnr_db, l.cosine, l.max_abs})
      v.push_back({"layer " + l.layer, x});
  for (auto& d : r.diagnostics)
    if (d.name != "seconds") v.push_back({"diagnostic " + d.layer + " " + d.name, d.value});
  for (auto& s : r.slices)
    for (double x : {s.value, s.ci_low, s.ci_high, s.ref_value, s.delta, s.delta_ci_low, s.delta_ci_high})
      v.push_back({"slice " + s.metric + " " + s.slice_key + "=" + s.slice_value, x});
  for (auto& d : r.disparity)
    for (double x : {d.value, d.ci_low, d.ci_high, d.p_worst}) v.push_back({"disparity " + d.metric, x});
  for (Index i = 0; i < r.units.sums.size(); ++i) v.push_back({"unit sums", r.units.sums.data()[i]});
  return v;
}

std::string env_value(const RunRecord& r, const std::string& key) {
  for (auto& p : r.numeric_env)
    if (p.key == key) return p.value;
  return "";
}

/// Runs `config` under both environments and returns, per environment, run id -> record.
std::vector<std::map<std::string, RunRecord>> run_both(const fs::path& config, const std::string& overrides,
                                                        const std::string& tag) {
  std::vector<std::map<std::string, RunRecord>> out;
  for (size_t e = 0; e < kEnvs.size(); ++e) {
    const fs::path h5 = scratch(tag + "_" + std::to_string(e) + ".h5");
    EXPECT_EQ(run_quantlab(kEnvs[e], config, overrides, h5), 0) << kEnvs[e] << ": see " << h5 << ".log";
    std::map<std::string, RunRecord> runs;
    for (RunRecord& r : ResultStore(h5.string()).read_all()) runs[r.run_id] = std::move(r);
    out.push_back(std::move(runs));
  }
  return out;
}

/// Number of stored values that differ in their bits between the two environments.
int differing_values(const std::vector<std::map<std::string, RunRecord>>& res, std::string* first) {
  int differ = 0;
  EXPECT_EQ(res[0].size(), res[1].size());
  for (auto& [id, a] : res[0]) {
    auto it = res[1].find(id);
    if (it == res[1].end()) {
      ADD_FAILURE() << "run " << id << " missing in the second environment";
      continue;
    }
    EXPECT_EQ(a.status, RunStatus::Ok) << a.message;
    const auto x = numbers(a), y = numbers(it->second);
    EXPECT_EQ(x.size(), y.size()) << a.label;
    for (size_t i = 0; i < std::min(x.size(), y.size()); ++i)
      if (!same_bits(x[i].second, y[i].second)) {
        if (differ++ == 0 && first) *first = a.label + ": " + x[i].first;
      }
  }
  return differ;
}

TEST(PortableNumerics, SyntheticSweepIsBitwiseEqualAcrossKernelsAndDiffersInFastMode) {
  if (const std::string why = skip_reason(); !why.empty()) GTEST_SKIP() << why;
  const fs::path config = kSource / "configs" / "tests" / "tiny.yaml";
  const auto portable = run_both(config, "--portable", "tiny_portable");
  ASSERT_EQ(portable[0].size(), 6u);
  std::string where;
  EXPECT_EQ(differing_values(portable, &where), 0) << "first difference: " << where;
  // The environments were what they claim: recorded with every run.
  const RunRecord& a = portable[0].begin()->second;
  const RunRecord& b = portable[1].begin()->second;
  EXPECT_EQ(env_value(a, "blas_kernels"), "Haswell");
  EXPECT_EQ(env_value(b, "blas_kernels"), "Sandybridge");
  EXPECT_EQ(env_value(b, "portable_kernels"), "baseline");
  EXPECT_EQ(env_value(a, "mode"), "portable");
  // Fast mode on the same two environments: the kernels change the numbers.
  const auto fast = run_both(config, "", "tiny_fast");
  EXPECT_GT(differing_values(fast, nullptr), 0) << "fast mode gave the same bits under both kernel sets";
  EXPECT_EQ(env_value(fast[0].begin()->second, "mode"), "fast");
}

TEST(PortableNumerics, ModelSweepWithGptqAndSmoothQuantIsBitwiseEqualAcrossKernels) {
  if (const std::string why = skip_reason(); !why.empty()) GTEST_SKIP() << why;
  if (!fs::exists(kData / "austen-llama-7m" / "model.safetensors"))
    GTEST_SKIP() << "../shared/data not found at " << kData << "; this test needs the shared model";
  const fs::path config = kSource / "configs" / "tests" / "portable_model.yaml";
  // The data paths as overrides, wherever QL_SHARED_DATA_DIR points.
  const std::string data = "workload.path=" + (kData / "austen-llama-7m").string() +
                           " calib.text=" + (kData / "text" / "persuasion.txt").string() +
                           " eval.streams.0.path=" + (kData / "text" / "persuasion.txt").string();
  const auto portable = run_both(config, data, "model_portable");
  ASSERT_EQ(portable[0].size(), 2u);
  std::string where;
  EXPECT_EQ(differing_values(portable, &where), 0) << "first difference: " << where;
  const auto fast = run_both(config, data + " numerics=fast", "model_fast");
  EXPECT_GT(differing_values(fast, nullptr), 0) << "fast mode gave the same bits under both kernel sets";
}

}  // namespace
}  // namespace ql
