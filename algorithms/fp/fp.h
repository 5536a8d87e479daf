// fp: no quantization. The FP reference row of every table: weights pass through unchanged,
// so every metric against FP is exactly zero and slice deltas are measured against it.
// Config keys: none (the weight-grid keys are rejected, since there is no grid).
#pragma once

namespace ql {
class AlgorithmRegistry;
void register_fp(AlgorithmRegistry& registry);
}  // namespace ql
