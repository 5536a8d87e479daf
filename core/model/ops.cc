#include "core/model/ops.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "core/detmath.h"
#include "core/error.h"
#include "core/model/kv_cache_quant.h"
#include "core/parallel.h"

namespace ql {

namespace {

/// Threads for a region that runs tile calls: all, or one when the caller asked for a
/// serial pass (a window inside forward_batch's parallel loop, or a short window). Every tile
/// call is single-threaded whatever the team (core/linalg.h).
int team_size(bool parallel) { return parallel ? omp_get_max_threads() : 1; }

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
void run_tiles(const LinearJob* jobs, int n_jobs, bool parallel, bool swiglu) {
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

}  // namespace

void linear_forward(const LinearJob* jobs, int n_jobs, bool parallel) {
  run_tiles(jobs, n_jobs, parallel, false);
}

void swiglu_forward(const LinearJob& gate, const LinearJob& up, bool parallel) {
  const LinearJob jobs[2] = {gate, up};
  if (gate.X->rows() != up.X->rows() || gate.W->rows() != up.W->rows())
    throw ShapeError("swiglu: gate and up products differ in shape");
  run_tiles(jobs, 2, parallel, true);
}

void rms_norm_forward(const Matrix& h, const Vector& w, float eps, Matrix& out, Vector* rstd) {
  const Index T = h.rows(), d = h.cols();
  out.resize(T, d);
  if (rstd) rstd->resize(T);
  for (Index t = 0; t < T; ++t) {
    const float* x = h.data() + t * d;
    double ss = 0.0;
    for (Index j = 0; j < d; ++j) ss += static_cast<double>(x[j]) * x[j];
    const float ms = static_cast<float>(ss / static_cast<double>(d));
    const float r = 1.0f / std::sqrt(ms + eps);
    if (rstd) (*rstd)[t] = r;
    float* y = out.data() + t * d;
    for (Index j = 0; j < d; ++j) y[j] = w[j] * (x[j] * r);
  }
}

void head_rms_norm_forward(Matrix& X, int n_heads, int head_dim, const Vector& w, float eps) {
  if (X.cols() != static_cast<Index>(n_heads) * head_dim || w.size() != head_dim)
    throw ShapeError("head_rms_norm: " + std::to_string(X.cols()) + " columns, " + std::to_string(n_heads) +
                     " heads of " + std::to_string(head_dim) + ", weight of " + std::to_string(w.size()));
  // Row-major: the heads of consecutive tokens are consecutive rows of width head_dim.
  Eigen::Map<Matrix> heads(X.data(), X.rows() * n_heads, head_dim);
  const Matrix in = heads;
  Matrix out;
  rms_norm_forward(in, w, eps, out);
  heads = out;
}

std::string RopeSpec::type_name() const {
  switch (scaling) {
    case Scaling::Linear: return "linear";
    case Scaling::Dynamic: return "dynamic";
    case Scaling::Llama3: return "llama3";
    default: return "default";
  }
}

std::vector<float> rope_inv_freq(const RopeSpec& rope, int head_dim, int64_t seq_len) {
  const Index half = head_dim / 2;
  double theta = rope.theta;
  if (rope.scaling == RopeSpec::Scaling::Dynamic && seq_len > rope.original_max_position) {
    const double L = static_cast<double>(seq_len), L0 = static_cast<double>(rope.original_max_position);
    theta *= detmath::pow(rope.factor * L / L0 - (rope.factor - 1.0), static_cast<double>(head_dim) / (head_dim - 2));
  }
  std::vector<float> inv_freq(static_cast<std::size_t>(half));
  const float base = static_cast<float>(theta);
  for (Index i = 0; i < half; ++i)
    inv_freq[i] = 1.0f / static_cast<float>(detmath::pow(
                             base, static_cast<float>(2 * i) / static_cast<float>(head_dim)));
  if (rope.scaling == RopeSpec::Scaling::Linear)
    for (float& f : inv_freq) f = static_cast<float>(f / rope.factor);
  if (rope.scaling == RopeSpec::Scaling::Llama3) {
    const double L0 = static_cast<double>(rope.original_max_position);
    const double low_wavelen = L0 / rope.low_freq_factor, high_wavelen = L0 / rope.high_freq_factor;
    for (float& f : inv_freq) {
      const double wavelen = 2.0 * M_PI / f;
      if (wavelen > low_wavelen) {
        f = static_cast<float>(f / rope.factor);  // long wavelengths: interpolated
      } else if (!(wavelen < high_wavelen)) {     // between the thresholds: blended
        const double smooth = (L0 / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor);
        f = static_cast<float>((1.0 - smooth) * f / rope.factor + smooth * f);
      }
    }
  }
  return inv_freq;
}

void rope_tables(int64_t pos0, Index T, int head_dim, const RopeSpec& rope, RopeTables& out) {
  Matrix& cos_t = out.cos;
  Matrix& sin_t = out.sin;
  out.pos0 = pos0;
  out.rows = T;
  const Index half = head_dim / 2;
  const std::vector<float> inv_freq = rope_inv_freq(rope, head_dim, pos0 + T);
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

namespace {

/// Rotates every head's (i, i + half) pairs of X by the tables' angles, or by their negatives
/// (sign = -1: the inverse rotation).
void rotate_pairs(Matrix& X, int n_heads, int head_dim, const RopeTables& tab, float sign) {
  const Index T = X.rows(), half = head_dim / 2;
  if (tab.rows < T || tab.cos.cols() != half)
    throw ShapeError("rope: tables of " + std::to_string(tab.rows) + " x " + std::to_string(tab.cos.cols()) +
                     " for " + std::to_string(T) + " rows of head_dim " + std::to_string(head_dim));
  const Matrix& cos_t = tab.cos;
  const Matrix& sin_t = tab.sin;
  for (Index t = 0; t < T; ++t) {
    const float* c = cos_t.data() + t * half;
    const float* s = sin_t.data() + t * half;
    for (int hh = 0; hh < n_heads; ++hh) {
      float* x = X.data() + t * X.cols() + static_cast<Index>(hh) * head_dim;
      for (Index i = 0; i < half; ++i) {
        const float x1 = x[i], x2 = x[i + half];
        const float si = sign * s[i];
        x[i] = x1 * c[i] - x2 * si;
        x[i + half] = x2 * c[i] + x1 * si;
      }
    }
  }
}

}  // namespace

void rope_forward(Matrix& X, int n_heads, int head_dim, const RopeTables& tab) {
  rotate_pairs(X, n_heads, head_dim, tab, 1.0f);
}

void rope_inverse(Matrix& X, int n_heads, int head_dim, const RopeTables& tab) {
  rotate_pairs(X, n_heads, head_dim, tab, -1.0f);
}

void attention_forward(const Matrix& Q, const float* K, const float* V, Index ld_kv, int64_t past,
                       int n_heads, int n_kv_heads, int head_dim, bool parallel, Matrix& out,
                       const KvMix* mix) {
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
    std::vector<float, Eigen::aligned_allocator<float>> S, Sq;
#pragma omp for schedule(dynamic, 1)
    for (Index task = 0; task < n_tasks; ++task)
      errs.run(task, [&] {
        const int hh = static_cast<int>(task % n_heads);
        const Index chunk = task / n_heads;
        const int g = hh / group;
        const Index i0 = chunk * kAttnRows, rows = std::min(kAttnRows, T - i0);
        const Index n = past + i0 + rows;  // keys visible to the chunk's last query
        const Index ld = (n + 15) / 16 * 16;
        const float* q = Q.data() + i0 * qd + static_cast<Index>(hh) * head_dim;
        const Index kv_off = static_cast<Index>(g) * head_dim;
        S.resize(static_cast<size_t>(rows * ld));
        gemm(Trans::No, Trans::Yes, rows, n, head_dim, scale, q, qd, K + kv_off, ld_kv, 0.0f, S.data(), ld);
        if (mix) {
          // Scores of the quantized keys; each row takes those below its exact threshold.
          Sq.resize(static_cast<size_t>(rows * ld));
          gemm(Trans::No, Trans::Yes, rows, n, head_dim, scale, q, qd, mix->Kq + kv_off, ld_kv, 0.0f, Sq.data(), ld);
          for (Index r = 0; r < rows; ++r) {
            const Index ek = kv_exact_from(past + i0 + r, mix->key_chunk, mix->residual);
            std::copy(Sq.data() + r * ld, Sq.data() + r * ld + ek, S.data() + r * ld);
          }
        }
        for (Index r = 0; r < rows; ++r) {
          float* s = S.data() + r * ld;
          const Index valid = past + i0 + r + 1;  // causal: keys at positions <= the query's
          Eigen::Map<Eigen::ArrayXf, Eigen::Aligned16> p(s, valid);
          p -= p.maxCoeff();
          detmath::exp_inplace(s, valid);
          p *= 1.0f / p.sum();
          std::fill(s + valid, s + n, 0.0f);
        }
        float* o = out.data() + i0 * qd + static_cast<Index>(hh) * head_dim;
        if (!mix) {
          gemm(Trans::No, Trans::No, rows, head_dim, n, 1.0f, S.data(), ld, V + kv_off, ld_kv, 0.0f, o, qd);
          return;
        }
        // P = Pq + Pe split at each row's value threshold: O = Pq Vq + Pe V.
        for (Index r = 0; r < rows; ++r) {
          const Index ev = kv_exact_from(past + i0 + r, mix->value_chunk, mix->residual);
          float* s = S.data() + r * ld;
          float* sq = Sq.data() + r * ld;
          std::copy(s, s + ev, sq);
          std::fill(sq + ev, sq + n, 0.0f);
          std::fill(s, s + ev, 0.0f);
        }
        gemm(Trans::No, Trans::No, rows, head_dim, n, 1.0f, Sq.data(), ld, mix->Vq + kv_off, ld_kv, 0.0f, o, qd);
        gemm(Trans::No, Trans::No, rows, head_dim, n, 1.0f, S.data(), ld, V + kv_off, ld_kv, 1.0f, o, qd);
      });
  }
  errs.rethrow();
}

}  // namespace ql
