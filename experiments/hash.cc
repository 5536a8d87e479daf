#include "experiments/hash.h"

#include <cstdio>

namespace ql {

std::string run_id_of(const std::string& canonical_text) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx",
                static_cast<unsigned long long>(fnv1a64(canonical_text)));
  return buf;
}

}  // namespace ql
