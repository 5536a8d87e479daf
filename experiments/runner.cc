#include "experiments/runner.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <ctime>
#include <iomanip>
#include <iostream>
#include <limits>
#include <map>
#include <sstream>

#include "core/calib_stats.h"
#include "core/detmath.h"
#include "core/error.h"
#include "core/linalg.h"
#include "core/rng.h"
#include "core/metrics.h"
#include "core/model/transforms.h"
#include "core/parallel.h"
#include "core/synthetic.h"
#include "experiments/model_runner.h"
#include "experiments/pipeline.h"
#include "experiments/result_store.h"
#include "experiments/sweep.h"

namespace ql {

// ------------------------------------------------------------------------------------------
// Planning
// ------------------------------------------------------------------------------------------

std::vector<RunConfig> plan_runs(const std::string& config_path,
                                 const std::vector<std::string>& overrides,
                                 const AlgorithmRegistry& registry) {
  ConfigNode root = load_config(config_path, overrides);
  std::vector<ExpandedRun> expanded = expand_sweep(root);
  std::vector<RunConfig> runs;
  runs.reserve(expanded.size());
  for (auto& e : expanded) {
    runs.push_back(parse_run_config(e.config, e.label, config_path, registry));
    runs.back().experiment = e.experiment;
  }
  return runs;
}

// ------------------------------------------------------------------------------------------
// Workload preparation
// ------------------------------------------------------------------------------------------

struct WorkloadCache::Prepared {
  struct Layer {
    std::string name;
    Matrix W;
    HessianAccumulator H;   // of the calibration inputs
    ChannelStats stats;     // of the calibration inputs
    Matrix X_calib;         // the calibration inputs (statistics of transformed inputs)
    Matrix X_eval;          // evaluation tokens, unit-major
    Matrix Y_ref;           // FP outputs on X_eval
    VectorD sig;            // ‖y_t‖² per evaluation token, double
  };
  std::vector<Layer> layers;
  std::vector<std::string> calib_population_names;  // the calibration rows' population blocks
  std::vector<Index> calib_population_rows;
  std::vector<std::string> unit_ids;
  std::vector<std::string> unit_population;
  Index unit_tokens = 0;
};

WorkloadCache::WorkloadCache() = default;
WorkloadCache::~WorkloadCache() = default;

namespace {

VectorD row_squared_norms(const Matrix& Y) {
  VectorD out(Y.rows());
#pragma omp parallel for schedule(static)
  for (Index t = 0; t < Y.rows(); ++t) out[t] = Y.row(t).cast<double>().squaredNorm();
  return out;
}

std::shared_ptr<WorkloadCache::Prepared> prepare(const RunConfig& run) {
  // The parsed spec already carries the calib:/eval: data sizes (experiments/config.cc).
  SyntheticSuite suite = generate_suite(run.workload.synthetic, run.seed);

  auto p = std::make_shared<WorkloadCache::Prepared>();
  p->unit_ids = suite.unit_ids;
  p->unit_population = suite.unit_population;
  p->unit_tokens = suite.unit_tokens;
  p->calib_population_names = suite.calib_population_names;
  p->calib_population_rows = suite.calib_population_rows;
  for (auto& l : suite.layers) {
    WorkloadCache::Prepared::Layer L;
    L.name = l.name;
    L.H = HessianAccumulator(l.W.cols());
    L.H.add(l.X_calib);
    L.stats = ChannelStats(l.W.cols());
    L.stats.add(l.X_calib);
    L.Y_ref = matmul_nt(l.X_eval, l.W);
    L.sig = row_squared_norms(L.Y_ref);
    L.W = std::move(l.W);
    L.X_eval = std::move(l.X_eval);
    L.X_calib = std::move(l.X_calib);
    p->layers.push_back(std::move(L));
  }
  return p;
}

}  // namespace

std::shared_ptr<const WorkloadCache::Prepared> WorkloadCache::get(const RunConfig& run,
                                                                double* seconds) {
  const std::string key = run.workload_key();
  if (current_ && key == key_) {
    if (seconds) *seconds = 0;
    return current_;
  }
  auto t0 = std::chrono::steady_clock::now();
  current_.reset();  // free the old workload before building the next
  current_ = prepare(run);
  key_ = key;
  if (seconds) *seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return current_;
}

// ------------------------------------------------------------------------------------------
// One run
// ------------------------------------------------------------------------------------------

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::string utc_now() {
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

/// Per-token squared output error ‖ŷ_t - y_t‖² in double; tokens are independent, so the
/// result does not depend on the thread count.
VectorD token_errors(const Matrix& Yq, const Matrix& Y) {
  VectorD out(Y.rows());
#pragma omp parallel for schedule(static)
  for (Index t = 0; t < Y.rows(); ++t)
    out[t] = (Yq.row(t) - Y.row(t)).cast<double>().squaredNorm();
  return out;
}

/// One synthetic layer after the pipeline: its weights in the transformed input space, the
/// cumulative per-channel scale s (x' = x / s), the calibration statistics of x' and the
/// activation quantizer the steps set.
struct SyntheticLayerState {
  Matrix W;
  VectorD s;
  HessianAccumulator H;
  ChannelStats stats;
  LayerRow row;
  const ActQuantSpec* act = nullptr;
  std::optional<QuantizedTensor> codes;  ///< when W lies on the last layer step's grid
  /// Online transform of the input (x' = x P, before the channel scale), from a block-scope
  /// step that transforms standalone inputs; null when none.
  std::shared_ptr<const InputTransform> transform;
  ActClip act_clip;  ///< learned clipping of the activation quantizer (FlatQuant's LAC)
};

/// The first step that weighs calibration tokens (VLMQ) computes the layer's token importance
/// from its FP weights and calibration inputs (one window per calibration population, so
/// importance is reported per population); the layer's Hessian becomes Σ g_t x_t x_tᵀ / Σ g_t.
void apply_synthetic_importance(const Pipeline& pipeline, const WorkloadCache::Prepared& wl,
                                const WorkloadCache::Prepared::Layer& layer, SyntheticLayerState& ls, RunRecord& rec) {
  for (std::size_t si = 0; si < pipeline.steps().size(); ++si) {
    const PipelineStep& ps = pipeline.steps()[si];
    if (ps.scope() != Scope::Layer || !ps.needs().token_importance || !ps.applies_to(layer.name)) continue;
    TokenImportanceInput in;
    in.name = layer.name;
    in.linear = &layer.W;
    in.spec = ps.config().weight;
    in.source_names = wl.calib_population_names;
    std::vector<Matrix> X, Y;
    Index r0 = 0;
    for (std::size_t k = 0; k < wl.calib_population_rows.size(); ++k) {
      const Index n = wl.calib_population_rows[k];
      if (n == 0) continue;
      X.push_back(layer.X_calib.middleRows(r0, n));
      Y.push_back(matmul_nt(X.back(), layer.W));
      in.window_source.push_back(static_cast<int>(k));
      r0 += n;
    }
    in.inputs = &X;
    in.targets = &Y;
    const auto t0 = std::chrono::steady_clock::now();
    TokenImportance r = dynamic_cast<const LayerAlgorithm&>(ps.plugin()).token_importance(in);
    Vector g(layer.X_calib.rows());
    Index o = 0;
    for (const Vector& v : r.weights) {
      g.segment(o, v.size()) = v;
      o += v.size();
    }
    ls.H = HessianAccumulator(layer.X_calib.cols());
    ls.H.add_weighted(layer.X_calib, g);
    const std::string& alg = ps.config().algorithm;
    for (auto& [name, value] : r.diagnostics) rec.diagnostics.push_back({layer.name, static_cast<int>(si), alg, name, value});
    rec.diagnostics.push_back({layer.name, static_cast<int>(si), alg, "importance_seconds",
                               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()});
    return;
  }
}

/// The pipeline on layer li. The layer's input has no producer in the suite: evaluation
/// divides it by s.
SyntheticLayerState quantize_synthetic_layer(const Pipeline& pipeline, const WorkloadCache::Prepared& wl,
                                             const WorkloadCache::Prepared::Layer& layer, Index li, RunRecord& rec) {
  SyntheticLayerState ls{layer.W, VectorD::Ones(layer.W.cols()), layer.H, layer.stats,
                         initial_layer_row(pipeline.run(), layer.name), nullptr, std::nullopt, nullptr, ActClip{}};
  InputGroupState g;
  g.input_name = layer.name + ".input";
  g.names = {layer.name};
  g.weights = {&ls.W};
  g.rows = {&ls.row};
  g.act = {&ls.act};
  g.codes = {&ls.codes};
  g.seed_streams = {static_cast<uint64_t>(li) * 131};
  g.H = &ls.H;
  g.S = &ls.stats;
  g.scale = &ls.s;
  g.absorbs_scale = true;
  g.transform = &ls.transform;
  g.X_calib = &layer.X_calib;
  g.act_clip = &ls.act_clip;
  apply_synthetic_importance(pipeline, wl, layer, ls, rec);
  for (std::size_t si = 0; si < pipeline.steps().size(); ++si) apply_step(pipeline, si, g, rec);
  return ls;
}

/// Evaluation of layer li on held-out tokens from every population: per-unit error and signal
/// sums into units, output metrics into the layer row.
void evaluate_synthetic_layer(const WorkloadCache::Prepared& wl, const WorkloadCache::Prepared::Layer& layer, Index li,
                              SyntheticLayerState& ls, UnitTable& units) {
  const Index n_units = static_cast<Index>(wl.unit_ids.size());
  const Matrix& W = ls.W;
  const VectorD& s = ls.s;
  const ActQuantSpec* act = ls.act;
  const ChannelStats& stats = ls.stats;
  LayerRow& row = ls.row;
  Matrix Xq = layer.X_eval;
  if (ls.transform) ls.transform->apply(Xq);
  if (s != VectorD::Ones(s.size())) Xq = Xq * s.cast<float>().cwiseInverse().asDiagonal();
  if (act) {
    ActRange range;
    if (act->mode == ActRangeMode::Static) {
      // Static ranges come from the calibration inputs in the transformed space.
      range.lo = stats.min();
      range.hi = stats.max();
    }
    fake_quant_activations(Xq, *act, act->mode == ActRangeMode::Static ? &range : nullptr,
                           ls.act_clip.identity() ? nullptr : &ls.act_clip);
  }
  const Matrix Yq = matmul_nt(Xq, W);
  const VectorD err = token_errors(Yq, layer.Y_ref);
  const Index T = wl.unit_tokens;
  for (Index u = 0; u < n_units; ++u) {
    units.sums(u, 1 + 2 * li) = err.segment(u * T, T).sum();
    units.sums(u, 2 + 2 * li) = layer.sig.segment(u * T, T).sum();
  }
  // The weights the FP input meets: W diag(1/s) Pᵀ (x ↦ (x P) / s).
  Matrix W_eff = W * s.cast<float>().cwiseInverse().asDiagonal();
  if (ls.transform) W_eff = matmul_nn(W_eff.cast<double>().eval(), MatrixD(ls.transform->matrix().transpose())).cast<float>();
  const double sum_err = err.sum(), sum_sig = layer.sig.sum();
  row.weight_mse = weight_mse(layer.W, W_eff);
  row.rel_err_h = relative_output_error(layer.W, W_eff, layer.H.hessian());
  row.rel_err_eval = sum_sig > 0 ? sum_err / sum_sig : std::numeric_limits<double>::quiet_NaN();
  row.out_mse = sum_err / static_cast<double>(Yq.size());
  row.sqnr_db = sqnr_db(layer.Y_ref, Yq);
  row.cosine = cosine_similarity(layer.Y_ref, Yq);
  row.max_abs = max_abs_error(layer.Y_ref, Yq);
}

/// Slice metrics over units (each a mean over layers of a per-layer ratio of sums; the FP
/// reference's outputs are the targets themselves, so its error is 0) and layer aggregates.
void synthetic_summary(const RunConfig& run, const WorkloadCache::Prepared& wl, RunRecord& rec) {
  UnitTable& units = rec.units;
  const Index L = static_cast<Index>(wl.layers.size());
  std::vector<double> d_out;
  for (auto& l : wl.layers) d_out.push_back(static_cast<double>(l.W.rows()));
  const Index nl = L;
  std::vector<SliceMetricDef> defs;
  defs.push_back({"out_rel_err", false,
                  [nl](const double* t) {
                    double a = 0;
                    for (Index l = 0; l < nl; ++l) a += t[1 + 2 * l] / t[2 + 2 * l];
                    return a / nl;
                  },
                  [](const double*) { return 0.0; }});
  defs.push_back({"out_mse", false,
                  [nl, d_out](const double* t) {
                    double a = 0;
                    for (Index l = 0; l < nl; ++l) a += t[1 + 2 * l] / (t[0] * d_out[l]);
                    return a / nl;
                  },
                  [](const double*) { return 0.0; }});
  defs.push_back({"out_sqnr_db", true,
                  [nl](const double* t) {
                    double a = 0;
                    for (Index l = 0; l < nl; ++l) a += 10.0 * detmath::log10(t[2 + 2 * l] / t[1 + 2 * l]);
                    return a / nl;
                  },
                  {}});
  SliceReport rep = evaluate_slices(units, defs, run.slices);
  rec.slices = std::move(rep.rows);
  rec.disparity = std::move(rep.disparity);
  for (auto& r : rec.slices)
    if (r.slice_key == "__all__")
      rec.summary.push_back({r.metric, r.value, r.ci_low, r.ci_high, r.delta});

  // Layer aggregates: bits per weight weighted by weight count, errors averaged over layers.
  double nw = 0, bits = 0, wmse = 0, relh = 0;
  for (std::size_t i = 0; i < rec.layers.size(); ++i) {
    const double n = static_cast<double>(wl.layers[i].W.size());
    nw += n;
    bits += rec.layers[i].bpw * n;
    wmse += rec.layers[i].weight_mse;
    relh += rec.layers[i].rel_err_h;
  }
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double nlay = static_cast<double>(rec.layers.size());
  rec.summary.push_back({"bpw", bits / nw, nan, nan, bits / nw - 16.0});
  rec.summary.push_back({"weight_mse", wmse / nlay, nan, nan, wmse / nlay});
  rec.summary.push_back({"rel_err_h", relh / nlay, nan, nan, relh / nlay});
}

/// The synthetic layer suite: every layer independent, evaluated on held-out tokens of every
/// population.
void execute_synthetic_run(const RunConfig& run, WorkloadCache& cache, const AlgorithmRegistry& registry,
                           RunRecord& rec, const std::function<void(const std::string&)>& on_layer) {
  std::shared_ptr<const WorkloadCache::Prepared> wl = cache.get(run, &rec.seconds_calib);
  const Pipeline pipeline(run, registry);
  UnitTable& units = rec.units;
  units.unit_ids = wl->unit_ids;
  units.attr_keys = {"population"};
  units.attrs = {wl->unit_population};
  units.columns = {"n_tokens"};
  for (auto& l : wl->layers) {
    units.columns.push_back("err/" + l.name);
    units.columns.push_back("sig/" + l.name);
  }
  units.sums = MatrixD::Zero(static_cast<Index>(wl->unit_ids.size()), units.columns.size());
  units.sums.col(0).setConstant(static_cast<double>(wl->unit_tokens));
  for (Index li = 0; li < static_cast<Index>(wl->layers.size()); ++li) {
    const auto& layer = wl->layers[li];
    if (on_layer) on_layer(layer.name);
    const auto t_q = std::chrono::steady_clock::now();
    SyntheticLayerState ls = quantize_synthetic_layer(pipeline, *wl, layer, li, rec);
    rec.seconds_quant += seconds_since(t_q);
    const auto t_e = std::chrono::steady_clock::now();
    evaluate_synthetic_layer(*wl, layer, li, ls, units);
    rec.layers.push_back(std::move(ls.row));
    rec.seconds_eval += seconds_since(t_e);
  }
  const auto t_s = std::chrono::steady_clock::now();
  synthetic_summary(run, *wl, rec);
  rec.seconds_eval += seconds_since(t_s);
}

}  // namespace

RunRecord execute_run(const RunConfig& run, WorkloadCache& cache, const AlgorithmRegistry& registry,
                      const std::function<void(const std::string&)>& on_layer) {
  RunRecord rec;
  rec.run_id = run.run_id;
  rec.label = run.label;
  rec.config_yaml = run.canonical.to_yaml();
  rec.code_revision = QL_GIT_REV;
  rec.started_at = utc_now();
  rec.seed = run.seed;
  rec.threads = num_threads();
  rec.params = flatten_params(run.canonical);
  for (auto& [k, v] : numeric_environment(run.numerics, rec.threads).fields)
    rec.numeric_env.push_back({k, v});
  // Run-level keys for pivoting tables: the experiment, the pipeline and its weight bits.
  rec.params.insert(rec.params.begin(),
                    {ParamRow{"experiment", run.experiment.empty() ? run.label : run.experiment},
                     ParamRow{"algorithm", run.pipeline_name()},
                     ParamRow{"wbits", std::to_string(run.weight_bits())},
                     ParamRow{"act", run.activation()}});
  const auto t_start = std::chrono::steady_clock::now();

  try {
    const NumericsScope numerics(run.numerics);
    if (run.workload.is_model())
      execute_model_run(run, cache.model(), registry, rec, on_layer);
    else
      execute_synthetic_run(run, cache, registry, rec, on_layer);
    rec.status = RunStatus::Ok;
  } catch (const std::exception& e) {
    rec.status = RunStatus::Failed;
    rec.message = e.what();
    rec.layers.clear();
    rec.diagnostics.clear();
    rec.summary.clear();
    rec.slices.clear();
    rec.disparity.clear();
    rec.units = UnitTable{};
  }
  rec.seconds_total = seconds_since(t_start);
  return rec;
}

// ------------------------------------------------------------------------------------------
// Sweeps
// ------------------------------------------------------------------------------------------

namespace {

/// Progress on stderr: a redrawn bar with ETA on a terminal, one plain line per run otherwise.
class Progress {
 public:
  Progress(std::ostream& os, bool tty, int total) : os_(os), tty_(tty), total_(total) {}
  void start(int index, const std::string& label) {
    index_ = index;
    label_ = label;
    draw("");
  }
  void layer(const std::string& name) { draw(name); }
  void finish(const RunRecord& r, bool skipped) {
    ++done_;
    if (!skipped) {
      ++computed_;
      seconds_ += r.seconds_total;
    }
    if (tty_) os_ << "\r\033[K";
    os_ << "[" << index_ + 1 << "/" << total_ << "] ";
    if (skipped)
      os_ << "stored  " << label_ << "\n";
    else if (r.status == RunStatus::Ok)
      os_ << "ok " << std::fixed << std::setprecision(2) << r.seconds_total << "s  " << label_ << "\n";
    else
      os_ << "FAILED  " << label_ << ": " << r.message << "\n";
    os_ << std::defaultfloat << std::flush;
  }

 private:
  void draw(const std::string& layer) {
    if (!tty_) return;
    const int width = 24;
    int filled = total_ ? width * done_ / total_ : width;
    std::string bar(filled, '#');
    bar += std::string(width - filled, '.');
    os_ << "\r\033[K[" << bar << "] " << done_ << "/" << total_ << " " << label_;
    if (!layer.empty()) os_ << " | " << layer;
    if (computed_ > 0) {
      double eta = seconds_ / computed_ * (total_ - done_);
      os_ << " | ETA " << static_cast<int>(eta) / 60 << ":" << std::setw(2) << std::setfill('0')
          << static_cast<int>(eta) % 60 << std::setfill(' ');
    }
    os_ << std::flush;
  }
  std::ostream& os_;
  bool tty_;
  int total_, done_ = 0, computed_ = 0, index_ = 0;
  double seconds_ = 0;
  std::string label_;
};

}  // namespace

SweepSummary run_sweep(const std::vector<RunConfig>& runs, const RunnerOptions& opts,
                       const AlgorithmRegistry& registry) {
  const ThreadCountGuard threads(opts.threads);
  SweepSummary sum;
  sum.total = static_cast<int>(runs.size());
  std::ostream& os = opts.progress ? *opts.progress : std::cerr;
  const bool tty = !opts.progress && isatty(STDERR_FILENO);
  std::ostringstream sink;
  Progress progress(opts.quiet ? static_cast<std::ostream&>(sink) : os, tty && !opts.quiet,
                    sum.total);

  std::map<std::string, std::unique_ptr<ResultStore>> stores;
  std::map<std::string, std::map<std::string, RunStatus>> statuses;
  WorkloadCache cache;
  // A checkpoint or text that cannot be read fails every run the same way: find out once,
  // before computing anything, and report it as one error.
  for (const RunConfig& run : runs)
    if (run.workload.is_model()) {
      preload_model_workload(run, cache.model());
      break;
    }
  for (int i = 0; i < sum.total; ++i) {
    const RunConfig& run = runs[i];
    const std::string path = opts.output.empty() ? run.output.path : opts.output;
    if (!stores.count(path)) {
      stores[path] = std::make_unique<ResultStore>(path);
      statuses[path] = stores[path]->run_statuses();
      sum.output_paths.push_back(path);
    }
    progress.start(i, run.label);
    auto st = statuses[path].find(run.run_id);
    if (st != statuses[path].end() && st->second == RunStatus::Ok) {
      ++sum.skipped;
      progress.finish(RunRecord{}, true);
      continue;
    }
    RunRecord rec = execute_run(run, cache, registry,
                                [&](const std::string& layer) { progress.layer(layer); });
    stores[path]->append(rec);
    statuses[path][run.run_id] = rec.status;
    if (rec.status == RunStatus::Ok) ++sum.ok;
    else ++sum.failed;
    progress.finish(rec, false);
  }
  return sum;
}

}  // namespace ql
