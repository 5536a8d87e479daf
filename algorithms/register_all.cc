// The one list of plugins. Explicit calls instead of static-initialiser self-registration, which
// a static library silently drops. A new plugin adds its register_* call here and is then
// covered by the registry and conformance tests.
#include "algorithms/algorithm.h"
#include "algorithms/awq/awq.h"
#include "algorithms/commvq/commvq.h"
#include "algorithms/flatquant/flatquant.h"
#include "algorithms/fp/fp.h"
#include "algorithms/gptq/gptq.h"
#include "algorithms/kv_rtn/kv_rtn.h"
#include "algorithms/rotation/rotation.h"
#include "algorithms/rtn/rtn.h"
#include "algorithms/smoothquant/smoothquant.h"
#include "algorithms/vlmq/vlmq.h"
#include "algorithms/zeroqat/zeroqat.h"

namespace ql {

void register_all(AlgorithmRegistry& registry) {
  register_fp(registry);
  register_rtn(registry);
  register_gptq(registry);
  register_smoothquant(registry);
  register_awq(registry);
  register_vlmq(registry);
  register_kv_rtn(registry);
  register_rotation(registry);
  register_flatquant(registry);
  register_commvq(registry);
  register_zeroqat(registry);
}

}  // namespace ql
