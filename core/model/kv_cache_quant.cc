#include "core/model/kv_cache_quant.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>

#include "core/error.h"
#include "core/linalg.h"
#include "core/model/ops.h"
#include "core/quantize.h"

namespace ql {

int64_t KvChunkCodes::bytes() const {
  const int64_t n = static_cast<int64_t>(codes.size());
  return (n * bits + 7) / 8 + 2 * static_cast<int64_t>(scales.size()) + 2 * static_cast<int64_t>(zeros.size());
}

KvChunkCodes concat_rows(const std::vector<const KvChunkCodes*>& chunks) {
  KvChunkCodes out;
  if (chunks.empty()) return out;
  out.kind = chunks[0]->kind;
  out.cols = chunks[0]->cols;
  out.bits = chunks[0]->bits;
  for (const KvChunkCodes* c : chunks) {
    if (c->kind != out.kind || c->cols != out.cols || c->bits != out.bits || !c->zeros.empty())
      throw ShapeError("concat_rows: chunks of different kinds, widths or bit widths");
    out.rows += c->rows;
    out.codes.insert(out.codes.end(), c->codes.begin(), c->codes.end());
    out.scales.insert(out.scales.end(), c->scales.begin(), c->scales.end());
  }
  return out;
}

int64_t kv_exact_from(int64_t t, int chunk, int residual) {
  const int64_t r = t + 1 - residual;
  return r <= 0 ? 0 : (r / chunk) * chunk;
}

void KvQuantizer::fake_quant_complete_chunks(KvKind kind, Matrix& X) const {
  const int c = kind == KvKind::Key ? key_chunk() : value_chunk();
  const Index full = X.rows() / c * c;
  if (full == 0) return;
  Matrix rows = X.topRows(full);
  decode(encode(kind, rows), rows);
  X.topRows(full) = rows;
}

int64_t KvQuantizer::cache_bytes(int64_t n, Index kv_dim) const {
  int64_t bytes = 0;
  for (KvKind kind : {KvKind::Key, KvKind::Value}) {
    const int c = kind == KvKind::Key ? key_chunk() : value_chunk();
    const int64_t enc = std::min(n, kv_exact_from(n, c, residual_length())) / c * c;
    const int64_t chunks = enc / c;
    if (chunks > 0) bytes += chunks * encode(kind, Matrix::Zero(c, kv_dim)).bytes();
    bytes += (n - enc) * kv_dim * 2;
  }
  return bytes;
}

double KvQuantizer::kv_bits(int64_t n, Index kv_dim) const {
  return n <= 0 ? 16.0 : 8.0 * static_cast<double>(cache_bytes(n, kv_dim)) / (2.0 * n * kv_dim);
}

namespace {

/// One asymmetric grid on [min(x, 0), max(x, 0)] of n strided values, through core/quantize.h.
Grid kv_grid(const float* x, Index n, Index stride, const QuantSpec& spec, const ActClip& clip) {
  float lo = 0.0f, hi = 0.0f;
  for (Index i = 0; i < n; ++i) {
    lo = std::min(lo, x[i * stride]);
    hi = std::max(hi, x[i * stride]);
  }
  return grid_from_range(lo * clip.lo, hi * clip.hi, spec);
}

class ScalarKvQuantizer final : public KvQuantizer {
 public:
  ScalarKvQuantizer(const ScalarKvSpec& s, int head_dim, Index kv_dim) : s_(s), kv_dim_(kv_dim) {
    group_ = s.group_size > 0 ? s.group_size : head_dim;
    if (group_ <= 0 || kv_dim % group_ != 0)
      throw ShapeError("kv quantizer: channel group " + std::to_string(group_) + " does not divide the KV width " +
                       std::to_string(kv_dim));
    for (int b : {s.key_bits, s.value_bits})
      if (b < 1 || b > 8) throw ShapeError("kv quantizer: bits " + std::to_string(b) + " outside 1..8");
    if (s.keys_per_channel && s.token_group < 1)
      throw ShapeError("kv quantizer: token_group " + std::to_string(s.token_group) + " < 1");
    if (s.residual_length < 0) throw ShapeError("kv quantizer: negative residual_length");
    if (s.keys_per_channel && !s.key_clip.identity())
      throw ShapeError("kv quantizer: learned key clipping is for per-token key grids, not per-channel ones");
    for (const ActClip& c : {s.key_clip, s.value_clip})
      if (!(c.lo > 0.0f && c.lo <= 1.0f && c.hi > 0.0f && c.hi <= 1.0f))
        throw ShapeError("kv quantizer: clip ratios outside (0, 1]");
  }
  KvStage key_stage() const override { return s_.key_stage; }
  int key_chunk() const override { return s_.keys_per_channel ? s_.token_group : 1; }
  int value_chunk() const override { return 1; }
  int residual_length() const override { return s_.residual_length; }

  KvChunkCodes encode(KvKind kind, const Matrix& X) const override {
    check(X);
    KvChunkCodes c;
    c.kind = kind;
    c.rows = X.rows();
    c.cols = X.cols();
    c.bits = kind == KvKind::Key ? s_.key_bits : s_.value_bits;
    const QuantSpec spec = spec_of(c.bits);
    const ActClip& clip = kind == KvKind::Key ? s_.key_clip : s_.value_clip;
    c.codes.resize(static_cast<size_t>(X.size()));
    std::vector<int32_t> q(static_cast<size_t>(std::max<Index>(X.rows(), group_)));
    auto put = [&](const float* x, Index n, Index stride, uint8_t* out, Index out_stride) {
      const Grid g = kv_grid(x, n, stride, spec, clip);
      quantize_with_grid(x, n, stride, g, q.data(), nullptr, 1);
      for (Index i = 0; i < n; ++i) out[i * out_stride] = static_cast<uint8_t>(q[i]);
      c.scales.push_back(g.scale);
      c.zeros.push_back(g.zero);
    };
    if (kind == KvKind::Key && s_.keys_per_channel) {
      // One grid per channel over each chunk of token_group tokens (KIVI's keys).
      const Index tg = s_.token_group;
      if (X.rows() % tg != 0) throw ShapeError("kv quantizer: key rows not a multiple of token_group");
      for (Index r0 = 0; r0 < X.rows(); r0 += tg)
        for (Index ch = 0; ch < X.cols(); ++ch)
          put(X.data() + r0 * X.cols() + ch, tg, X.cols(), c.codes.data() + r0 * X.cols() + ch, X.cols());
    } else {
      for (Index r = 0; r < X.rows(); ++r)
        for (Index g0 = 0; g0 < X.cols(); g0 += group_)
          put(X.data() + r * X.cols() + g0, group_, 1, c.codes.data() + r * X.cols() + g0, 1);
    }
    return c;
  }

  void decode(const KvChunkCodes& c, Matrix& X) const override {
    X.resize(c.rows, c.cols);
    const QuantSpec spec = spec_of(c.bits);
    const bool per_channel = c.kind == KvKind::Key && s_.keys_per_channel;
    std::size_t gi = 0;
    auto get = [&](Index r0, Index ch0, Index n, Index stride) {
      const Grid g{c.scales[gi], c.zeros[gi], spec.qmin(), spec.qmax()};
      ++gi;
      for (Index i = 0; i < n; ++i) {
        const Index k = r0 * c.cols + ch0 + i * stride;
        X.data()[k] = dequantize_value(c.codes[k], g);
      }
    };
    if (per_channel) {
      for (Index r0 = 0; r0 < c.rows; r0 += s_.token_group)
        for (Index ch = 0; ch < c.cols; ++ch) get(r0, ch, s_.token_group, c.cols);
    } else {
      for (Index r = 0; r < c.rows; ++r)
        for (Index g0 = 0; g0 < c.cols; g0 += group_) get(r, g0, group_, 1);
    }
  }

  double bits_per_element(KvKind kind, Index) const override {
    const bool per_channel = kind == KvKind::Key && s_.keys_per_channel;
    const double per_grid = per_channel ? s_.token_group : group_;
    return (kind == KvKind::Key ? s_.key_bits : s_.value_bits) + 32.0 / per_grid;
  }

  std::string describe() const override {
    return "scalar asym K" + std::to_string(s_.key_bits) + " V" + std::to_string(s_.value_bits) +
           (s_.keys_per_channel ? " keys per channel/" + std::to_string(s_.token_group) + " tokens"
                                : " keys per token") +
           ", values per token, channel group " + std::to_string(group_) + ", R=" +
           std::to_string(s_.residual_length) + (s_.key_stage == KvStage::PreRope ? ", pre-RoPE keys" : ", post-RoPE keys") +
           clip_text("key", s_.key_clip) + clip_text("value", s_.value_clip);
  }

 private:
  static std::string clip_text(const char* what, const ActClip& c) {
    if (c.identity()) return "";
    char buf[96];
    std::snprintf(buf, sizeof buf, ", learned %s clip [%.4f, %.4f]", what, c.lo, c.hi);
    return buf;
  }
  static QuantSpec spec_of(int bits) {
    QuantSpec q;
    q.bits = bits;
    q.scheme = QuantScheme::Asym;
    q.granularity = Granularity::PerTensor;
    q.scale_dtype = ScaleDtype::F32;
    return q;
  }
  void check(const Matrix& X) const {
    if (X.cols() != kv_dim_)
      throw ShapeError("kv quantizer: rows of width " + std::to_string(X.cols()) + ", KV width is " +
                       std::to_string(kv_dim_));
  }

  ScalarKvSpec s_;
  Index kv_dim_;
  Index group_ = 0;
};

}  // namespace

std::unique_ptr<KvQuantizer> make_scalar_kv_quantizer(const ScalarKvSpec& spec, int head_dim, Index kv_dim) {
  return std::make_unique<ScalarKvQuantizer>(spec, head_dim, kv_dim);
}


namespace {

struct AttnSums {
  double err2 = 0, ref2 = 0, overlap = 0, queries = 0;
};

/// Indices of the k largest of row t's first n entries of M (ties: lower index), sorted.
void top_k_of(const Matrix& M, Index t, Index n, int k, std::vector<int>& idx) {
  idx.resize(static_cast<size_t>(n));
  std::iota(idx.begin(), idx.end(), 0);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                    [&](int x, int y) { return M(t, x) > M(t, y) || (M(t, x) == M(t, y) && x < y); });
  idx.resize(static_cast<size_t>(k));
  std::sort(idx.begin(), idx.end());
}

/// Causal scores of every head of one window against exact and quantized post-RoPE keys.
void attention_sums(const Matrix& Q, const Matrix& K, const Matrix& Kq, int num_heads, int num_kv_heads, int hd,
                    int k, AttnSums& d) {
  const Index T = Q.rows();
  std::vector<int> a, b, common;
  for (int h = 0; h < num_heads; ++h) {
    const Index kc = Index(h / (num_heads / num_kv_heads)) * hd;
    const Matrix Qh = Q.middleCols(Index(h) * hd, hd);
    const Matrix S = matmul_nt(Qh, K.middleCols(kc, hd)), Sq = matmul_nt(Qh, Kq.middleCols(kc, hd));
    for (Index t = 0; t < T; ++t) {
      d.err2 += (S.row(t).head(t + 1) - Sq.row(t).head(t + 1)).cast<double>().squaredNorm();
      d.ref2 += S.row(t).head(t + 1).cast<double>().squaredNorm();
      if (t + 1 < k) continue;
      top_k_of(S, t, t + 1, k, a);
      top_k_of(Sq, t, t + 1, k, b);
      common.clear();
      std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(common));
      d.overlap += static_cast<double>(common.size()) / k;
      d.queries += 1;
    }
  }
}

}  // namespace

KvErrorStats measure_kv_error(const KvQuantizer& kq, int num_heads, int num_kv_heads, int head_dim, const RopeSpec& rope,
                              const Matrix& k_pre, const Matrix& k_post, const Matrix& v, const Matrix& q,
                              const std::vector<Index>& window_rows, std::size_t first_window, int top_k) {
  if (top_k < 1) throw ShapeError("kv error: top_k must be >= 1");
  KvErrorStats st;
  const bool pre = kq.key_stage() == KvStage::PreRope;
  double kerr = 0, kref = 0, verr = 0, vref = 0;
  AttnSums as;
  Index r0 = 0;
  for (std::size_t w = 0; w < window_rows.size(); r0 += window_rows[w], ++w) {
    if (w < first_window) continue;
    const Index T = window_rows[w];
    const Matrix K = (pre ? k_pre : k_post).middleRows(r0, T), V = v.middleRows(r0, T);
    Matrix Kq = K, Vq = V;
    kq.fake_quant_complete_chunks(KvKind::Key, Kq);
    kq.fake_quant_complete_chunks(KvKind::Value, Vq);
    kerr += (Kq - K).cast<double>().squaredNorm();
    kref += K.cast<double>().squaredNorm();
    verr += (Vq - V).cast<double>().squaredNorm();
    vref += V.cast<double>().squaredNorm();
    if (pre) {
      RopeTables tab;
      rope_tables(0, T, head_dim, rope, tab);
      rope_forward(Kq, num_kv_heads, head_dim, tab);
    }
    attention_sums(q.middleRows(r0, T), k_post.middleRows(r0, T), Kq, num_heads, num_kv_heads, head_dim, top_k, as);
  }
  st.key_rel_mse = kref > 0 ? kerr / kref : 0.0;
  st.value_rel_mse = vref > 0 ? verr / vref : 0.0;
  st.attn_score_rel_err = as.ref2 > 0 ? std::sqrt(as.err2 / as.ref2) : 0.0;
  st.attn_topk_agreement = as.queries > 0 ? as.overlap / as.queries : 1.0;
  return st;
}

}  // namespace ql
