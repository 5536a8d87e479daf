// rtn: round-to-nearest, the baseline column of every quantization paper (ALGORITHMS.md §1).
// Each weight slice (tensor, output row, or row x group of input columns) gets a grid from its
// own values (min-max, percentile or MSE range search) and every weight is rounded to it
// independently; no calibration data are used.
// Config keys: the common weight-grid keys (bits, scheme, granularity, group_size, range,
// percentile, mse_*, scale_dtype); no options of its own.
#pragma once

namespace ql {
class AlgorithmRegistry;
void register_rtn(AlgorithmRegistry& registry);
}  // namespace ql
