#include "core/model/kv_vq.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/model/ops.h"
#include "core/rng.h"

namespace ql {
namespace {

float fp16(float x) { return static_cast<float>(Eigen::half(x)); }

int stages_of(const KvVqSpec& s, KvKind kind) { return kind == KvKind::Key ? s.key_stages : s.value_stages; }

/// Byte offset of group g's codes in a row of `groups` groups of 2·stages bytes.
Index code_offset(int g, int stages) { return Index(g) * 2 * stages; }

}  // namespace

VqKvQuantizer::VqKvQuantizer(const KvVqSpec& spec, const HeadLayout& heads) : spec_(spec), heads_(heads) {
  if (heads.head_dim < 2 || heads.head_dim % 2 != 0 || heads.num_kv_heads < 1)
    throw ShapeError("kv vq: head_dim " + std::to_string(heads.head_dim) + " must be even");
  if (spec.group_heads < 1 || heads.num_kv_heads % spec.group_heads != 0)
    throw ShapeError("kv vq: a group of " + std::to_string(spec.group_heads) + " KV heads does not divide the " +
                     std::to_string(heads.num_kv_heads) + " KV heads (a group never splits a head)");
  if (spec.key_structure == VqStructure::Commutative && spec.key_stage != KvStage::PreRope)
    throw ShapeError("kv vq: commutative key codebooks quantize keys before RoPE");
  if (spec.key_stages < 1 || spec.value_stages < 1) throw ShapeError("kv vq: stages must be >= 1");
  if (spec.residual_length < 0) throw ShapeError("kv vq: negative residual_length");
  const int half = heads.head_dim / 2;
  for (int h = 0; h < spec.group_heads; ++h)
    for (int i = 0; i < half; ++i) {
      key_perm_.push_back(Index(h) * heads.head_dim + i);
      key_perm_.push_back(Index(h) * heads.head_dim + i + half);
    }
}

Matrix VqKvQuantizer::gather(KvKind kind, const Matrix& X, int g) const {
  const Index gw = group_width();
  std::vector<Index> ch(static_cast<size_t>(gw));
  std::vector<float> inv(static_cast<size_t>(gw), 1.0f);
  for (Index e = 0; e < gw; ++e) {
    ch[e] = kind == KvKind::Key ? key_channel(g, e) : value_channel(g, e);
    if (kind == KvKind::Value) inv[e] = 1.0f / value_scale_(ch[e]);
  }
  Matrix Y(X.rows(), gw);
  for (Index r = 0; r < X.rows(); ++r) {  // row by row: both sides stay in cache
    const float* x = X.data() + r * X.cols();
    float* y = Y.data() + r * gw;
    for (Index e = 0; e < gw; ++e) y[e] = x[ch[e]] * inv[e];
  }
  return Y;
}

std::shared_ptr<VqKvQuantizer> VqKvQuantizer::fit(const KvVqSpec& spec, const HeadLayout& heads, const Matrix& keys,
                                                  const Matrix& values, KvVqFitReport* report) {
  std::shared_ptr<VqKvQuantizer> q(new VqKvQuantizer(spec, heads));
  const Index kvd = heads.kv_dim();
  if (keys.cols() != kvd || values.cols() != kvd || keys.rows() != values.rows())
    throw ShapeError("kv vq: calibration K/V must be tokens x " + std::to_string(kvd));
  // Per-channel value scale: mean |v| (the reference's make_scale.py); a channel that is
  // always 0 gets 1.
  q->value_scale_ = values.cwiseAbs().colwise().mean().transpose();
  for (Index c = 0; c < kvd; ++c)
    if (!(q->value_scale_(c) > 0)) q->value_scale_(c) = 1.0f;
  const int groups = heads.num_kv_heads / spec.group_heads;
  if (report) {
    report->keys.assign(static_cast<size_t>(groups), {});
    report->values.assign(static_cast<size_t>(groups), {});
  }
  for (int g = 0; g < groups; ++g)
    for (KvKind kind : {KvKind::Key, KvKind::Value}) {
      Matrix X = q->gather(kind, kind == KvKind::Key ? keys : values, g);
      // Unit rows, errors weighted by the squared norm (the reference's loss is on k·‖k‖).
      Vector w(X.rows());
      for (Index r = 0; r < X.rows(); ++r) {
        const float n = X.row(r).norm();
        w(r) = n * n;
        if (n > 0) X.row(r) /= n;
      }
      VqFitOptions o;
      o.structure = kind == KvKind::Key ? spec.key_structure : VqStructure::Free;
      o.stages = stages_of(spec, kind);
      o.sub_bits = spec.sub_bits;
      o.max_steps = spec.max_steps;
      o.t_start = spec.t_start;
      o.t_end = spec.t_end;
      o.seed = mix_stream(spec.seed, static_cast<uint64_t>(g) * 2 + (kind == KvKind::Key ? 0 : 1));
      std::vector<VqStageReport>* rep =
          report ? &(kind == KvKind::Key ? report->keys : report->values)[static_cast<size_t>(g)] : nullptr;
      (kind == KvKind::Key ? q->key_vq_ : q->value_vq_).push_back(ResidualVq::fit(X, w, o, rep));
    }
  return q;
}

KvChunkCodes VqKvQuantizer::encode(KvKind kind, const Matrix& X) const {
  if (X.cols() != heads_.kv_dim()) throw ShapeError("kv vq: encode width differs from the KV width");
  const int S = stages_of(spec_, kind), G = groups();
  const Index per_row = code_offset(G, S);
  KvChunkCodes c;
  c.kind = kind;
  c.rows = X.rows();
  c.cols = X.cols();
  c.bits = spec_.sub_bits;
  c.codes.assign(static_cast<size_t>(X.rows() * per_row), 0);
  c.scales.assign(static_cast<size_t>(X.rows() * G), 0.0f);
  std::vector<uint8_t> gc(static_cast<size_t>(X.rows()) * 2 * S);
  for (int g = 0; g < G; ++g) {
    Matrix Y = gather(kind, X, g);
    for (Index r = 0; r < Y.rows(); ++r) {
      const float n = Y.row(r).norm();
      c.scales[static_cast<size_t>(r * G + g)] = fp16(n);
      if (n > 0) Y.row(r) /= n;
    }
    (kind == KvKind::Key ? key_vq_ : value_vq_)[g].encode(Y, gc.data());
    for (Index r = 0; r < Y.rows(); ++r)
      std::copy_n(gc.data() + r * 2 * S, 2 * S, c.codes.data() + r * per_row + code_offset(g, S));
  }
  return c;
}

void VqKvQuantizer::decode(const KvChunkCodes& c, Matrix& X) const {
  const int S = stages_of(spec_, c.kind), G = groups();
  const Index per_row = code_offset(G, S);
  if (c.cols != heads_.kv_dim() || static_cast<Index>(c.codes.size()) != c.rows * per_row)
    throw ShapeError("kv vq: codes do not match this quantizer");
  X.resize(c.rows, c.cols);
  std::vector<uint8_t> gc(static_cast<size_t>(c.rows) * 2 * S);
  Matrix Y;
  for (int g = 0; g < G; ++g) {
    for (Index r = 0; r < c.rows; ++r)
      std::copy_n(c.codes.data() + r * per_row + code_offset(g, S), 2 * S, gc.data() + r * 2 * S);
    (c.kind == KvKind::Key ? key_vq_ : value_vq_)[g].decode(gc.data(), c.rows, Y);
    const Index gw = group_width();
    std::vector<Index> ch(static_cast<size_t>(gw));
    std::vector<float> mul(static_cast<size_t>(gw), 1.0f);
    for (Index e = 0; e < gw; ++e) {
      ch[e] = c.kind == KvKind::Key ? key_channel(g, e) : value_channel(g, e);
      if (c.kind == KvKind::Value) mul[e] = value_scale_(ch[e]);
    }
    for (Index r = 0; r < c.rows; ++r) {
      const float n = c.scales[static_cast<size_t>(r * G + g)];
      const float* y = Y.data() + r * gw;
      float* x = X.data() + r * c.cols;
      for (Index e = 0; e < gw; ++e) x[ch[e]] = y[e] * n * mul[e];
    }
  }
}

bool VqKvQuantizer::encoded_scores(const KvChunkCodes& keys, const RopeSpec& rope, const Matrix& queries,
                                   Matrix& out) const {
  if (spec_.key_structure != VqStructure::Commutative) return false;
  vq_key_scores_fast(*this, keys, 0, rope, queries, out);
  return true;
}

bool VqKvQuantizer::encoded_value_sum(const KvChunkCodes& values, const Matrix& p, Matrix& out) const {
  vq_value_sum_fast(*this, values, p, out);
  return true;
}

int64_t VqKvQuantizer::codebook_bytes() const {
  int64_t n = value_scale_.size();
  for (const auto* v : {&key_vq_, &value_vq_})
    for (const ResidualVq& cb : *v)  // commutative: V = i·U is implied
      n += (cb.structure() == VqStructure::Commutative ? 1 : 2) * int64_t(cb.stages()) * cb.entries() * cb.dim();
  return 2 * n;
}

double VqKvQuantizer::bits_per_element(KvKind kind, Index) const {
  const double per_group = 2.0 * spec_.sub_bits * stages_of(spec_, kind) + 16.0;
  return per_group / static_cast<double>(group_width());
}

std::string VqKvQuantizer::describe() const {
  const int sb = 2 * spec_.sub_bits;
  return std::string(spec_.key_structure == VqStructure::Commutative ? "commutative" : "free") + " VQ K " +
         std::to_string(spec_.key_stages) + "x" + std::to_string(sb) + "b (" +
         (spec_.key_stage == KvStage::PreRope ? "pre-RoPE" : "post-RoPE") + "), V " +
         std::to_string(spec_.value_stages) + "x" + std::to_string(sb) + "b free, groups of " +
         std::to_string(group_width()) + " channels, fp16 norms, R=" + std::to_string(spec_.residual_length);
}

// ------------------------------------------------------------------------------------------
// Scoring with the encoded cache
// ------------------------------------------------------------------------------------------

namespace {

/// Which group, and which head inside it, query head h reads.
struct HeadSite {
  int group, local, kv_head;
};
HeadSite site(const VqKvQuantizer& q, int h) {
  const int kvh = q.heads().kv_head_of(h);
  return {kvh / q.spec().group_heads, kvh % q.spec().group_heads, kvh};
}

void check_scoring(const VqKvQuantizer& q, const KvChunkCodes& c, KvKind kind, Index rows_of_other, const char* what) {
  if (c.kind != kind) throw ShapeError(std::string("kv vq scores: ") + what + " codes of the wrong kind");
  if (rows_of_other != q.heads().num_heads) throw ShapeError(std::string("kv vq scores: ") + what + ": one row per query head");
}

}  // namespace

namespace {

/// The query-codeword products of the r query heads that read KV head `site.kv_head`, one row
/// per stage and sub-table entry: row (s, e) = per head k [Re P (half) | Im P (half)] with
/// P_j = conj(q_kj)·u_s,j[e] over the head's pairs j. i·P[B] = [−Im | Re] is read from the same
/// row, so the table has S·E rows of r·head_dim floats.
void query_table(const ResidualVq& cb, const HeadSite& site, const Matrix& queries, int first_head, int r, int hd,
                 Matrix& P) {
  const int half = hd / 2, S = cb.stages(), E = cb.entries();
  P.resize(Index(S) * E, Index(r) * hd);
  for (int s = 0; s < S; ++s)
    for (int e = 0; e < E; ++e) {
      const float* u = cb.U(s).data() + Index(e) * cb.dim() + Index(site.local) * hd;
      for (int k = 0; k < r; ++k) {
        float* row = P.data() + (Index(s) * E + e) * P.cols() + Index(k) * hd;
        const float* qh = queries.data() + Index(first_head + k) * hd;
        for (int i = 0; i < half; ++i) {
          const float a = u[2 * i], b = u[2 * i + 1], qx = qh[i], qy = qh[i + half];
          row[i] = qx * a + qy * b;         // Re conj(q)·u
          row[half + i] = qx * b - qy * a;  // Im conj(q)·u
        }
      }
    }
}

}  // namespace

void vq_key_scores_fast(const VqKvQuantizer& q, const KvChunkCodes& keys, int64_t pos0, const RopeSpec& rope,
                        const Matrix& queries, Matrix& out) {
  check_scoring(q, keys, KvKind::Key, queries.rows(), "keys");
  if (q.spec().key_structure != VqStructure::Commutative || q.key_stage() != KvStage::PreRope)
    throw ShapeError("kv vq scores: the fast path needs commutative pre-RoPE key codebooks");
  const HeadLayout& hl = q.heads();
  const int hd = hl.head_dim, half = hd / 2, r = hl.queries_per_kv(), S = q.spec().key_stages,
            E = 1 << q.spec().sub_bits, G = q.groups();
  const Index n = keys.rows, per_row = code_offset(G, S), W = Index(r) * hd;
  RopeTables tab;
  rope_tables(pos0, n, hd, rope, tab);
  out.resize(hl.num_heads, n);
  using Arr = Eigen::Map<Eigen::ArrayXf>;  // maps: vectorised whatever the compiler's cost model
  using CArr = Eigen::Map<const Eigen::ArrayXf>;
  Matrix P;
  Eigen::ArrayXf acc(W);
  // The r query heads of one KV head share the gathers: one table row holds all their products.
  for (int kvh = 0; kvh < hl.num_kv_heads; ++kvh) {
    const HeadSite st = site(q, kvh * r);
    query_table(q.key_codebook(st.group), st, queries, kvh * r, r, hd, P);
    for (Index t = 0; t < n; ++t) {
      const uint8_t* code = keys.codes.data() + t * per_row + code_offset(st.group, S);
      acc.setZero();
      for (int s = 0; s < S; ++s) {
        const float* pa = P.data() + (Index(s) * E + code[2 * s]) * W;
        const float* pb = P.data() + (Index(s) * E + code[2 * s + 1]) * W;
        for (int k = 0; k < r; ++k, pa += hd, pb += hd) {
          Arr(acc.data() + Index(k) * hd, half) += CArr(pa, half) - CArr(pb + half, half);  // Re(P[A] + i·P[B])
          Arr(acc.data() + Index(k) * hd + half, half) += CArr(pa + half, half) + CArr(pb, half);  // Im
        }
      }
      const float norm = keys.scales[static_cast<size_t>(t * G + st.group)];
      const CArr cs(tab.cos.data() + t * half, half), sn(tab.sin.data() + t * half, half);
      for (int k = 0; k < r; ++k)  // Re(e^{i m θ} acc) summed over the pairs
        out(kvh * r + k, t) =
            norm * (cs * acc.segment(Index(k) * hd, half) - sn * acc.segment(Index(k) * hd + half, half)).sum();
    }
  }
}

void vq_key_scores_decoded(const VqKvQuantizer& q, const KvChunkCodes& keys, int64_t pos0, const RopeSpec& rope,
                           const Matrix& queries, Matrix& out) {
  check_scoring(q, keys, KvKind::Key, queries.rows(), "keys");
  const HeadLayout& hl = q.heads();
  Matrix K;
  q.decode(keys, K);
  if (q.key_stage() == KvStage::PreRope) {
    RopeTables tab;
    rope_tables(pos0, keys.rows, hl.head_dim, rope, tab);
    rope_forward(K, hl.num_kv_heads, hl.head_dim, tab);
  }
  out.resize(hl.num_heads, keys.rows);
  for (int h = 0; h < hl.num_heads; ++h)
    out.row(h) = K.middleCols(Index(hl.kv_head_of(h)) * hl.head_dim, hl.head_dim) *
                 queries.row(h).transpose();
}

void vq_value_sum_fast(const VqKvQuantizer& q, const KvChunkCodes& values, const Matrix& p, Matrix& out) {
  check_scoring(q, values, KvKind::Value, p.rows(), "values");
  const HeadLayout& hl = q.heads();
  const int S = q.spec().value_stages, E = 1 << q.spec().sub_bits, G = q.groups(), hd = hl.head_dim;
  const Index n = values.rows, per_row = code_offset(G, S);
  if (p.cols() != n) throw ShapeError("kv vq scores: one probability per cached value");
  out.resize(hl.num_heads, hd);
  Matrix WA(S, E), WB(S, E);
  for (int h = 0; h < hl.num_heads; ++h) {
    const HeadSite st = site(q, h);
    WA.setZero();
    WB.setZero();
    for (Index t = 0; t < n; ++t) {
      const uint8_t* code = values.codes.data() + t * per_row + code_offset(st.group, S);
      const float w = p(h, t) * values.scales[static_cast<size_t>(t * G + st.group)];
      for (int s = 0; s < S; ++s) {
        WA(s, code[2 * s]) += w;
        WB(s, code[2 * s + 1]) += w;
      }
    }
    const ResidualVq& cb = q.value_codebook(st.group);
    Eigen::RowVectorXf o = Eigen::RowVectorXf::Zero(hd);
    for (int s = 0; s < S; ++s)  // Σ_e W[s][e] · entry e (in order: the same bits everywhere)
      for (int e = 0; e < E; ++e) {
        if (WA(s, e) != 0) o += WA(s, e) * cb.U(s).row(e).segment(Index(st.local) * hd, hd);
        if (WB(s, e) != 0) o += WB(s, e) * cb.V(s).row(e).segment(Index(st.local) * hd, hd);
      }
    for (int c = 0; c < hd; ++c) out(h, c) = o(c) * q.value_scale()(Index(st.kv_head) * hd + c);
  }
}

void vq_value_sum_decoded(const VqKvQuantizer& q, const KvChunkCodes& values, const Matrix& p, Matrix& out) {
  check_scoring(q, values, KvKind::Value, p.rows(), "values");
  const HeadLayout& hl = q.heads();
  if (p.cols() != values.rows) throw ShapeError("kv vq scores: one probability per cached value");
  Matrix V;
  q.decode(values, V);
  out.resize(hl.num_heads, hl.head_dim);
  for (int h = 0; h < hl.num_heads; ++h)
    out.row(h) = p.row(h) * V.middleCols(Index(hl.kv_head_of(h)) * hl.head_dim, hl.head_dim);
}

}  // namespace ql
