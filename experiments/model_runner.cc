#include "experiments/model_runner.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <limits>
#include <map>

#include <Eigen/Eigenvalues>

#include "core/calib_stats.h"
#include "core/error.h"
#include "core/hash.h"
#include "core/metrics.h"
#include "core/parallel.h"
#include "core/model/checkpoint.h"
#include "core/model/architecture.h"
#include "core/model/lm_eval.h"
#include "core/model/quantized_model.h"
#include "core/model/text_data.h"
#include "core/model/tokenizer.h"
#include "core/model/transformer.h"
#include "core/rng.h"
#include "experiments/pipeline.h"

namespace ql {

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// One evaluation text, tokenized and cut into windows once per sweep.
struct EvalData {
  EvalSet set;
  std::vector<std::vector<int32_t>> windows;
  std::vector<int> window_unit;           // resampling unit of each window
  std::vector<std::string> unit_ids;
  std::vector<std::string> attr_keys;     // design slice families (JSONL attributes)
  std::vector<std::vector<std::string>> attrs;  // attrs[k][unit]
  int64_t skipped_docs = 0;
};

/// Append `part` (one evaluation set's units) to `all`, tagging its units with key=value and
/// taking the union of slice families (absent attributes read "(none)"). Columns must agree.
void append_units(UnitTable& all, const UnitTable& part, const std::string& key,
                  const std::string& value) {
  if (all.unit_ids.empty() && all.columns.empty()) {
    all.columns = part.columns;
    all.token_column = part.token_column;
    all.attr_keys = {key};
    all.attrs = {{}};
    all.sums.resize(0, static_cast<Index>(part.columns.size()));
  }
  if (all.columns != part.columns) throw Error("evaluation sets produced different unit columns");
  for (auto& k : part.attr_keys)
    if (std::find(all.attr_keys.begin(), all.attr_keys.end(), k) == all.attr_keys.end()) {
      all.attr_keys.push_back(k);
      all.attrs.push_back(std::vector<std::string>(all.unit_ids.size(), "(none)"));
    }
  const Index n0 = static_cast<Index>(all.unit_ids.size()), n = part.n_units();
  for (Index u = 0; u < n; ++u) all.unit_ids.push_back(value + ":" + part.unit_ids[u]);
  for (std::size_t k = 0; k < all.attr_keys.size(); ++k) {
    auto it = std::find(part.attr_keys.begin(), part.attr_keys.end(), all.attr_keys[k]);
    for (Index u = 0; u < n; ++u) {
      if (k == 0) all.attrs[k].push_back(value);
      else if (it == part.attr_keys.end()) all.attrs[k].push_back("(none)");
      else all.attrs[k].push_back(part.attrs[it - part.attr_keys.begin()][u]);
    }
  }
  MatrixD sums(n0 + n, part.sums.cols());
  sums.topRows(n0) = all.sums;
  sums.bottomRows(n) = part.sums;
  all.sums = std::move(sums);
}

}  // namespace

struct ModelCache::State {
  std::string weights_key;
  std::shared_ptr<const ModelWeights> fp;
  std::shared_ptr<const Tokenizer> tokenizer;
  std::string calib_key;
  std::vector<std::vector<int32_t>> calib_windows;
  std::vector<int> calib_source;               // per window: index into calib_source_names
  std::vector<std::string> calib_source_names;
  std::string eval_key;
  std::vector<EvalData> eval;
  std::string freq_key;
  std::shared_ptr<const TokenBuckets> buckets;
  /// Tokenized streams by file path (calibration text, frequency corpus and evaluation streams
  /// are often the same files); cleared with the tokenizer.
  std::map<std::string, std::shared_ptr<const std::vector<int32_t>>> streams;

  std::string model_dir;

  /// The tokenizer is loaded on first use, so a checkpoint without a sentencepiece model
  /// still works with pre-tokenized inputs.
  const Tokenizer& tok() {
    if (!tokenizer) tokenizer = std::make_shared<const Tokenizer>(Tokenizer::load(model_dir));
    return *tokenizer;
  }
  const std::vector<int32_t>& stream(const std::string& path) {
    auto it = streams.find(path);
    if (it == streams.end())
      it = streams.emplace(path, std::make_shared<const std::vector<int32_t>>(stream_ids(path, tok()))).first;
    return *it->second;
  }
  /// A token-id file read as one stream: its documents (lines) concatenated in order.
  const std::vector<int32_t>& id_stream(const std::string& path) {
    const std::string key = "ids:" + path;
    auto it = streams.find(key);
    if (it == streams.end()) {
      std::vector<int32_t> all;
      for (auto& d : token_id_documents(path, fp->config.vocab_size))
        all.insert(all.end(), d.ids.begin(), d.ids.end());
      it = streams.emplace(key, std::make_shared<const std::vector<int32_t>>(std::move(all))).first;
    }
    return *it->second;
  }
};

ModelCache::ModelCache() : state_(std::make_unique<State>()) {}
ModelCache::~ModelCache() = default;

namespace {

/// One evaluation set tokenized and cut into windows, with its resampling units (documents,
/// or windows of a stream) and design attributes.
EvalData eval_data(const EvalSet& s, int64_t seq_len, ModelCache::State& st) {
  const int vocab = st.fp->config.vocab_size;
  EvalData d;
  d.set = s;
  std::vector<Window> wins;
  if (s.kind == EvalSetKind::Stream) {
    wins = stream_windows(st.stream(s.path), seq_len);
    if (s.max_windows > 0 && static_cast<long long>(wins.size()) > s.max_windows)
      wins.resize(static_cast<std::size_t>(s.max_windows));
    // A stream's resampling unit is its window (document boundaries are not tracked).
    for (std::size_t i = 0; i < wins.size(); ++i) d.unit_ids.push_back("w" + std::to_string(i));
  } else {
    std::vector<Document> docs = s.kind == EvalSetKind::Ids ? token_id_documents(s.path, vocab)
                                                 : jsonl_documents(s.path, st.tok());
    wins = document_windows(docs, seq_len, &d.skipped_docs);
    if (s.max_windows > 0 && static_cast<long long>(wins.size()) > s.max_windows)
      wins.resize(static_cast<std::size_t>(s.max_windows));
    for (auto& doc : docs)
      for (auto& [k, v] : doc.attrs)
        if (std::find(d.attr_keys.begin(), d.attr_keys.end(), k) == d.attr_keys.end())
          d.attr_keys.push_back(k);
    d.attrs.assign(d.attr_keys.size(), {});
    for (auto& doc : docs) {
      d.unit_ids.push_back(doc.id);
      for (std::size_t k = 0; k < d.attr_keys.size(); ++k) {
        std::string v = "(none)";
        for (auto& [key, val] : doc.attrs)
          if (key == d.attr_keys[k]) v = val;
        d.attrs[k].push_back(v);
      }
    }
  }
  if (s.kind != EvalSetKind::Stream) {
    // Units are the documents that have at least one window (skipped or cut-off documents
    // would otherwise count as empty clusters).
    std::vector<int> remap(d.unit_ids.size(), -1);
    std::vector<std::string> ids;
    std::vector<std::vector<std::string>> attrs(d.attr_keys.size());
    for (auto& w : wins)
      if (remap[w.doc] < 0) {
        remap[w.doc] = static_cast<int>(ids.size());
        ids.push_back(d.unit_ids[w.doc]);
        for (std::size_t k = 0; k < attrs.size(); ++k) attrs[k].push_back(d.attrs[k][w.doc]);
      }
    for (auto& w : wins) w.doc = remap[w.doc];
    d.unit_ids = std::move(ids);
    d.attrs = std::move(attrs);
  }
  for (auto& w : wins) {
    for (int32_t id : w.ids)
      if (id < 0 || id >= vocab)
        throw ShapeError(s.path + ": token id " + std::to_string(id) + " outside the model's vocabulary of " +
                         std::to_string(vocab));
    d.window_unit.push_back(w.doc);
    d.windows.push_back(std::move(w.ids));
  }
  return d;
}

/// A calibration mixture: n_samples windows split over the sources by their shares, each
/// source's windows drawn by the run's rule from its own text (random offsets from a seed of
/// their own per source), then interleaved so every stretch holds the mixture's proportions.
void mixture_windows(const CalibConfig& c, ModelCache::State& st) {
  std::vector<double> shares;
  for (const CalibSource& s : c.sources) shares.push_back(s.share);
  const std::vector<int> counts = mixture_counts(shares, c.n_samples);
  std::vector<std::vector<std::vector<int32_t>>> per(c.sources.size());
  st.calib_source_names.clear();
  for (std::size_t k = 0; k < c.sources.size(); ++k) {
    const CalibSource& s = c.sources[k];
    st.calib_source_names.push_back(s.name);
    const std::vector<int32_t>& ids = s.ids.empty() ? st.stream(s.text) : st.id_stream(s.ids);
    per[k] = calibration_windows(ids, counts[k], c.seq_len, c.rule, mix_stream(static_cast<uint64_t>(c.seed), k + 1),
                                 CalibDraw{c.draw, c.draws});
  }
  st.calib_windows.clear();
  st.calib_source.clear();
  std::vector<std::size_t> next(c.sources.size(), 0);
  for (int k : mixture_order(counts)) {
    st.calib_windows.push_back(std::move(per[static_cast<std::size_t>(k)][next[static_cast<std::size_t>(k)]++]));
    st.calib_source.push_back(k);
  }
}

void prepare(const RunConfig& run, ModelCache::State& st, double* seconds) {
  auto t0 = std::chrono::steady_clock::now();
  const ModelWorkload& mw = run.workload.model;
  if (st.weights_key != mw.path) {
    st.fp.reset();
    st.fp = std::make_shared<const ModelWeights>(load_checkpoint(mw.path));
    st.tokenizer.reset();
    st.model_dir = mw.path;
    st.weights_key = mw.path;
    st.streams.clear();
    st.calib_key.clear();
    st.eval_key.clear();
    st.freq_key.clear();
  }
  if (!mw.architecture.empty() && st.fp->config.architecture != mw.architecture)
    throw ConfigError({}, "workload.architecture",
                      "expected the checkpoint at " + mw.path + " to be " + mw.architecture +
                          ", found " + st.fp->config.architecture,
                      run.label);
  const int vocab = st.fp->config.vocab_size;

  const CalibConfig& c = run.calib;
  std::string calib_key = c.text + "|" + c.ids + "|" + std::to_string(c.n_samples) + "|" +
                          std::to_string(c.seq_len) + "|" + std::to_string(c.seed) + "|" + std::to_string(static_cast<int>(c.rule)) + "|" +
                          std::to_string(c.draw) + "/" + std::to_string(c.draws);
  for (const CalibSource& s : c.sources) calib_key += "|" + s.name + ":" + s.text + ":" + s.ids + ":" + format_double(s.share);
  if (st.calib_key != calib_key) {
    if (c.sources.empty()) {
      st.calib_windows = calibration_windows(c.ids.empty() ? st.stream(c.text) : st.id_stream(c.ids), c.n_samples,
                                             c.seq_len, c.rule, static_cast<uint64_t>(c.seed), CalibDraw{c.draw, c.draws});
      st.calib_source.assign(st.calib_windows.size(), 0);
      st.calib_source_names = {c.ids.empty() ? c.text : c.ids};
    } else {
      mixture_windows(c, st);
    }
    st.calib_key = calib_key;
  }

  const EvalConfig& e = run.eval;
  std::string freq_key = e.freq_corpus + (e.freq_corpus_is_ids ? "|ids|" : "|");
  for (auto r : e.rank_edges) freq_key += std::to_string(r) + ",";
  if (st.freq_key != freq_key) {
    std::vector<int64_t> edges(e.rank_edges.begin(), e.rank_edges.end());
    st.buckets = std::make_shared<const TokenBuckets>(
        TokenBuckets::from_corpus(e.freq_corpus_is_ids ? st.id_stream(e.freq_corpus) : st.stream(e.freq_corpus),
                                  vocab, edges));
    st.freq_key = freq_key;
  }

  std::string eval_key = std::to_string(e.seq_len) + "|";
  for (auto& s : e.sets) eval_key += std::string(eval_set_kind_name(s.kind)) + ":" + s.name + ":" + s.path + ":" + std::to_string(s.max_windows) + ";";
  if (st.eval_key != eval_key) {
    st.eval.clear();
    for (const EvalSet& s : e.sets) st.eval.push_back(eval_data(s, e.seq_len, st));
    st.eval_key = eval_key;
  }
  if (seconds) *seconds = seconds_since(t0);
}

}  // namespace

void preload_model_workload(const RunConfig& run, ModelCache& cache) {
  prepare(run, cache.state(), nullptr);
}

namespace {

/// Calibration statistics of one block's inputs, one entry per input group of the architecture
/// table: H and S of x' (the transformed input, updated by norm->consumers steps), the FP
/// Hessians the layer rows measure errors under, and the cumulative channel scale s.
struct BlockStats {
  std::vector<HessianAccumulator> H, H_fp;
  std::vector<ChannelStats> S;
  std::vector<VectorD> scale;
  /// Per window, one weight per token when a step weighs calibration tokens (VLMQ): H then
  /// accumulates Σ g_t x_t x_tᵀ / Σ g_t. Empty: every token weighs 1.
  std::vector<Vector> token_weights;
};

/// Everything one model run shares between its phases.
struct ModelRun {
  const RunConfig& run;
  const Architecture arch;
  const Pipeline pipeline;
  QuantizedModel model;
  RunRecord& rec;
  /// Per block and input group: the cumulative channel scale s folded into the consumers
  /// (x' = x / s), kept for re-measuring layer rows after model-scope steps.
  std::vector<std::vector<VectorD>> input_scale = {};
  /// The progress line's callback (may be empty): block plugins report training there.
  std::function<void(const std::string&)> on_progress = {};
  /// Per calibration window: index into calib_source_names (what token-importance plugins
  /// report per source).
  std::vector<int> calib_source = {};
  std::vector<std::string> calib_source_names = {};
};

/// Rows of calibration inputs stacked per statistics update: windows are taken whole until
/// a chunk holds at least this many rows, so each group's Hessian gets one SYRK per chunk
/// (tiles over many windows, not one window's 256 rows) and the chunk boundaries, hence the
/// bits, depend only on the window lengths, never on the thread count.
constexpr Index kCaptureRows = 4096;

/// The windows of one statistics update: [w0, w1), each starting at offset[w - w0] of the
/// chunk's rows.
struct CaptureChunk {
  std::size_t w0 = 0, w1 = 0;
  std::vector<Index> offset;
  Index rows = 0;
};

/// Windows taken whole, in order, until a chunk holds at least kCaptureRows rows.
std::vector<CaptureChunk> capture_chunks(const std::vector<Index>& window_rows) {
  std::vector<CaptureChunk> chunks;
  for (std::size_t w = 0; w < window_rows.size(); ++w) {
    if (chunks.empty() || chunks.back().rows >= kCaptureRows) chunks.push_back({w, w, {}, 0});
    CaptureChunk& c = chunks.back();
    c.offset.push_back(c.rows);
    c.rows += window_rows[w];
    c.w1 = w + 1;
  }
  return chunks;
}

/// Per-window hooks for windows [c.w0, c.w1) that copy the input of each wanted group's first
/// linear into rows [offset, offset + T) of X[g] (disjoint rows: no locks).
std::vector<ForwardHooks> chunk_capture_hooks(const ModelRun& m, const ForwardHooks* base, const CaptureChunk& c,
                                              const std::vector<bool>& want, std::vector<Matrix>& X) {
  const auto& groups = m.arch.input_groups();
  std::vector<ForwardHooks> per(c.w1 - c.w0, base ? *base : ForwardHooks{});
  for (std::size_t i = 0; i < per.size(); ++i)
    per[i].capture_input = [&m, &groups, &want, &X, off = c.offset[i]](int, LinearKind k, const Matrix& Xk) {
      const int g = m.arch.group_of(k);
      if (want[g] && groups[g].members.front() == k) X[g].middleRows(off, Xk.rows()) = Xk;
    };
  return per;
}

/// Adds one chunk's captured inputs X of group g to its Hessian: with token weights, each row
/// weighs its token's g_t (the chunk's windows in order).
void add_to_hessian(BlockStats& st, int g, const CaptureChunk& c, const Matrix& X) {
  if (st.token_weights.empty()) {
    st.H[g].add(X);
    return;
  }
  Vector w(X.rows());
  Index r = 0;
  for (std::size_t win = c.w0; win < c.w1; ++win) {
    const Vector& tw = st.token_weights.at(win);
    w.segment(r, tw.size()) = tw;
    r += tw.size();
  }
  if (r != X.rows()) throw ShapeError("token weights do not cover the captured rows");
  st.H[g].add_weighted(X, w);
}

/// Resets the statistics of the wanted groups.
void reset_stats(const ModelRun& m, const std::vector<bool>& want, BlockStats& st) {
  for (std::size_t g = 0; g < want.size(); ++g)
    if (want[g]) {
      st.H[g] = HessianAccumulator(m.arch.input_width(static_cast<int>(g)));
      st.S[g] = ChannelStats(m.arch.input_width(static_cast<int>(g)));
    }
}

/// Phase 1, capture: statistics of the inputs of block b's linears over every calibration
/// window, for the groups `want` selects (the first member of a group is its capture point:
/// shared inputs are counted once). Runs block b with `weights` and `hooks` (activation
/// quantization) over the windows of each chunk at once (Transformer::block_batch); returns
/// the block's outputs in `outputs` when set. Memory: one chunk of captured inputs.
void capture_block(const ModelRun& m, const Transformer& tf, int b, const std::vector<Matrix>& h,
                   const DecoderBlock& weights, const ForwardHooks* hooks, const std::vector<bool>& want,
                   BlockStats& st, std::vector<Matrix>* outputs) {
  const int G = static_cast<int>(want.size());
  reset_stats(m, want, st);
  std::vector<Matrix> scratch;  // the chunk's outputs when the caller does not want them
  if (outputs) outputs->resize(h.size());
  std::vector<Index> rows;
  for (const Matrix& x : h) rows.push_back(x.rows());
  std::vector<Matrix> X(G);
  for (const CaptureChunk& c : capture_chunks(rows)) {
    for (int g = 0; g < G; ++g)
      if (want[g]) X[g].resize(c.rows, m.arch.input_width(g));
    const std::vector<ForwardHooks> per = chunk_capture_hooks(m, hooks, c, want, X);
    scratch.resize(outputs ? 0 : c.w1 - c.w0);
    std::vector<Matrix*> io;
    for (std::size_t w = c.w0; w < c.w1; ++w) {
      io.push_back(outputs ? &(*outputs)[w] : &scratch[w - c.w0]);
      *io.back() = h[w];
    }
    tf.block_batch(b, io, per, &weights);
    for (int g = 0; g < G; ++g)
      if (want[g]) {
        add_to_hessian(st, g, c, X[g]);
        if (m.pipeline.needs_channel_stats()) st.S[g].add(X[g]);
      }
  }
}

/// Statistics of stage g's input in every window's staged state (what group g's first linear
/// would multiply after its input hooks), chunk by chunk as capture_block.
void capture_stage(const ModelRun& m, const Transformer& tf, int b, int g, std::vector<BlockStageState>& state,
                   BlockStats& st) {
  std::vector<bool> want(m.arch.input_groups().size(), false);
  want[g] = true;
  reset_stats(m, want, st);
  std::vector<Index> rows;
  for (const BlockStageState& s : state) rows.push_back(s.h.rows());
  std::vector<Matrix> X(want.size());
  const ForwardHooks hooks = m.model.hooks();
  for (const CaptureChunk& c : capture_chunks(rows)) {
    X[g].resize(c.rows, m.arch.input_width(g));
    const std::vector<ForwardHooks> per = chunk_capture_hooks(m, &hooks, c, want, X);
    std::vector<BlockStageState*> ws;
    for (std::size_t w = c.w0; w < c.w1; ++w) ws.push_back(&state[w]);
    tf.block_stage_inputs(b, g, ws, per);
    add_to_hessian(st, g, c, X[g]);
    if (m.pipeline.needs_channel_stats()) st.S[g].add(X[g]);
  }
}

/// The pipeline's view of group g of block b.
InputGroupState group_state(ModelRun& m, int b, int g, BlockStats& st, std::array<LayerRow, kLinearKinds>& rows) {
  const InputGroup& grp = m.arch.input_groups()[g];
  DecoderBlock& blk = m.model.block(b);
  InputGroupState s;
  s.input_name = grp.norm ? m.arch.norm_name(b, g) : linear_name(b, grp.members.front()) + ".input";
  for (LinearKind k : grp.members) {
    const int ki = static_cast<int>(k);
    s.names.push_back(linear_name(b, k));
    s.weights.push_back(&blk.linear(k).W);
    s.rows.push_back(&rows[ki]);
    s.act.push_back(&m.model.act(b, k).spec);
    s.codes.push_back(&m.model.codes(b, k));
    s.seed_streams.push_back(static_cast<uint64_t>(b) * 64 + static_cast<uint64_t>(ki) * 8);
  }
  s.H = &st.H[g];
  s.S = &st.S[g];
  s.scale = &st.scale[g];
  s.norm = grp.norm ? &norm_weight(blk, grp) : nullptr;
  s.absorbs_scale = grp.norm != nullptr;
  if (!grp.norm && grp.scale_rows) {
    Linear& producer = blk.linear(*grp.scale_rows);
    s.producer_rows = &producer.W;
    s.producer_bias = &producer.b;
    s.producer_codes = &m.model.codes(b, *grp.scale_rows);
  }
  return s;
}

/// Phase 2a: the block-scope steps of block b (transforms merged and installed), given the
/// block's inputs h and the FP block's outputs on them when a plugin needs them. When any
/// applied, the statistics of every input are captured again, now of the transformed inputs
/// the later steps quantize for (the FP Hessians of the layer rows stay in the original space).
void apply_block_steps(ModelRun& m, int b, const std::vector<Matrix>& h, const std::vector<Matrix>& fp_out,
                       BlockStats& st) {
  // The first KV-cache step of this block's attention, which a trained block step simulates.
  bool kv_quantized = false;
  std::optional<ScalarKvSpec> kv_grid;
  const std::string attn_name = "model.layers." + std::to_string(b) + ".self_attn";
  for (const PipelineStep& ps : m.pipeline.steps())
    if (ps.scope() == Scope::KvCache && !kv_quantized) {
      kv_quantized = true;
      if (ps.applies_to(attn_name)) kv_grid = dynamic_cast<const KvCacheAlgorithm&>(ps.plugin()).scalar_grid();
    }
  bool changed = false;
  for (std::size_t si = 0; si < m.pipeline.steps().size(); ++si) {
    const PipelineStep& ps = m.pipeline.steps()[si];
    BlockInput in;
    in.block = b;
    in.name = "model.layers." + std::to_string(b);
    if (ps.scope() != Scope::Block || !ps.applies_to(in.name)) continue;
    in.arch = &m.arch;
    in.config = &m.model.config();
    in.weights = &m.model.block(b);
    in.kv_quantized = kv_quantized;
    in.kv_grid = kv_grid;
    in.seed = mix_stream(m.pipeline.seed(), static_cast<uint64_t>(b) * 64 + 62);
    if (ps.needs().block_io) {
      in.inputs = &h;
      in.targets = &fp_out;
    }
    if (m.on_progress)
      in.progress = [&m, b](const std::string& what) { m.on_progress("block " + std::to_string(b) + " | " + what); };
    const auto& steps = m.pipeline.steps();
    for (std::size_t j = si + 1; j < steps.size() && !in.weight_spec; ++j)
      if (steps[j].config().weight.bits < 16) in.weight_spec = &steps[j].config().weight;
    for (std::size_t j = si; j < steps.size() && !in.act_spec; ++j)
      if (steps[j].config().act.quantized()) in.act_spec = &steps[j].config().act;
    BlockResult r = dynamic_cast<const BlockAlgorithm&>(ps.plugin()).run(in);
    m.model.apply_transforms(b, r.transforms);
    for (int s = 0; s < kTransformSlots; ++s) {
      if (!r.transforms.slot[s]) continue;
      const std::string key = in.name + ".transform." + m.arch.transform_slots()[s].name;
      m.rec.params.push_back({key, r.transforms.slot[s]->describe()});
      const std::string& folded = m.model.scale_folded_into(b, static_cast<TransformSlot>(s));
      if (!folded.empty()) m.rec.params.push_back({key + ".scale_folded_into", folded});
    }
    for (auto& [name, value] : r.diagnostics)
      m.rec.diagnostics.push_back({in.name, static_cast<int>(si), ps.config().algorithm, name, value});
    m.rec.diagnostics.push_back({in.name, static_cast<int>(si), ps.config().algorithm, "seconds", r.seconds});
    changed = changed || !r.transforms.empty();
  }
  if (!changed) return;
  const Transformer tf = m.model.transformer();
  const ForwardHooks hooks = m.model.hooks();
  capture_block(m, tf, b, h, m.model.block(b), &hooks, std::vector<bool>(m.arch.input_groups().size(), true), st,
                nullptr);
}

/// Condition number of H + 0.01 mean(diag H) I (eigenvalues in double).
double damped_condition(const HessianAccumulator& acc) {
  MatrixD H = acc.hessian().cast<double>();
  const double lambda = 0.01 * H.diagonal().mean();
  H.diagonal().array() += lambda;
  const Eigen::SelfAdjointEigenSolver<MatrixD> es(H, Eigen::EigenvaluesOnly);
  const VectorD& ev = es.eigenvalues();
  return ev.maxCoeff() / std::max(ev.minCoeff(), 1e-300);
}

/// Phase 2a': the first layer step that weighs calibration tokens (VLMQ) computes block b's
/// token importance from its inputs h and the FP block's outputs on them; the block's Hessians
/// are then captured again as Σ g_t x_t x_tᵀ / Σ g_t for every later step.
void apply_token_importance(ModelRun& m, int b, const std::vector<Matrix>& h, const std::vector<Matrix>& fp_out,
                            BlockStats& st) {
  for (std::size_t si = 0; si < m.pipeline.steps().size(); ++si) {
    const PipelineStep& ps = m.pipeline.steps()[si];
    TokenImportanceInput in;
    in.block = b;
    in.name = "model.layers." + std::to_string(b);
    if (ps.scope() != Scope::Layer || !ps.needs().token_importance) continue;
    in.config = &m.model.config();
    in.weights = &m.model.block(b);
    in.inputs = &h;
    in.targets = &fp_out;
    in.spec = ps.config().weight;
    in.window_source = m.calib_source;
    in.source_names = m.calib_source_names;
    const auto t0 = std::chrono::steady_clock::now();
    TokenImportance r = dynamic_cast<const LayerAlgorithm&>(ps.plugin()).token_importance(in);
    const std::string& alg = ps.config().algorithm;
    for (auto& [name, value] : r.diagnostics) m.rec.diagnostics.push_back({in.name, static_cast<int>(si), alg, name, value});
    st.token_weights = std::move(r.weights);
    const std::vector<HessianAccumulator> unweighted = st.H;
    const Transformer tf = m.model.transformer();
    const ForwardHooks hooks = m.model.hooks();
    capture_block(m, tf, b, h, m.model.block(b), &hooks, std::vector<bool>(m.arch.input_groups().size(), true), st,
                  nullptr);
    // §8.5: a g with a large dynamic range leaves few effective tokens and an ill-conditioned
    // H̃; report cond(H̃)/cond(H) per input group, both damped by 1% of their mean diagonal
    // (GPTQ's default percdamp, without which a dead channel makes both infinite).
    for (std::size_t g = 0; g < st.H.size(); ++g)
      m.rec.diagnostics.push_back({in.name + "." + m.arch.input_groups()[g].name, static_cast<int>(si), alg,
                                   "cond_ratio", damped_condition(st.H[g]) / damped_condition(unweighted[g])});
    m.rec.diagnostics.push_back({in.name, static_cast<int>(si), alg, "importance_seconds", seconds_since(t0)});
    return;
  }
}

/// Static activation ranges of group g's linears from its calibration inputs (after its
/// transforms), recorded so a reader can check the evaluation used exactly these ranges.
void set_static_ranges(ModelRun& m, int b, int g, const BlockStats& st) {
  for (LinearKind k : m.arch.input_groups()[g].members) {
    ActQuantizer& a = m.model.act(b, k);
    a.range = ActRange{st.S[g].min(), st.S[g].max()};
    if (a.active() && a.spec->mode == ActRangeMode::Static) {
      const std::string name = linear_name(b, k);
      m.rec.diagnostics.push_back({name, -1, "act", "static_range_lo", a.range.lo});
      m.rec.diagnostics.push_back({name, -1, "act", "static_range_hi", a.range.hi});
    }
  }
}

void apply_group(ModelRun& m, int b, int g, BlockStats& st, std::array<LayerRow, kLinearKinds>& rows) {
  for (std::size_t si = 0; si < m.pipeline.steps().size(); ++si) {
    InputGroupState gs = group_state(m, b, g, st, rows);
    apply_step(m.pipeline, si, gs, m.rec);
  }
  set_static_ranges(m, b, g, st);
}

/// Phase 2, apply: the pipeline on block b, whole, or with calib.true_sequential group by
/// group (q/k/v, o, gate/up, down) in one staged pass over the calibration windows
/// (Transformer::block_stage): each group's inputs are captured from the block with its
/// earlier groups already quantized (GPTQ's --true-sequential), then the group is quantized and
/// its stage run, so no stage is computed twice. The staged pass leaves the block's outputs
/// with every group quantized in `staged` (empty on the whole-block path).
void apply_block(ModelRun& m, int b, const std::vector<Matrix>& h, BlockStats& st,
                 std::array<LayerRow, kLinearKinds>& rows, std::vector<Matrix>& staged) {
  const int G = static_cast<int>(m.arch.input_groups().size());
  staged.clear();
  if (!m.run.calib.true_sequential) {
    for (std::size_t si = 0; si < m.pipeline.steps().size(); ++si)
      for (int g = 0; g < G; ++g) {
        InputGroupState gs = group_state(m, b, g, st, rows);
        apply_step(m.pipeline, si, gs, m.rec);
      }
    for (int g = 0; g < G; ++g) set_static_ranges(m, b, g, st);
    return;
  }
  if (G != kBlockStages)
    throw Error("true-sequential calibration needs one block stage per input group (" + std::to_string(G) +
                " groups, " + std::to_string(kBlockStages) + " stages)");
  const Transformer tf = m.model.transformer();  // reads block b's weights as each stage runs
  std::vector<BlockStageState> state(h.size());
  std::vector<BlockStageState*> all;
  for (std::size_t w = 0; w < h.size(); ++w) {
    tf.block_stage_begin(b, h[w], state[w]);
    all.push_back(&state[w]);
  }
  for (int g = 0; g < G; ++g) {
    // Group 0's inputs do not depend on the block's weights: the capture phase has them.
    if (g > 0) capture_stage(m, tf, b, g, state, st);
    apply_group(m, b, g, st, rows);
    tf.block_stage(b, g, all, std::vector<ForwardHooks>(h.size(), m.model.hooks()));
  }
  for (BlockStageState& s : state) staged.push_back(std::move(s.h));
}

/// Calibration keys (pre- and post-RoPE) and values of block b with its current weights and
/// activation quantizers, every window stacked.
struct KvCapture {
  Matrix k_pre, k_post, v, q;
  std::vector<Index> window_rows;
};
KvCapture capture_kv(const ModelRun& m, int b, const std::vector<Matrix>& h) {
  const Transformer tf = m.model.transformer();
  std::vector<Matrix> kp(h.size()), ko(h.size()), vs(h.size()), qs(h.size()), out(h);
  ForwardHooks hooks = m.model.hooks();
  hooks.kv_quantizer = nullptr;  // the exact K/V the block produces
  std::vector<ForwardHooks> per(h.size(), hooks);
  std::vector<Matrix*> io;
  Index rows = 0;
  for (std::size_t w = 0; w < h.size(); ++w) {
    per[w].kv = [&, w](int, KvStage stage, Matrix& K, Matrix& V) {
      (stage == KvStage::PreRope ? kp[w] : ko[w]) = K;
      vs[w] = V;
    };
    // The queries as attention uses them (after RoPE and any online q/k transform).
    per[w].transform_qk = [&, w, base = hooks.transform_qk](int blk, Matrix& Q, Matrix& K) {
      if (base) base(blk, Q, K);
      qs[w] = Q;
    };
    io.push_back(&out[w]);
    rows += h[w].rows();
  }
  tf.block_batch(b, io, per);
  KvCapture c{Matrix(rows, m.arch.heads().kv_dim()), Matrix(rows, m.arch.heads().kv_dim()),
              Matrix(rows, m.arch.heads().kv_dim()), Matrix(rows, m.arch.heads().q_dim()), {}};
  for (std::size_t i = 0, r = 0; i < h.size(); r += kp[i].rows(), ++i) {
    c.k_pre.middleRows(r, kp[i].rows()) = kp[i];
    c.k_post.middleRows(r, ko[i].rows()) = ko[i];
    c.v.middleRows(r, vs[i].rows()) = vs[i];
    c.q.middleRows(r, qs[i].rows()) = qs[i];
    c.window_rows.push_back(kp[i].rows());
  }
  return c;
}

/// Phase 2b: the KV-cache steps of block b, after its weight steps (so calibration K/V, when a
/// plugin needs them, come from the block as quantized so far). Captures only when needed.
void apply_kv_steps(ModelRun& m, int b, const std::vector<Matrix>& h) {
  KvCapture cap;
  bool captured = false;
  for (std::size_t si = 0; si < m.pipeline.steps().size(); ++si) {
    const PipelineStep& ps = m.pipeline.steps()[si];
    if (ps.scope() != Scope::KvCache) continue;
    KvCacheInput in;
    in.block = b;
    in.name = "model.layers." + std::to_string(b) + ".self_attn";
    in.heads = m.arch.heads();
    in.rope = m.arch.rope();
    in.seed = mix_stream(m.pipeline.seed(), static_cast<uint64_t>(b) * 64 + 63 + si);
    in.key_clip = m.model.transforms(b).key_clip;
    in.value_clip = m.model.transforms(b).value_clip;
    if (ps.needs().kv && ps.applies_to(in.name)) {
      if (!captured) cap = capture_kv(m, b, h);
      captured = true;
      in.keys_pre_rope = &cap.k_pre;
      in.keys_post_rope = &cap.k_post;
      in.values = &cap.v;
      in.queries = &cap.q;
      in.window_rows = cap.window_rows;
    }
    apply_kv_step(m.pipeline, si, in, m.run.eval.seq_len, m.model.kv_slot(b), m.rec);
  }
}

/// The weight-space metrics of linear `kind` of block b into row (rel_err_h under H when given,
/// else NaN): errors of the effective weights W' diag(1/s) mapped back through the block's
/// transforms, against the FP weights.
void measure_row(const ModelRun& m, int b, LinearKind kind, const std::vector<VectorD>& scales, const Matrix* H,
                 LayerRow& row) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const Matrix& W0 = m.model.fp_block(b).linear(kind).W;
  // Channel scales act in the transformed space (block transforms come first in a pipeline):
  // columns over the scale of this linear's input, rows times the scale of an input whose
  // scale folded into this linear's rows (AWQ's up rows for down's input).
  Matrix W = m.model.block(b).linear(kind).W * scales.at(m.arch.group_of(kind)).cwiseInverse().cast<float>().asDiagonal();
  for (std::size_t g = 0; g < m.arch.input_groups().size(); ++g)
    if (m.arch.input_groups()[g].scale_rows == kind && !m.arch.input_groups()[g].norm)
      W = scales.at(g).cast<float>().asDiagonal() * W;
  const Matrix W_eff = m.model.effective_weight(b, kind, W);
  row.weight_mse = weight_mse(W0, W_eff);
  row.rel_err_h = H ? relative_output_error(W0, W_eff, *H) : nan;
  row.rel_err_eval = row.out_mse = row.max_abs = nan;
  row.sqnr_db = sqnr_db(W0, W_eff);
  row.cosine = cosine_similarity(W0, W_eff);
}

/// Layer rows of block b under the FP block's calibration Hessians. Output errors on
/// evaluation inputs are measured end to end (slices), not per linear.
void record_block_rows(ModelRun& m, int b, const BlockStats& st, std::array<LayerRow, kLinearKinds>& rows) {
  std::vector<Matrix> H;  // one symmetric copy per input group, shared by its members
  for (const HessianAccumulator& acc : st.H_fp) H.push_back(acc.hessian());
  for (int k = 0; k < kLinearKinds; ++k) {
    const LinearKind kind = static_cast<LinearKind>(k);
    const int g = m.arch.group_of(kind);
    measure_row(m, b, kind, st.scale, &H[g], rows[k]);
    m.rec.layers.push_back(rows[k]);
  }
  m.input_scale.push_back(st.scale);
}

/// Phase 3b, model: the model-scope steps on the whole quantized model, after every block.
/// Rows of linears whose weights they changed are measured again in weight space; their
/// rel_err_h becomes NaN (the blocks' calibration Hessians are gone) and their grid is what
/// the codes left by the step say. Returns the seconds spent in the plugins.
double apply_model_steps(ModelRun& m, const std::vector<std::vector<int32_t>>& windows) {
  bool any = false;
  for (const PipelineStep& ps : m.pipeline.steps()) any = any || ps.scope() == Scope::Model;
  if (!any) return 0.0;
  auto fingerprint = [&](int b, LinearKind k) {
    const Matrix& W = m.model.block(b).linear(k).W;
    return fnv1a64(std::string_view(reinterpret_cast<const char*>(W.data()), sizeof(float) * static_cast<std::size_t>(W.size())));
  };
  std::vector<uint64_t> before;
  for (int b = 0; b < m.model.num_blocks(); ++b)
    for (int k = 0; k < kLinearKinds; ++k) before.push_back(fingerprint(b, static_cast<LinearKind>(k)));
  ModelInput in;
  in.model = &m.model;
  in.windows = &windows;
  if (m.on_progress) in.progress = m.on_progress;
  double seconds = 0;
  for (std::size_t si = 0; si < m.pipeline.steps().size(); ++si) seconds += apply_model_step(m.pipeline, si, in, m.rec).seconds;
  for (int b = 0; b < m.model.num_blocks(); ++b)
    for (int k = 0; k < kLinearKinds; ++k) {
      const LinearKind kind = static_cast<LinearKind>(k);
      const std::size_t i = static_cast<std::size_t>(b) * kLinearKinds + static_cast<std::size_t>(k);
      if (fingerprint(b, kind) == before[i]) continue;
      LayerRow& row = m.rec.layers.at(i);
      measure_row(m, b, kind, m.input_scale.at(b), nullptr, row);
      const auto& codes = m.model.codes(b, kind);
      row.bits = codes ? codes->spec.bits : 16;
      row.scheme = codes ? scheme_name(codes->spec.scheme) : "none";
      row.group_size = codes ? layer_group_size(codes->spec) : 0;
      row.bpw = codes ? bits_per_weight(*codes) : 16.0;
    }
  return seconds;
}

/// Phases 1-3 over all blocks: capture -> apply -> propagate (block b+1 reads the quantized
/// block's outputs, or the FP block's under calib.propagate: fp). Memory: one block's
/// activations for all calibration windows. Returns the seconds spent in phase 2.
double calibrate_and_quantize(ModelRun& m, const std::vector<std::vector<int32_t>>& windows,
                              const std::function<void(const std::string&)>& on_layer) {
  const Transformer fp_model = m.model.fp_transformer();
  const int G = static_cast<int>(m.arch.input_groups().size());
  std::vector<Matrix> h;  // the residual stream entering the current block, per window
  h.reserve(windows.size());
  for (auto& w : windows) h.push_back(fp_model.embed(w));
  double quant_seconds = 0;
  m.on_progress = on_layer;
  for (int b = 0; b < m.model.num_blocks(); ++b) {
    if (on_layer) on_layer("block " + std::to_string(b));
    BlockStats st;
    st.H.resize(G);
    st.S.resize(G);
    for (int g = 0; g < G; ++g) st.scale.push_back(VectorD::Ones(m.arch.input_width(g)));
    // The FP block's statistics; the same pass gives its outputs (block b+1's inputs under
    // propagate: fp). Earlier blocks' changes reach it through h only.
    std::vector<Matrix> next(h.size());
    capture_block(m, fp_model, b, h, m.model.block(b), nullptr, std::vector<bool>(G, true), st, &next);
    st.H_fp = st.H;

    const auto t_q = std::chrono::steady_clock::now();
    std::array<LayerRow, kLinearKinds> rows;
    for (int k = 0; k < kLinearKinds; ++k) rows[k] = initial_layer_row(m.run, linear_name(b, static_cast<LinearKind>(k)));
    apply_block_steps(m, b, h, next, st);
    apply_token_importance(m, b, h, next, st);
    std::vector<Matrix> staged;
    apply_block(m, b, h, st, rows, staged);
    apply_kv_steps(m, b, h);
    record_block_rows(m, b, st, rows);
    quant_seconds += seconds_since(t_q);

    // The staged pass already ran the quantized block, unless a KV-cache quantizer (fitted
    // after it) changes what attention reads.
    if (m.run.calib.propagate == Propagate::Quantized && !staged.empty() && !m.model.kv_quantizer(b)) {
      next = std::move(staged);
    } else if (m.run.calib.propagate == Propagate::Quantized && b + 1 < m.model.num_blocks()) {
      const Transformer q_model = m.model.transformer();
      const ForwardHooks act = m.model.hooks();
      capture_block(m, q_model, b, h, m.model.block(b), &act, std::vector<bool>(G, false), st, &next);
    }
    h.swap(next);
  }
  return quant_seconds;
}

/// Phase 4, evaluate one set: FP and quantized logits window by window, LM metrics per unit,
/// slices and disparities into rec; returns the set's unit table.
UnitTable evaluate_set(const ModelRun& m, const EvalData& d, const TokenBuckets& buckets,
                       const std::function<void(const std::string&)>& on_layer) {
  const RunConfig& run = m.run;
  RunRecord& rec = m.rec;
  const bool identity = m.pipeline.is_identity();
  const Transformer fp_model = m.model.fp_transformer(), q_model = m.model.transformer();
  const ForwardHooks act = m.model.hooks();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  constexpr std::size_t kBatch = 16;  // windows whose logits are held at once (per model)
  if (on_layer) on_layer("eval " + d.set.name);
  LmEvalAccumulator acc(static_cast<int>(d.unit_ids.size()), buckets.names(),
                        [&buckets](int32_t t) { return buckets.bucket_of(t); },
                        position_bucket_names(), [](int64_t p) { return position_bucket(p); });
  for (std::size_t i0 = 0; i0 < d.windows.size(); i0 += kBatch) {
    const std::size_t i1 = std::min(d.windows.size(), i0 + kBatch);
    std::vector<std::vector<int32_t>> batch(d.windows.begin() + i0, d.windows.begin() + i1);
    // Without the FP pass (eval.kl: false) the quantized logits stand in for both sides;
    // only metrics of the quantized model alone are reported then.
    std::vector<Matrix> lq = identity ? fp_model.forward_batch(batch) : q_model.forward_batch(batch, &act);
    std::vector<Matrix> lf = identity || !run.eval.kl ? lq : fp_model.forward_batch(batch);
    // Scoring (two log-softmaxes and a KL per token) is as costly as a forward: spread it over
    // the threads; each window's result is stored under its index, so the totals do not
    // depend on the thread count.
    ParallelErrors errs;
    const long n = static_cast<long>(i1 - i0);
#pragma omp parallel for schedule(dynamic, 1)
    for (long j = 0; j < n; ++j)
      errs.run(j, [&] {
        const std::size_t i = i0 + static_cast<std::size_t>(j);
        acc.add_window(static_cast<int64_t>(i), d.window_unit[i], d.windows[i], lf[j], lq[j]);
      });
    errs.rethrow();
  }
  UnitTable units = acc.unit_table(d.unit_ids, d.attr_keys, d.attrs);
  std::vector<SliceMetricDef> defs = lm_metric_defs();
  if (!run.eval.kl && !identity) {
    std::vector<SliceMetricDef> own;
    for (auto& md : defs)
      if (md.name == "ppl" || md.name == "nll" || md.name == "acc") {
        md.reference = {};
        own.push_back(md);
      }
    defs = std::move(own);
  }
  SliceReport rep = evaluate_slices(units, defs, run.slices);
  const std::string prefix = d.set.name + "/";
  for (auto& r : rep.rows) {
    r.metric = prefix + r.metric;
    if (r.slice_key == "__all__") rec.summary.push_back({r.metric, r.value, r.ci_low, r.ci_high, r.delta});
    rec.slices.push_back(std::move(r));
  }
  for (auto& r : rep.disparity) {
    r.metric = prefix + r.metric;
    rec.disparity.push_back(std::move(r));
  }
  if (run.eval.kl || identity)
    for (auto& [name, value] : acc.kl_quantiles_overall()) rec.summary.push_back({prefix + name, value, nan, nan, value});
  rec.params.push_back({"eval." + d.set.name + ".scored_tokens", std::to_string(acc.scored_tokens())});
  rec.params.push_back({"eval." + d.set.name + ".windows", std::to_string(d.windows.size())});
  if (d.skipped_docs > 0)
    rec.params.push_back({"eval." + d.set.name + ".skipped_documents", std::to_string(d.skipped_docs)});
  return units;
}

/// The KV-cache steps' held-out error diagnostics (KvCacheAlgorithm::run) averaged over the
/// blocks that have them, as summary metrics kv_<name> (absent when no KV step measured them).
void summarize_kv_errors(RunRecord& rec) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (const char* name : {"key_rel_mse", "value_rel_mse", "attn_score_rel_err", "attn_top8_agreement"}) {
    double sum = 0;
    int n = 0;
    for (const auto& d : rec.diagnostics)
      if (d.name == name && d.layer.find("self_attn") != std::string::npos) {
        sum += d.value;
        ++n;
      }
    if (n > 0) rec.summary.push_back({std::string("kv_") + name, sum / n, nan, nan, nan});
  }
}

/// Whole-model weight summary over the layer rows, and the evaluation protocol.
void summarize(const ModelRun& m, const TokenBuckets& buckets) {
  RunRecord& rec = m.rec;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  double nw = 0, bits = 0, relh = 0;
  for (std::size_t i = 0; i < rec.layers.size(); ++i) {
    const LinearKind kind = static_cast<LinearKind>(i % kLinearKinds);
    const double n = static_cast<double>(m.model.fp_block(static_cast<int>(i / kLinearKinds)).linear(kind).W.size());
    nw += n;
    bits += rec.layers[i].bpw * n;
    relh += rec.layers[i].rel_err_h;
  }
  rec.summary.push_back({"bpw", bits / nw, nan, nan, bits / nw - 16.0});
  rec.summary.push_back({"rel_err_h", relh / rec.layers.size(), nan, nan, relh / rec.layers.size()});
  // KV-cache storage at the evaluation window length (16 = exact cache).
  const double kvb = m.model.kv_bits(m.run.eval.seq_len);
  rec.summary.push_back({"kv_bits", kvb, nan, nan, kvb - 16.0});
  summarize_kv_errors(rec);
  rec.params.push_back({"protocol",
                        "windows of eval.seq_len tokens, non-overlapping from 0; positions 1..len-1 scored from "
                        "their prefix; streams: BOS + documents joined by a blank line, last partial window "
                        "dropped, unit = window; jsonl: BOS + text per document, last partial window kept "
                        "when >= 2 tokens, unit = document; token_freq buckets ranked on eval.freq_corpus "
                        "(FNV-1a " + std::to_string(buckets.corpus_hash()) + ")"});
}

}  // namespace

void execute_model_run(const RunConfig& run, ModelCache& cache, const AlgorithmRegistry& registry,
                       RunRecord& rec, const std::function<void(const std::string&)>& on_layer,
                       const std::function<void(const QuantizedModel&)>& on_quantized) {
  ModelCache::State& st = cache.state();
  double prep_seconds = 0;
  prepare(run, st, &prep_seconds);
  ModelRun m{run, Architecture::of(st.fp->config),
             Pipeline(run, registry), QuantizedModel(st.fp), rec};
  m.pipeline.check_heads(m.arch.heads());
  m.calib_source = st.calib_source;
  m.calib_source_names = st.calib_source_names;

  // A mixture's windows per source, so results can be read against what calibration saw.
  if (!run.calib.sources.empty())
    for (std::size_t k = 0; k < st.calib_source_names.size(); ++k)
      rec.params.push_back({"calib.source." + st.calib_source_names[k] + ".windows",
                            std::to_string(std::count(st.calib_source.begin(), st.calib_source.end(), static_cast<int>(k)))});
  const auto t_cal = std::chrono::steady_clock::now();
  rec.seconds_quant = calibrate_and_quantize(m, st.calib_windows, on_layer);
  rec.seconds_quant += apply_model_steps(m, st.calib_windows);
  rec.seconds_calib = prep_seconds + seconds_since(t_cal) - rec.seconds_quant;
  if (on_quantized) on_quantized(m.model);

  const auto t_eval = std::chrono::steady_clock::now();
  UnitTable all_units;
  for (const EvalData& d : st.eval) append_units(all_units, evaluate_set(m, d, *st.buckets, on_layer), "set", d.set.name);
  rec.units = std::move(all_units);
  summarize(m, *st.buckets);
  rec.seconds_eval = seconds_since(t_eval);
}

}  // namespace ql
