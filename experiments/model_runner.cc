#include "experiments/model_runner.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <limits>
#include <map>

#include "core/calib_stats.h"
#include "core/error.h"
#include "core/metrics.h"
#include "core/parallel.h"
#include "core/model/checkpoint.h"
#include "core/model/fold.h"
#include "core/model/lm_eval.h"
#include "core/model/text_data.h"
#include "core/model/tokenizer.h"
#include "core/model/transformer.h"
#include "core/rng.h"

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

/// Inputs of a block's linears that share one input: the q/k/v projections read the
/// input-normed residual, gate/up the post-attention-normed residual; o and down read their
/// own inputs. `norm` is the RMSNorm weight that produces the shared input (where a
/// norm->consumers transform is folded), or null.
struct InputGroup {
  std::vector<LinearKind> members;
  bool has_norm = false;
  bool post_attn = false;
};
const std::vector<InputGroup>& input_groups() {
  static const std::vector<InputGroup> g = {
      {{LinearKind::Q, LinearKind::K, LinearKind::V}, true, false},
      {{LinearKind::O}, false, false},
      {{LinearKind::Gate, LinearKind::Up}, true, true},
      {{LinearKind::Down}, false, false}};
  return g;
}
int group_of_kind(LinearKind k) {
  switch (k) {
    case LinearKind::Q: case LinearKind::K: case LinearKind::V: return 0;
    case LinearKind::O: return 1;
    case LinearKind::Gate: case LinearKind::Up: return 2;
    case LinearKind::Down: return 3;
  }
  return 0;
}

/// Activation fake-quantization of one linear's input, with its static range when needed.
struct ActQuant {
  const ActQuantSpec* spec = nullptr;
  ActRange range;
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
  const std::string calib_key = c.text + "|" + c.ids + "|" + std::to_string(c.n_samples) + "|" +
                                std::to_string(c.seq_len) + "|" + std::to_string(c.seed) + "|" + c.rule + "|" +
                                std::to_string(c.draw) + "/" + std::to_string(c.draws);
  if (st.calib_key != calib_key) {
    st.calib_windows = calibration_windows(c.ids.empty() ? st.stream(c.text) : st.id_stream(c.ids), c.n_samples, c.seq_len,
                                           c.rule == "strided" ? CalibRule::Strided : CalibRule::Random,
                                           static_cast<uint64_t>(c.seed), CalibDraw{c.draw, c.draws});
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
  for (auto& s : e.sets) eval_key += s.kind + ":" + s.name + ":" + s.path + ":" + std::to_string(s.max_windows) + ";";
  if (st.eval_key != eval_key) {
    st.eval.clear();
    for (const EvalSet& s : e.sets) {
      EvalData d;
      d.set = s;
      std::vector<Window> wins;
      if (s.kind == "stream") {
        wins = stream_windows(st.stream(s.path), e.seq_len);
        if (s.max_windows > 0 && static_cast<long long>(wins.size()) > s.max_windows)
          wins.resize(static_cast<std::size_t>(s.max_windows));
        // A stream's resampling unit is its window (document boundaries are not tracked).
        for (std::size_t i = 0; i < wins.size(); ++i) d.unit_ids.push_back("w" + std::to_string(i));
      } else {
        std::vector<Document> docs = s.kind == "ids" ? token_id_documents(s.path, vocab)
                                                     : jsonl_documents(s.path, st.tok());
        wins = document_windows(docs, e.seq_len, &d.skipped_docs);
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
      if (s.kind != "stream") {
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
      st.eval.push_back(std::move(d));
    }
    st.eval_key = eval_key;
  }
  if (seconds) *seconds = seconds_since(t0);
}

}  // namespace

void preload_model_workload(const RunConfig& run, ModelCache& cache) {
  prepare(run, cache.state(), nullptr);
}

void execute_model_run(const RunConfig& run, ModelCache& cache, const AlgorithmRegistry& registry,
                       RunRecord& rec, const std::function<void(const std::string&)>& on_layer) {
  ModelCache::State& st = cache.state();
  double prep_seconds = 0;
  prepare(run, st, &prep_seconds);
  const ModelWeights& fp = *st.fp;
  const ModelConfig& cfg = fp.config;
  const int L = cfg.num_layers;

  std::vector<std::unique_ptr<Algorithm>> algos;
  bool all_fp = true;
  for (auto& step : run.quant) {
    const AlgorithmInfo& info = registry.get(step.algorithm);
    if (info.scope != Scope::Layer && info.scope != Scope::NormConsumers)
      throw ConfigError(step.loc, "quant",
                        "algorithm '" + step.algorithm + "' acts at " + scope_name(info.scope) +
                            " scope, which the model runner does not drive yet",
                        run.label);
    all_fp = all_fp && step.algorithm == "fp" && !step.act.quantized();
    algos.push_back(info.make());
  }

  // ---------------- block-sequential calibration and quantization ----------------
  auto t_cal = std::chrono::steady_clock::now();
  ModelWeights q = fp;  // the quantized model, filled block by block
  const Transformer fp_model(fp);
  // act_quant[b][kind]: activation quantization of each linear's input.
  std::vector<std::array<ActQuant, kLinearKinds>> act_quant(L);
  ForwardHooks act_hooks;
  act_hooks.transform_input = [&act_quant](int b, LinearKind k, Matrix& X) {
    const ActQuant& a = act_quant[b][static_cast<int>(k)];
    if (a.spec) fake_quant_activations(X, *a.spec, a.spec->mode == ActRangeMode::Static ? &a.range : nullptr);
  };

  std::vector<Matrix> h;  // the residual stream entering the current block, per window
  h.reserve(st.calib_windows.size());
  for (auto& w : st.calib_windows) h.push_back(fp_model.embed(w));
  double quant_seconds = 0;

  for (int b = 0; b < L; ++b) {
    if (on_layer) on_layer("block " + std::to_string(b));
    // 1. Statistics of every linear input of block b (its FP weights) over all windows. The
    //    same pass gives the FP block's outputs, which feed block b+1 under propagate: fp.
    const int G = static_cast<int>(input_groups().size());
    std::vector<HessianAccumulator> H(G);
    std::vector<ChannelStats> S(G);
    for (int g = 0; g < G; ++g) {
      const Index d = fp.blocks[b].linear(input_groups()[g].members.front()).W.cols();
      H[g] = HessianAccumulator(d);
      S[g] = ChannelStats(d);
    }
    ForwardHooks capture;
    capture.capture_input = [&](int, LinearKind k, const Matrix& X) {
      const int g = group_of_kind(k);
      if (input_groups()[g].members.front() != k) return;  // shared inputs counted once
      H[g].add(X);
      S[g].add(X);
    };
    std::vector<Matrix> next(h.size());
    for (std::size_t w = 0; w < h.size(); ++w) next[w] = fp_model.block(b, h[w], 0, &capture, &q.blocks[b]);
    const std::vector<HessianAccumulator> H_fp = H;

    // 2. The pipeline on block b.
    auto t_q = std::chrono::steady_clock::now();
    DecoderBlock& blk = q.blocks[b];
    std::vector<VectorD> inv_scale(G);  // x' = x * inv_scale per group (norm transforms)
    for (int g = 0; g < G; ++g) inv_scale[g] = VectorD::Ones(H[g].dim());
    std::array<LayerRow, kLinearKinds> rows;
    std::array<double, kLinearKinds> secs{};
    for (int k = 0; k < kLinearKinds; ++k) {
      rows[k].layer = linear_name(b, static_cast<LinearKind>(k));
      rows[k].algorithm = run.pipeline_name();
      rows[k].scheme = "none";
    }
    // Stages: the whole block at once, or (calib.true_sequential) q/k/v, then o, then
    // gate/up, then down, re-collecting the statistics of each stage's inputs from the block
    // with its earlier stages already quantized (the GPTQ reference's --true-sequential).
    const int n_stages = run.calib.true_sequential ? G : 1;
    for (int stage = 0; stage < n_stages; ++stage) {
      auto in_stage = [&](int g) { return n_stages == 1 || g == stage; };
      if (stage > 0) {
        H[stage] = HessianAccumulator(H[stage].dim());
        S[stage] = ChannelStats(S[stage].dim());
        ForwardHooks recapture = act_hooks;
        recapture.capture_input = [&](int, LinearKind k, const Matrix& X) {
          if (group_of_kind(k) == stage && input_groups()[stage].members.front() == k) {
            H[stage].add(X);
            S[stage].add(X);
          }
        };
        const Transformer partial(q);
        for (std::size_t w = 0; w < h.size(); ++w) partial.block(b, h[w], 0, &recapture);
      }
      for (std::size_t si = 0; si < run.quant.size(); ++si) {
        const QuantStep& step = run.quant[si];
        if (auto* na = dynamic_cast<const NormConsumerAlgorithm*>(algos[si].get())) {
          for (int g = 0; g < G; ++g) {
            const InputGroup& grp = input_groups()[g];
            if (!in_stage(g)) continue;
            if (!grp.has_norm || !step.applies_to(linear_name(b, grp.members.front()))) continue;
            NormConsumerInput in;
            in.name = "model.layers." + std::to_string(b) + (grp.post_attn ? ".post_attention_layernorm" : ".input_layernorm");
            for (LinearKind m : grp.members) {
              in.consumer_names.push_back(linear_name(b, m));
              in.consumers.push_back(&blk.linear(m).W);
            }
            in.input_stats = &S[g];
            in.options = &step.options;
            auto t0 = std::chrono::steady_clock::now();
            ChannelScaleTransform tr = na->run(in);
            const double dt = seconds_since(t0);
            // Fold exactly once: norm weight / s, consumer columns * s.
            std::vector<Matrix*> consumers;
            for (LinearKind m : grp.members) {
              consumers.push_back(&blk.linear(m).W);
              secs[static_cast<int>(m)] += dt / grp.members.size();
            }
            fold_channel_scales(grp.post_attn ? blk.post_attn_norm : blk.input_norm, consumers, tr.scales);
            const VectorD inv = tr.scales.cwiseInverse();
            H[g].scale_channels(inv);
            S[g].scale_channels(inv);
            inv_scale[g] = inv_scale[g].cwiseProduct(inv);
            for (auto& [name, value] : tr.diagnostics)
              rec.diagnostics.push_back({in.name, static_cast<int>(si), step.algorithm, name, value});
          }
        } else if (auto* la = dynamic_cast<const LayerAlgorithm*>(algos[si].get())) {
          for (int k = 0; k < kLinearKinds; ++k) {
            const LinearKind kind = static_cast<LinearKind>(k);
            const std::string name = linear_name(b, kind);
            if (!step.applies_to(name)) continue;
            const int g = group_of_kind(kind);
            if (!in_stage(g)) continue;
            Linear& lin = blk.linear(kind);
            LayerInput in;
            in.name = name;
            in.W = &lin.W;
            in.hessian = &H[g];
            in.channels = &S[g];
            in.spec = step.weight;
            in.options = &step.options;
            in.seed = mix_stream(run.seed, static_cast<uint64_t>(b) * 64 + k * 8 + si);
            LayerResult r = la->run(in);
            secs[k] += r.metrics.seconds;
            lin.W = std::move(r.output.W);
            if (r.output.quantized) {
              rows[k].bits = step.weight.bits;
              rows[k].scheme = scheme_name(step.weight.scheme);
              rows[k].group_size = layer_group_size(step.weight);
              rows[k].bpw = r.metrics.bits_per_weight;
            }
            for (auto& [dn, value] : r.output.diagnostics)
              rec.diagnostics.push_back({name, static_cast<int>(si), step.algorithm, dn, value});
          }
        }
        if (step.act.quantized())
          for (int k = 0; k < kLinearKinds; ++k)
            if (in_stage(group_of_kind(static_cast<LinearKind>(k))) &&
                step.applies_to(linear_name(b, static_cast<LinearKind>(k))))
              act_quant[b][k].spec = &step.act;
      }
      // Static activation ranges: this stage's calibration inputs, after transforms; fixed
      // from here on (later stages and evaluation use them unchanged).
      for (int k = 0; k < kLinearKinds; ++k) {
        const int g = group_of_kind(static_cast<LinearKind>(k));
        if (!in_stage(g)) continue;
        act_quant[b][k].range = ActRange{S[g].min(), S[g].max()};
        const ActQuant& a = act_quant[b][k];
        if (a.spec && a.spec->mode == ActRangeMode::Static) {
          // Recorded so a reader can check the evaluation used exactly these ranges.
          const std::string name = linear_name(b, static_cast<LinearKind>(k));
          rec.diagnostics.push_back({name, -1, "act", "static_range_lo", a.range.lo});
          rec.diagnostics.push_back({name, -1, "act", "static_range_hi", a.range.hi});
        }
      }
    }
    // Layer rows: errors of the effective weights in the original input space.
    for (int k = 0; k < kLinearKinds; ++k) {
      const LinearKind kind = static_cast<LinearKind>(k);
      const int g = group_of_kind(kind);
      const Matrix& W0 = fp.blocks[b].linear(kind).W;
      const Matrix W_eff = blk.linear(kind).W * inv_scale[g].cast<float>().asDiagonal();
      LayerRow& row = rows[k];
      row.weight_mse = weight_mse(W0, W_eff);
      row.rel_err_h = relative_output_error(W0, W_eff, H_fp[g].hessian());
      // Output errors on evaluation inputs are measured end to end (slices), not per linear.
      const double nan = std::numeric_limits<double>::quiet_NaN();
      row.rel_err_eval = row.out_mse = row.max_abs = nan;
      row.sqnr_db = sqnr_db(W0, W_eff);
      row.cosine = cosine_similarity(W0, W_eff);
      row.seconds = secs[k];
      rec.layers.push_back(row);
    }
    quant_seconds += seconds_since(t_q);

    // 3. Inputs of block b+1.
    if (run.calib.propagate == "quantized" && b + 1 < L) {
      const Transformer q_model(q);
      for (std::size_t w = 0; w < h.size(); ++w) next[w] = q_model.block(b, h[w], 0, &act_hooks);
    }
    h.swap(next);
  }
  h.clear();
  rec.seconds_quant = quant_seconds;
  rec.seconds_calib = prep_seconds + seconds_since(t_cal) - quant_seconds;

  // ---------------- evaluation: FP and quantized, window by window ----------------
  auto t_eval = std::chrono::steady_clock::now();
  const Transformer q_model(q);
  const TokenBuckets& buckets = *st.buckets;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  constexpr std::size_t kBatch = 16;  // windows whose logits are held at once (per model)
  UnitTable all_units;
  for (const EvalData& d : st.eval) {
    if (on_layer) on_layer("eval " + d.set.name);
    LmEvalAccumulator acc(static_cast<int>(d.unit_ids.size()), buckets.names(),
                          [&buckets](int32_t t) { return buckets.bucket_of(t); },
                          position_bucket_names(), [](int64_t p) { return position_bucket(p); });
    for (std::size_t i0 = 0; i0 < d.windows.size(); i0 += kBatch) {
      const std::size_t i1 = std::min(d.windows.size(), i0 + kBatch);
      std::vector<std::vector<int32_t>> batch(d.windows.begin() + i0, d.windows.begin() + i1);
      // Without the FP pass (eval.kl: false) the quantized logits stand in for both sides;
      // only metrics of the quantized model alone are reported then.
      std::vector<Matrix> lq = all_fp ? fp_model.forward_batch(batch) : q_model.forward_batch(batch, &act_hooks);
      std::vector<Matrix> lf = all_fp || !run.eval.kl ? lq : fp_model.forward_batch(batch);
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
    if (!run.eval.kl && !all_fp) {
      std::vector<SliceMetricDef> own;
      for (auto& m : defs)
        if (m.name == "ppl" || m.name == "nll" || m.name == "acc") {
          m.reference = {};
          own.push_back(m);
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
    if (run.eval.kl || all_fp)
      for (auto& [name, value] : acc.kl_quantiles_overall())
        rec.summary.push_back({prefix + name, value, nan, nan, value});
    rec.params.push_back({"eval." + d.set.name + ".scored_tokens", std::to_string(acc.scored_tokens())});
    rec.params.push_back({"eval." + d.set.name + ".windows", std::to_string(d.windows.size())});
    if (d.skipped_docs > 0)
      rec.params.push_back({"eval." + d.set.name + ".skipped_documents", std::to_string(d.skipped_docs)});
    append_units(all_units, units, "set", d.set.name);
  }
  rec.units = std::move(all_units);

  // Whole-model weight summary over quantized linears.
  double nw = 0, bits = 0, relh = 0;
  for (std::size_t i = 0; i < rec.layers.size(); ++i) {
    const LinearKind kind = static_cast<LinearKind>(i % kLinearKinds);
    const double n = static_cast<double>(fp.blocks[i / kLinearKinds].linear(kind).W.size());
    nw += n;
    bits += rec.layers[i].bpw * n;
    relh += rec.layers[i].rel_err_h;
  }
  rec.summary.push_back({"bpw", bits / nw, nan, nan, bits / nw - 16.0});
  rec.summary.push_back({"rel_err_h", relh / rec.layers.size(), nan, nan, relh / rec.layers.size()});
  rec.params.push_back({"protocol",
                        "windows of eval.seq_len tokens, non-overlapping from 0; positions 1..len-1 scored from "
                        "their prefix; streams: BOS + documents joined by a blank line, last partial window "
                        "dropped, unit = window; jsonl: BOS + text per document, last partial window kept "
                        "when >= 2 tokens, unit = document; token_freq buckets ranked on eval.freq_corpus "
                        "(FNV-1a " + std::to_string(buckets.corpus_hash()) + ")"});
  rec.seconds_eval = seconds_since(t_eval);
}

}  // namespace ql
