#include "core/model/transformer.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "core/detmath.h"
#include "core/error.h"
#include "core/linalg.h"
#include "core/parallel.h"

namespace ql {

namespace {

std::string shape_str(Index r, Index c) { return std::to_string(r) + "x" + std::to_string(c); }

/// Threads for a region that runs tile calls: all, or one when the caller asked for a
/// serial pass (a window inside forward_batch's parallel loop, or a short window). Every tile
/// call is single-threaded whatever the team (core/linalg.h).
int team_size(bool parallel) { return parallel ? omp_get_max_threads() : 1; }

/// Y = X Wᵀ (+ b) for one linear; several jobs share one parallel region so that independent
/// products (q/k/v, gate/up) keep both cores busy even when each is small.
struct LinearJob {
  const Matrix* X;
  const Matrix* W;
  const Vector* b;  // nullptr or empty: no bias
  Matrix* Y;
};

/// One kPanelRows x kTileCols tile of a job's output: one tile gemm. A bias is written into the
/// tile first and accumulated with beta = 1, as torch's addmm does.
void gemm_tile(const LinearJob& job, Index r0, Index c0) {
  const Index k = job.X->cols(), n = job.W->rows();
  const Index rows = std::min(kPanelRows, job.X->rows() - r0);
  const Index cols = std::min(kTileCols, n - c0);
  float* C = job.Y->data() + r0 * n + c0;
  float beta = 0.0f;
  if (job.b && job.b->size() > 0) {
    for (Index r = 0; r < rows; ++r)
      std::copy(job.b->data() + c0, job.b->data() + c0 + cols, C + r * n);
    beta = 1.0f;
  }
  gemm(Trans::No, Trans::Yes, rows, cols, k, 1.0f, job.X->data() + r0 * k, k,
       job.W->data() + c0 * k, k, beta, C, n);
}

/// Every product of the forward pass goes through here. Tile boundaries depend only on the
/// shapes and each tile is one single-threaded tile call (core/linalg.h), so the bits do not
/// depend on the thread count or on `parallel`, which only decides whether tiles are spread
/// over the threads. With `swiglu`, jobs are {gate, up}: a task computes the same tile of both
/// and leaves silu(gate) ⊙ up in gate (silu(x) = x / (1 + exp(-x))), so the MLP's
/// elementwise part is parallel without another region.
void run_linears(const LinearJob* jobs, int n_jobs, bool parallel, bool swiglu = false) {
  struct Tile {
    int job;
    Index r0, c0;
  };
  std::vector<Tile> tiles;
  for (int j = 0; j < n_jobs; ++j) {
    const LinearJob& job = jobs[j];
    job.Y->resize(job.X->rows(), job.W->rows());
    if (swiglu && j > 0) continue;
    for (Index r0 = 0; r0 < job.X->rows(); r0 += kPanelRows)
      for (Index c0 = 0; c0 < job.W->rows(); c0 += kTileCols) tiles.push_back({j, r0, c0});
  }
  const Index n_tiles = static_cast<Index>(tiles.size());
#pragma omp parallel num_threads(team_size(parallel))
  {
    std::vector<float> e;  // exp(-gate) of one row segment
#pragma omp for schedule(dynamic, 1)
    for (Index t = 0; t < n_tiles; ++t) {
      const Tile& tile = tiles[t];
      gemm_tile(jobs[tile.job], tile.r0, tile.c0);
      if (!swiglu) continue;
      gemm_tile(jobs[1], tile.r0, tile.c0);
      Matrix& G = *jobs[0].Y;
      const Matrix& U = *jobs[1].Y;
      const Index rows = std::min(kPanelRows, G.rows() - tile.r0);
      const Index cols = std::min(kTileCols, G.cols() - tile.c0);
      // silu(g) u = g / (1 + e^-g) · u with core/detmath's exp (same bits on every CPU).
      e.resize(static_cast<size_t>(cols));
      for (Index r = tile.r0; r < tile.r0 + rows; ++r) {
        float* g = G.data() + r * G.cols() + tile.c0;
        const float* u = U.data() + r * U.cols() + tile.c0;
        for (Index j = 0; j < cols; ++j) e[j] = -g[j];
        detmath::exp_inplace(e.data(), cols);
        for (Index j = 0; j < cols; ++j) g[j] = g[j] / (1.0f + e[j]) * u[j];
      }
    }
  }
}

/// Windows shorter than this run on one thread: their products are too small to amortise
/// waking the other threads. Scheduling only; the results are the same either way.
constexpr Index kMinParallelRows = 16;

/// HF LlamaRMSNorm in float32: y = w ⊙ (x · 1/sqrt(mean(x²) + eps)). The mean of squares is
/// accumulated in double (fixed order) and rounded once.
void rms_norm(const Matrix& h, const Vector& w, float eps, Matrix& out) {
  const Index T = h.rows(), d = h.cols();
  out.resize(T, d);
  for (Index t = 0; t < T; ++t) {
    const float* x = h.data() + t * d;
    double ss = 0.0;
    for (Index j = 0; j < d; ++j) ss += static_cast<double>(x[j]) * x[j];
    const float ms = static_cast<float>(ss / static_cast<double>(d));
    const float r = 1.0f / std::sqrt(ms + eps);
    float* y = out.data() + t * d;
    for (Index j = 0; j < d; ++j) y[j] = w[j] * (x[j] * r);
  }
}

/// cos/sin of the RoPE angles for positions pos0 .. pos0+T-1, T x head_dim/2 each. Rounded as
/// HF's LlamaRotaryEmbedding: inv_freq = 1 / theta^(float(2i)/head_dim) in float32, angle =
/// float(pos) * inv_freq in float32 (one rounding), then cos/sin of that float angle.
void rope_tables(int64_t pos0, Index T, int head_dim, double theta, Matrix& cos_t, Matrix& sin_t) {
  const Index half = head_dim / 2;
  std::vector<float> inv_freq(half);
  const float base = static_cast<float>(theta);
  for (Index i = 0; i < half; ++i)
    inv_freq[i] = 1.0f / static_cast<float>(detmath::pow(
                             base, static_cast<float>(2 * i) / static_cast<float>(head_dim)));
  cos_t.resize(T, half);
  sin_t.resize(T, half);
  for (Index t = 0; t < T; ++t) {
    const float pos = static_cast<float>(pos0 + t);
    for (Index i = 0; i < half; ++i) {
      const float angle = pos * inv_freq[i];
      cos_t(t, i) = static_cast<float>(detmath::cos(static_cast<double>(angle)));
      sin_t(t, i) = static_cast<float>(detmath::sin(static_cast<double>(angle)));
    }
  }
}

/// Rotate-half RoPE in place on every head of X (T x n_heads*head_dim):
/// out_i = x_i cos_i - x_{i+half} sin_i,  out_{i+half} = x_{i+half} cos_i + x_i sin_i.
void apply_rope(Matrix& X, int n_heads, int head_dim, const Matrix& cos_t, const Matrix& sin_t) {
  const Index T = X.rows(), half = head_dim / 2;
  for (Index t = 0; t < T; ++t) {
    const float* c = cos_t.data() + t * half;
    const float* s = sin_t.data() + t * half;
    for (int hh = 0; hh < n_heads; ++hh) {
      float* x = X.data() + t * X.cols() + static_cast<Index>(hh) * head_dim;
      for (Index i = 0; i < half; ++i) {
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c[i] - x2 * s[i];
        x[i + half] = x2 * c[i] + x1 * s[i];
      }
    }
  }
}

/// Causal grouped-query attention of T new queries (positions past .. past+T-1) against keys
/// and values of positions 0 .. past+T-1 (rows of K/V with row stride ld_kv). One task per
/// (head, chunk of kAttnRows query rows): S = scale · Q_j K_gᵀ restricted to the keys the
/// chunk can see, row softmax over positions <= the query's, O_j = P V_g.
void attention(const Matrix& Q, const float* K, const float* V, Index ld_kv, int64_t past,
               int n_heads, int n_kv_heads, int head_dim, bool parallel, Matrix& out) {
  const Index T = Q.rows(), qd = Q.cols();
  out.resize(T, qd);
  const Index n_chunks = (T + kAttnRows - 1) / kAttnRows;
  const Index n_tasks = n_chunks * n_heads;
  const int group = n_heads / n_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  ParallelErrors errs;  // only std::bad_alloc can occur here
#pragma omp parallel num_threads(team_size(parallel))
  {
    // Rows of S start on 64-byte boundaries so Eigen's vectorised max/sum split every row into
    // packets the same way whatever the allocation: the bits depend on the shapes only.
    std::vector<float, Eigen::aligned_allocator<float>> S;
#pragma omp for schedule(dynamic, 1)
    for (Index task = 0; task < n_tasks; ++task)
      errs.run(task, [&] {
        const int hh = static_cast<int>(task % n_heads);
        const Index chunk = task / n_heads;
        const int g = hh / group;
        const Index i0 = chunk * kAttnRows, rows = std::min(kAttnRows, T - i0);
        const Index n = past + i0 + rows;  // keys visible to the chunk's last query
        const Index ld = (n + 15) / 16 * 16;
        S.resize(static_cast<size_t>(rows * ld));
        gemm(Trans::No, Trans::Yes, rows, n, head_dim, scale,
             Q.data() + i0 * qd + static_cast<Index>(hh) * head_dim, qd,
             K + static_cast<Index>(g) * head_dim, ld_kv, 0.0f, S.data(), ld);
        for (Index r = 0; r < rows; ++r) {
          float* s = S.data() + r * ld;
          const Index valid = past + i0 + r + 1;  // causal: keys at positions <= the query's
          Eigen::Map<Eigen::ArrayXf, Eigen::Aligned16> p(s, valid);
          p -= p.maxCoeff();
          detmath::exp_inplace(s, valid);
          p *= 1.0f / p.sum();
          std::fill(s + valid, s + n, 0.0f);
        }
        gemm(Trans::No, Trans::No, rows, head_dim, n, 1.0f, S.data(), ld,
             V + static_cast<Index>(g) * head_dim, ld_kv, 0.0f,
             out.data() + i0 * qd + static_cast<Index>(hh) * head_dim, qd);
      });
  }
  errs.rethrow();
}

void check_vector(const Vector& v, Index n, const std::string& name) {
  if (v.size() != n)
    throw ShapeError("transformer: " + name + " has " + std::to_string(v.size()) +
                     " elements, expected " + std::to_string(n));
}

void check_matrix(const Matrix& m, Index r, Index c, const std::string& name) {
  if (m.rows() != r || m.cols() != c)
    throw ShapeError("transformer: " + name + " is " + shape_str(m.rows(), m.cols()) +
                     ", expected " + shape_str(r, c));
}

void check_linear(const Linear& l, Index d_out, Index d_in, const std::string& name) {
  check_matrix(l.W, d_out, d_in, name + ".weight");
  if (l.b.size() != 0) check_vector(l.b, d_out, name + ".bias");
}

}  // namespace

/// Buffers of one window, reused by every block (no allocation per token or per block once the
/// first block has sized them).
struct Transformer::Workspace {
  Matrix xn;               // normed residual, T x hidden
  Matrix x1, x2, x3;       // per-linear copies of a shared input when transform_input is set
  Matrix q, k, v, attn;    // T x q_dim, T x kv_dim, T x kv_dim, T x q_dim
  Matrix out;              // T x hidden (o_proj / down_proj result)
  Matrix gate, up;         // T x intermediate
  Matrix cos_t, sin_t;     // RoPE tables of the current positions
  int64_t rope_pos0 = -1;  // positions the tables were built for
  Index rope_rows = -1;
};

Eigen::Map<const Matrix> Transformer::KvCache::keys(int b) const {
  if (k_.empty()) return Eigen::Map<const Matrix>(nullptr, 0, 0);
  return Eigen::Map<const Matrix>(k_.at(b).data(), length_, k_.at(b).cols());
}

Eigen::Map<const Matrix> Transformer::KvCache::values(int b) const {
  if (v_.empty()) return Eigen::Map<const Matrix>(nullptr, 0, 0);
  return Eigen::Map<const Matrix>(v_.at(b).data(), length_, v_.at(b).cols());
}

Transformer::Transformer(const ModelWeights& weights) : w_(weights) {
  const ModelConfig& c = w_.config;
  if (c.hidden_size <= 0 || c.num_heads <= 0 || c.num_kv_heads <= 0 || c.head_dim <= 0 ||
      c.vocab_size <= 0 || c.intermediate_size <= 0 || c.num_layers < 0)
    throw ShapeError("transformer: config has a non-positive size (hidden " +
                     std::to_string(c.hidden_size) + ", heads " + std::to_string(c.num_heads) +
                     ", kv heads " + std::to_string(c.num_kv_heads) + ", head_dim " +
                     std::to_string(c.head_dim) + ", vocab " + std::to_string(c.vocab_size) +
                     ", intermediate " + std::to_string(c.intermediate_size) + ")");
  if (c.num_heads % c.num_kv_heads != 0)
    throw ShapeError("transformer: num_heads " + std::to_string(c.num_heads) +
                     " is not a multiple of num_kv_heads " + std::to_string(c.num_kv_heads));
  if (c.head_dim % 2 != 0)
    throw ShapeError("transformer: head_dim " + std::to_string(c.head_dim) +
                     " is odd; rotate-half RoPE needs an even head_dim");
  if (!(c.rms_norm_eps > 0.0) || !(c.rope_theta > 0.0))
    throw ShapeError("transformer: rms_norm_eps and rope_theta must be positive");
  check_matrix(w_.embed, c.vocab_size, c.hidden_size, "model.embed_tokens.weight");
  check_matrix(w_.lm_head, c.vocab_size, c.hidden_size, "lm_head.weight");
  check_vector(w_.final_norm, c.hidden_size, "model.norm.weight");
  if (static_cast<int>(w_.blocks.size()) != c.num_layers)
    throw ShapeError("transformer: " + std::to_string(w_.blocks.size()) +
                     " decoder blocks, config says num_layers " + std::to_string(c.num_layers));
  for (int b = 0; b < c.num_layers; ++b)
    check_block(w_.blocks[b], "model.layers." + std::to_string(b));
}

void Transformer::check_block(const DecoderBlock& blk, const std::string& where) const {
  const ModelConfig& c = w_.config;
  const Index d = c.hidden_size, qd = Index(c.num_heads) * c.head_dim,
              kvd = Index(c.num_kv_heads) * c.head_dim, ff = c.intermediate_size;
  check_vector(blk.input_norm, d, where + ".input_layernorm.weight");
  check_vector(blk.post_attn_norm, d, where + ".post_attention_layernorm.weight");
  check_linear(blk.q, qd, d, where + ".self_attn.q_proj");
  check_linear(blk.k, kvd, d, where + ".self_attn.k_proj");
  check_linear(blk.v, kvd, d, where + ".self_attn.v_proj");
  check_linear(blk.o, d, qd, where + ".self_attn.o_proj");
  check_linear(blk.gate, ff, d, where + ".mlp.gate_proj");
  check_linear(blk.up, ff, d, where + ".mlp.up_proj");
  check_linear(blk.down, d, ff, where + ".mlp.down_proj");
}

void Transformer::embed_into(const std::vector<int32_t>& tokens, Matrix& h) const {
  const ModelConfig& c = w_.config;
  h.resize(static_cast<Index>(tokens.size()), c.hidden_size);
  for (size_t t = 0; t < tokens.size(); ++t) {
    const int32_t id = tokens[t];
    if (id < 0 || id >= c.vocab_size)
      throw ShapeError("transformer: token id " + std::to_string(id) + " at position " +
                       std::to_string(t) + " is outside the vocabulary [0, " +
                       std::to_string(c.vocab_size) + ")");
    h.row(static_cast<Index>(t)) = w_.embed.row(id);
  }
}

namespace {

/// The input X of linear `kind`, after transform_input (into `copy` when X is shared with
/// other linears) and capture_input, per the order documented in ForwardHooks.
const Matrix* hooked_input(const ForwardHooks* hooks, int b, LinearKind kind, Matrix& X,
                           bool shared, Matrix& copy) {
  Matrix* in = &X;
  if (hooks && hooks->transform_input) {
    if (shared) {
      copy = X;
      in = &copy;
    }
    const Index r = in->rows(), c = in->cols();
    hooks->transform_input(b, kind, *in);
    if (in->rows() != r || in->cols() != c)
      throw ShapeError("transformer: transform_input hook changed the input of " +
                       linear_name(b, kind) + " from " + shape_str(r, c) + " to " +
                       shape_str(in->rows(), in->cols()));
  }
  if (hooks && hooks->capture_input) hooks->capture_input(b, kind, *in);
  return in;
}

void call_kv_hook(const ForwardHooks* hooks, int b, KvStage stage, Matrix& K, Matrix& V) {
  if (!hooks || !hooks->kv) return;
  const Index r = K.rows(), c = K.cols();
  hooks->kv(b, stage, K, V);
  if (K.rows() != r || K.cols() != c || V.rows() != r || V.cols() != c)
    throw ShapeError("transformer: kv hook of block " + std::to_string(b) + " changed K/V from " +
                     shape_str(r, c) + " to " + shape_str(K.rows(), K.cols()) + " / " +
                     shape_str(V.rows(), V.cols()));
}

}  // namespace

void Transformer::run_block(int b, const DecoderBlock& w, Matrix& h, int64_t pos0, KvCache* cache,
                            const ForwardHooks* hooks, bool parallel, Workspace& ws) const {
  const ModelConfig& c = w_.config;
  const Index T = h.rows();
  const float eps = static_cast<float>(c.rms_norm_eps);

  // Attention: x = RMSNorm(h); q, k, v projections.
  rms_norm(h, w.input_norm, eps, ws.xn);
  const Matrix* xq = hooked_input(hooks, b, LinearKind::Q, ws.xn, true, ws.x1);
  const Matrix* xk = hooked_input(hooks, b, LinearKind::K, ws.xn, true, ws.x2);
  const Matrix* xv = hooked_input(hooks, b, LinearKind::V, ws.xn, true, ws.x3);
  const LinearJob qkv[3] = {
      {xq, &w.q.W, &w.q.b, &ws.q}, {xk, &w.k.W, &w.k.b, &ws.k}, {xv, &w.v.W, &w.v.b, &ws.v}};
  run_linears(qkv, 3, parallel);

  call_kv_hook(hooks, b, KvStage::PreRope, ws.k, ws.v);
  if (ws.rope_pos0 != pos0 || ws.rope_rows != T) {
    rope_tables(pos0, T, c.head_dim, c.rope_theta, ws.cos_t, ws.sin_t);
    ws.rope_pos0 = pos0;
    ws.rope_rows = T;
  }
  apply_rope(ws.q, c.num_heads, c.head_dim, ws.cos_t, ws.sin_t);
  apply_rope(ws.k, c.num_kv_heads, c.head_dim, ws.cos_t, ws.sin_t);
  call_kv_hook(hooks, b, KvStage::PostRope, ws.k, ws.v);

  const Index kvd = ws.k.cols();
  if (cache) {
    // Rows [length, length+T) were reserved by forward_incremental; length moves on only
    // after every block succeeded.
    const int64_t past = cache->length_;
    cache->k_[b].middleRows(past, T) = ws.k;
    cache->v_[b].middleRows(past, T) = ws.v;
    attention(ws.q, cache->k_[b].data(), cache->v_[b].data(), kvd, past, c.num_heads,
              c.num_kv_heads, c.head_dim, parallel, ws.attn);
  } else {
    attention(ws.q, ws.k.data(), ws.v.data(), kvd, 0, c.num_heads, c.num_kv_heads, c.head_dim,
              parallel, ws.attn);
  }

  const Matrix* xo = hooked_input(hooks, b, LinearKind::O, ws.attn, false, ws.x1);
  const LinearJob o = {xo, &w.o.W, &w.o.b, &ws.out};
  run_linears(&o, 1, parallel);
  h += ws.out;

  // MLP: h += down(silu(gate(x)) ⊙ up(x)), x = RMSNorm(h).
  rms_norm(h, w.post_attn_norm, eps, ws.xn);
  const Matrix* xg = hooked_input(hooks, b, LinearKind::Gate, ws.xn, true, ws.x1);
  const Matrix* xu = hooked_input(hooks, b, LinearKind::Up, ws.xn, true, ws.x2);
  const LinearJob gu[2] = {{xg, &w.gate.W, &w.gate.b, &ws.gate}, {xu, &w.up.W, &w.up.b, &ws.up}};
  run_linears(gu, 2, parallel, /*swiglu=*/true);
  const Matrix* xd = hooked_input(hooks, b, LinearKind::Down, ws.gate, false, ws.x1);
  const LinearJob down = {xd, &w.down.W, &w.down.b, &ws.out};
  run_linears(&down, 1, parallel);
  h += ws.out;
}

Matrix Transformer::run_head(const Matrix& h, bool parallel, Workspace& ws) const {
  check_matrix(h, h.rows(), w_.config.hidden_size, "head input");
  rms_norm(h, w_.final_norm, static_cast<float>(w_.config.rms_norm_eps), ws.xn);
  Matrix logits;
  const LinearJob job = {&ws.xn, &w_.lm_head, nullptr, &logits};
  run_linears(&job, 1, parallel);
  return logits;
}

Matrix Transformer::run_window(const std::vector<int32_t>& tokens, const ForwardHooks* hooks,
                               bool parallel) const {
  Workspace ws;
  Matrix h;
  embed_into(tokens, h);
  for (int b = 0; b < w_.config.num_layers; ++b)
    run_block(b, w_.blocks[b], h, 0, nullptr, hooks, parallel, ws);
  return run_head(h, parallel, ws);
}

Matrix Transformer::forward(const std::vector<int32_t>& tokens, const ForwardHooks* hooks) const {
  return run_window(tokens, hooks, static_cast<Index>(tokens.size()) >= kMinParallelRows);
}

Matrix Transformer::embed(const std::vector<int32_t>& tokens) const {
  Matrix h;
  embed_into(tokens, h);
  return h;
}

Matrix Transformer::block(int b, const Matrix& h, int64_t pos0, const ForwardHooks* hooks,
                          const DecoderBlock* override_weights) const {
  if (b < 0 || b >= w_.config.num_layers)
    throw ShapeError("transformer: block " + std::to_string(b) + " out of range [0, " +
                     std::to_string(w_.config.num_layers) + ")");
  if (pos0 < 0) throw ShapeError("transformer: negative start position " + std::to_string(pos0));
  check_matrix(h, h.rows(), w_.config.hidden_size, "block " + std::to_string(b) + " input");
  if (override_weights)
    check_block(*override_weights, "override of model.layers." + std::to_string(b));
  Workspace ws;
  Matrix out = h;
  run_block(b, override_weights ? *override_weights : w_.blocks[b], out, pos0, nullptr, hooks,
            h.rows() >= kMinParallelRows, ws);
  return out;
}

Matrix Transformer::head(const Matrix& h) const {
  Workspace ws;
  return run_head(h, h.rows() >= kMinParallelRows, ws);
}

Matrix Transformer::forward_incremental(const std::vector<int32_t>& new_tokens, KvCache& cache,
                                        const ForwardHooks* hooks) const {
  const ModelConfig& c = w_.config;
  const Index kvd = Index(c.num_kv_heads) * c.head_dim;
  const Index L = c.num_layers;
  if (static_cast<Index>(cache.k_.size()) != L || (L > 0 && cache.k_[0].cols() != kvd)) {
    if (cache.length_ > 0)
      throw ShapeError(
          "transformer: KV cache holds " + std::to_string(cache.k_.size()) + " blocks of width " +
          std::to_string(cache.k_.empty() ? 0 : cache.k_[0].cols()) + ", this model has " +
          std::to_string(L) + " of width " + std::to_string(kvd));
    cache.k_.assign(L, Matrix(0, kvd));
    cache.v_.assign(L, Matrix(0, kvd));
  }
  const Index T = static_cast<Index>(new_tokens.size());
  const int64_t past = cache.length_;
  // Geometric growth: amortised O(1) copies per token, no allocation on most calls.
  if (L > 0 && cache.k_[0].rows() < past + T) {
    const Index cap = std::max<Index>({past + T, 2 * cache.k_[0].rows(), 64});
    for (Index b = 0; b < L; ++b) {
      for (Matrix* m : {&cache.k_[b], &cache.v_[b]}) {
        Matrix grown(cap, kvd);
        grown.topRows(past) = m->topRows(past);
        m->swap(grown);
      }
    }
  }
  const bool parallel = T >= kMinParallelRows;
  Workspace ws;
  Matrix h;
  embed_into(new_tokens, h);
  for (int b = 0; b < c.num_layers; ++b)
    run_block(b, w_.blocks[b], h, past, &cache, hooks, parallel, ws);
  Matrix logits = run_head(h, parallel, ws);
  cache.length_ = past + T;
  return logits;
}

std::vector<Matrix> Transformer::forward_batch(const std::vector<std::vector<int32_t>>& windows,
                                               const ForwardHooks* hooks) const {
  std::vector<Matrix> out(windows.size());
  const long n = static_cast<long>(windows.size());
  // With fewer windows than threads, window-level parallelism would leave cores idle; the
  // tile-parallel path gives the same bits.
  if (n < num_threads()) {
    for (long i = 0; i < n; ++i) out[i] = forward(windows[i], hooks);
    return out;
  }
  ParallelErrors errs;
#pragma omp parallel for schedule(dynamic, 1)
  for (long i = 0; i < n; ++i) errs.run(i, [&] { out[i] = run_window(windows[i], hooks, false); });
  errs.rethrow();
  return out;
}

std::vector<Matrix> Transformer::forward_batch(const std::vector<std::vector<int32_t>>& windows,
                                               const std::vector<ForwardHooks>& per_window) const {
  if (per_window.size() != windows.size())
    throw ShapeError("transformer: forward_batch got " + std::to_string(per_window.size()) +
                     " hook sets for " + std::to_string(windows.size()) + " windows");
  std::vector<Matrix> out(windows.size());
  const long n = static_cast<long>(windows.size());
  if (n < num_threads()) {
    for (long i = 0; i < n; ++i) out[i] = forward(windows[i], &per_window[i]);
    return out;
  }
  ParallelErrors errs;
#pragma omp parallel for schedule(dynamic, 1)
  for (long i = 0; i < n; ++i)
    errs.run(i, [&] { out[i] = run_window(windows[i], &per_window[i], false); });
  errs.rethrow();
  return out;
}

}  // namespace ql
