#include "core/numerics.h"

#include <cblas.h>
#include <dlfcn.h>
#include <gnu/libc-version.h>

#include <Eigen/Core>
#include <cstdlib>
#include <fstream>
#include <string>

#include "core/error.h"
#include "core/portable_blas.h"

#ifndef QL_CXX_FLAGS
#define QL_CXX_FLAGS "unknown"
#endif

extern "C" void ilaver_(int* major, int* minor, int* patch);  // LAPACK's version query

namespace ql {

namespace {

Numerics g_numerics = Numerics::Fast;

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(' ', colon + 1));
    }
  return "unknown";
}

/// The vector extensions that decide which kernels OpenBLAS, glibc's libm and the portable
/// gemm variants may pick.
std::string cpu_features() {
  std::string s;
  auto add = [&](bool has, const char* name) {
    if (has) s += (s.empty() ? "" : " ") + std::string(name);
  };
  __builtin_cpu_init();
  add(__builtin_cpu_supports("sse4.2"), "sse4.2");
  add(__builtin_cpu_supports("avx"), "avx");
  add(__builtin_cpu_supports("avx2"), "avx2");
  add(__builtin_cpu_supports("fma"), "fma");
  add(__builtin_cpu_supports("avx512f"), "avx512f");
  add(__builtin_cpu_supports("avx512bw"), "avx512bw");
  add(__builtin_cpu_supports("avx512vl"), "avx512vl");
  add(__builtin_cpu_supports("avx512vnni"), "avx512vnni");
  add(__builtin_cpu_supports("avx512bf16"), "avx512bf16");
  return s.empty() ? "none" : s;
}

/// The file the dynamic linker loaded cblas_sgemm from (Debian's alternatives decide it).
std::string blas_library() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&cblas_sgemm), &info) && info.dli_fname) return info.dli_fname;
  return "unknown";
}

std::string env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v && *v ? v : fallback;
}

}  // namespace

const char* numerics_name(Numerics n) { return n == Numerics::Portable ? "portable" : "fast"; }

Numerics parse_numerics(const std::string& name) {
  if (name == "fast") return Numerics::Fast;
  if (name == "portable") return Numerics::Portable;
  throw Error("numerics: expected fast or portable, found '" + name + "'");
}

Numerics current_numerics() { return g_numerics; }

NumericsScope::NumericsScope(Numerics n) : saved_(g_numerics) { g_numerics = n; }
NumericsScope::~NumericsScope() { g_numerics = saved_; }

std::string NumericEnvironment::get(const std::string& key) const {
  for (auto& [k, v] : fields)
    if (k == key) return v;
  return "";
}

std::string NumericEnvironment::to_text() const {
  std::string s;
  for (auto& [k, v] : fields) s += k + ": " + v + "\n";
  return s;
}

NumericEnvironment numeric_environment(Numerics mode, int threads) {
  NumericEnvironment e;
  auto add = [&](const char* k, std::string v) { e.fields.emplace_back(k, std::move(v)); };
  add("mode", numerics_name(mode));
  add("threads", std::to_string(threads));
  std::string isa;
  try {
    isa = portable::isa_name(portable::active_isa());
  } catch (const std::exception& ex) {
    isa = std::string("error: ") + ex.what();
  }
  add("portable_kernels", isa);
  add("blas_config", openblas_get_config());
  add("blas_kernels", openblas_get_corename());
  add("blas_library", blas_library());
  add("openblas_coretype_env", env_or("OPENBLAS_CORETYPE", "(unset)"));
  int maj = 0, min = 0, pat = 0;
  ilaver_(&maj, &min, &pat);
  add("lapack_version", std::to_string(maj) + "." + std::to_string(min) + "." + std::to_string(pat));
  add("cpu_model", cpu_model());
  add("cpu_features", cpu_features());
  add("libc", std::string("glibc ") + gnu_get_libc_version());
  add("glibc_tunables_env", env_or("GLIBC_TUNABLES", "(unset)"));
  add("compiler", std::string("GCC ") + __VERSION__);
  add("compile_flags", QL_CXX_FLAGS);
  add("eigen", std::to_string(EIGEN_WORLD_VERSION) + "." + std::to_string(EIGEN_MAJOR_VERSION) + "." +
                   std::to_string(EIGEN_MINOR_VERSION));
  return e;
}

}  // namespace ql
