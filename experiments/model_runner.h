// The `kind: model` workload: a Hugging Face checkpoint quantized block by block and evaluated
// on texts, overall and per slice. The run is a sequence of phases over a small block state
// (experiments/model_runner.cc), with the pipeline's steps applied by experiments/pipeline.h:
//
//   load (cached across runs) -> calibration windows -> for each block b:
//     capture    statistics (Hessian + channel statistics per shared input of the architecture
//                table) of block b's linear inputs over every calibration window, all windows
//                in one Transformer::block_batch call per chunk of 4096 rows (one SYRK per
//                chunk); the FP block's outputs come from the same pass
//     block      block-scope steps: transforms merged into the weights and installed online in
//                the quantized model; inputs re-captured in the transformed space
//     apply      norm->consumer transforms folded into the RMSNorm weights and the consumers,
//                layer-scope quantization per linear (whole block, or with calib.
//                true_sequential group by group in one staged pass, Transformer::block_stage);
//                static activation ranges fixed; codes and grids kept in the quantized model
//     kv         KV-cache steps: a quantizer per block (K/V captured only if a plugin needs them)
//     propagate  block b+1 reads the quantized block's outputs (or the FP block's, calib.
//                propagate: fp): a second pass of the block, or the staged pass's outputs
//   -> evaluate the FP model and the quantized-model object window by window in the same
//   process -> LM metrics per unit -> slices; layer rows, bpw and kv_bits summaries.
//
// Memory during calibration is bounded by one block's activations for all calibration windows
// (n_samples x seq_len x hidden floats) plus the statistics of one block's linears.
#pragma once
#include <functional>
#include <memory>
#include <string>

#include "algorithms/algorithm.h"
#include "experiments/config.h"
#include "experiments/run_record.h"

namespace ql {

/// Loaded checkpoints, tokenized texts and windows, reused by every run of a sweep that shares
/// them (each piece keyed by the config values it depends on).
class ModelCache {
 public:
  ModelCache();
  ~ModelCache();
  struct State;
  State& state() { return *state_; }

 private:
  std::unique_ptr<State> state_;
};

/// Load the checkpoint, tokenizer and texts of `run` into the cache (what every run of the
/// workload would otherwise do first), so that a broken checkpoint or text fails once, before
/// any run, with one error.
void preload_model_workload(const RunConfig& run, ModelCache& cache);

class QuantizedModel;

/// Fill `rec` (layers, diagnostics, summary, slices, disparity, units, timings) for one run of
/// a model workload. Throws on failure; the caller records it. `on_quantized`, when set, sees
/// the quantized-model object after calibration, before evaluation (weights, codes and grids,
/// transforms, quantizers: e.g. to export it or check its invariants).
void execute_model_run(const RunConfig& run, ModelCache& cache, const AlgorithmRegistry& registry,
                       RunRecord& rec, const std::function<void(const std::string&)>& on_layer,
                       const std::function<void(const QuantizedModel&)>& on_quantized = {});

}  // namespace ql
