#include "core/model/transformer.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "core/detmath.h"
#include "core/error.h"
#include "core/linalg.h"
#include "core/model/ops.h"
#include "core/parallel.h"

namespace ql {

namespace {

std::string shape_str(Index r, Index c) { return std::to_string(r) + "x" + std::to_string(c); }

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
  Matrix x;                // RMSNorm of the residual: q/k/v input, then gate/up input
  Matrix xn;               // normed residual of the head, T x hidden
  Matrix x1, x2, x3;       // per-linear copies of a shared input when transform_input is set
  Matrix q, k, v, attn;    // T x q_dim, T x kv_dim, T x kv_dim, T x q_dim
  Matrix out;              // T x hidden (o_proj / down_proj result)
  Matrix gate, up;         // T x intermediate
  RopeTables rope;         // RoPE tables of the current positions
  Matrix kq, vq;           // keys / values as a KV quantizer's read rule sees them
  std::vector<Matrix> k_pre;  // per block: pre-RoPE keys of the new tokens (pre-RoPE quantizers)
};

Eigen::Map<const Matrix> Transformer::KvCache::keys(int b) const {
  if (k_.empty()) return Eigen::Map<const Matrix>(nullptr, 0, 0);
  return Eigen::Map<const Matrix>(k_.at(b).data(), length_, k_.at(b).cols());
}

int64_t Transformer::KvCache::bytes(int b) const {
  const int64_t kvd = k_.empty() ? 0 : k_.at(b).cols();
  if (enc_.empty()) return 2 * length_ * kvd * 2;
  const Encoded& e = enc_.at(b);
  int64_t bytes = (length_ - e.k) * kvd * 2 + (length_ - e.v) * kvd * 2;
  for (const KvChunkCodes& c : e.codes) bytes += c.bytes();
  return bytes;
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
  if (!(c.rms_norm_eps > 0.0) || !(c.rope.theta > 0.0))
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
  if (c.qk_norm) {
    check_vector(blk.q_norm, c.head_dim, where + ".self_attn.q_norm.weight");
    check_vector(blk.k_norm, c.head_dim, where + ".self_attn.k_norm.weight");
  } else if (blk.q_norm.size() || blk.k_norm.size()) {
    throw ShapeError("transformer: " + where + " has q/k norms, which config (" + c.architecture + ") does not declare");
  }
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
  for (int s = 0; s < kBlockStages; ++s) run_stage(b, s, w, h, pos0, cache, hooks, parallel, ws);
}

const Matrix& Transformer::stage_input(int stage, const DecoderBlock& w, const Matrix& h, Workspace& ws) const {
  const float eps = static_cast<float>(w_.config.rms_norm_eps);
  switch (stage) {
    case 0: rms_norm_forward(h, w.input_norm, eps, ws.x); return ws.x;
    case 1: return ws.attn;
    case 2: rms_norm_forward(h, w.post_attn_norm, eps, ws.x); return ws.x;
    case 3: return ws.gate;
    default:
      throw ShapeError("transformer: block stage " + std::to_string(stage) + " outside [0, " +
                       std::to_string(kBlockStages) + ")");
  }
}

void Transformer::run_stage(int b, int stage, const DecoderBlock& w, Matrix& h, int64_t pos0, KvCache* cache,
                            const ForwardHooks* hooks, bool parallel, Workspace& ws) const {
  const ModelConfig& c = w_.config;
  stage_input(stage, w, h, ws);  // the RMSNorm of stages 0 and 2, with the weights as they are now
  // Stages 1 and 3: h += X Wᵀ (+ b) for o_proj on attention's output, down_proj on SwiGLU's.
  auto residual_linear = [&](LinearKind kind, Matrix& X) {
    const Linear& L = w.linear(kind);
    const Matrix* x = hooked_input(hooks, b, kind, X, false, ws.x1);
    const LinearJob job = {x, &L.W, &L.b, &ws.out};
    linear_forward(&job, 1, parallel);
    h += ws.out;
  };
  switch (stage) {
    case 0: {  // q, k, v projections of x = RMSNorm(h); RoPE; attention -> attn
      const Index T = ws.x.rows();
      const Matrix* xq = hooked_input(hooks, b, LinearKind::Q, ws.x, true, ws.x1);
      const Matrix* xk = hooked_input(hooks, b, LinearKind::K, ws.x, true, ws.x2);
      const Matrix* xv = hooked_input(hooks, b, LinearKind::V, ws.x, true, ws.x3);
      const LinearJob qkv[3] = {
          {xq, &w.q.W, &w.q.b, &ws.q}, {xk, &w.k.W, &w.k.b, &ws.k}, {xv, &w.v.W, &w.v.b, &ws.v}};
      linear_forward(qkv, 3, parallel);
      if (w.q_norm.size()) {  // Qwen3: per-head RMSNorm of q and k before RoPE
        head_rms_norm_forward(ws.q, c.num_heads, c.head_dim, w.q_norm, static_cast<float>(c.rms_norm_eps));
        head_rms_norm_forward(ws.k, c.num_kv_heads, c.head_dim, w.k_norm, static_cast<float>(c.rms_norm_eps));
      }
      call_kv_hook(hooks, b, KvStage::PreRope, ws.k, ws.v);
      const KvQuantizer* kvq = hooks && hooks->kv_quantizer ? hooks->kv_quantizer(b) : nullptr;
      if (kvq && kvq->key_stage() == KvStage::PreRope) {
        if (hooks->transform_qk)
          throw ShapeError("transformer: block " + std::to_string(b) +
                           " has a post-RoPE key transform and a pre-RoPE KV quantizer; quantize keys after RoPE");
        if (ws.k_pre.size() <= static_cast<std::size_t>(b)) ws.k_pre.resize(static_cast<std::size_t>(b) + 1);
        ws.k_pre[b] = ws.k;
      }
      if (ws.rope.pos0 != pos0 || ws.rope.rows != T) rope_tables(pos0, T, c.head_dim, c.rope, ws.rope);
      rope_forward(ws.q, c.num_heads, c.head_dim, ws.rope);
      rope_forward(ws.k, c.num_kv_heads, c.head_dim, ws.rope);
      if (hooks && hooks->transform_qk) {
        hooks->transform_qk(b, ws.q, ws.k);
        if (ws.q.rows() != T || ws.k.rows() != T || ws.k.cols() != ws.v.cols())
          throw ShapeError("transformer: transform_qk hook of block " + std::to_string(b) + " changed Q/K shapes");
      }
      call_kv_hook(hooks, b, KvStage::PostRope, ws.k, ws.v);
      run_attention(b, pos0, cache, kvq, parallel, ws);
      break;
    }
    case 1:  // h += o_proj(attn)
      residual_linear(LinearKind::O, ws.attn);
      break;
    case 2: {  // gate = silu(gate(x)) ⊙ up(x), x = RMSNorm(h)
      const Matrix* xg = hooked_input(hooks, b, LinearKind::Gate, ws.x, true, ws.x1);
      const Matrix* xu = hooked_input(hooks, b, LinearKind::Up, ws.x, true, ws.x2);
      swiglu_forward({xg, &w.gate.W, &w.gate.b, &ws.gate}, {xu, &w.up.W, &w.up.b, &ws.up}, parallel);
      break;
    }
    case 3:  // h += down_proj(gate)
      residual_linear(LinearKind::Down, ws.gate);
      break;
    default:
      break;  // stage_input threw
  }
}

namespace {

/// decode(encode(rows)) of `rows` (whole chunks of `kind`), i.e. their quantized values.
Matrix quantized_rows(const KvQuantizer& q, KvKind kind, const Matrix& rows) {
  Matrix out;
  q.decode(q.encode(kind, rows), out);
  return out;
}

}  // namespace

void Transformer::run_attention(int b, int64_t pos0, KvCache* cache, const KvQuantizer* kvq,
                                bool parallel, Workspace& ws) const {
  const ModelConfig& c = w_.config;
  const Index T = ws.q.rows(), kvd = ws.k.cols();
  const bool pre = kvq && kvq->key_stage() == KvStage::PreRope;
  if (!cache) {
    if (!kvq) {
      attention_forward(ws.q, ws.k.data(), ws.v.data(), kvd, 0, c.num_heads, c.num_kv_heads, c.head_dim,
                        parallel, ws.attn);
      return;
    }
    if (pos0 != 0)
      throw ShapeError("transformer: a KV-cache quantizer needs windows that start at position 0 (block " +
                       std::to_string(b) + " got pos0 " + std::to_string(pos0) + ")");
    ws.kq = pre ? ws.k_pre[b] : ws.k;
    kvq->fake_quant_complete_chunks(KvKind::Key, ws.kq);
    if (pre) rope_forward(ws.kq, c.num_kv_heads, c.head_dim, ws.rope);
    ws.vq = ws.v;
    kvq->fake_quant_complete_chunks(KvKind::Value, ws.vq);
    const KvMix mix{ws.kq.data(), ws.vq.data(), kvq->key_chunk(), kvq->value_chunk(), kvq->residual_length()};
    attention_forward(ws.q, ws.k.data(), ws.v.data(), kvd, 0, c.num_heads, c.num_kv_heads, c.head_dim,
                      parallel, ws.attn, &mix);
    return;
  }
  // Rows [length, length+T) were reserved by forward_incremental; length moves on only after
  // every block succeeded (encode_cache runs then).
  const int64_t past = cache->length_, n = past + T;
  cache->k_[b].middleRows(past, T) = ws.k;
  cache->v_[b].middleRows(past, T) = ws.v;
  if (kvq && cache->encoded_attention_ && T == 1) {
    attention_encoded(b, *cache, *kvq, ws);
    return;
  }
  if (!kvq) {
    attention_forward(ws.q, cache->k_[b].data(), cache->v_[b].data(), kvd, past, c.num_heads,
                      c.num_kv_heads, c.head_dim, parallel, ws.attn);
    return;
  }
  // Rows below the encoded counts already hold decoded values; the complete chunks after them
  // are quantized here for the read rule, exactly as the windowed path and encode_cache do.
  const KvCache::Encoded& e = cache->enc_.at(b);
  ws.kq = cache->k_[b].topRows(n);
  const Index ck = kvq->key_chunk(), full_k = (n - e.k) / ck * ck;
  if (full_k > 0) {
    if (pre) {
      Matrix rows(n - e.k, kvd);
      rows << e.k_pre, ws.k_pre[b];
      Matrix q = quantized_rows(*kvq, KvKind::Key, rows.topRows(full_k));
      RopeTables tab;
      rope_tables(e.k, full_k, c.head_dim, c.rope, tab);
      rope_forward(q, c.num_kv_heads, c.head_dim, tab);
      ws.kq.middleRows(e.k, full_k) = q;
    } else {
      ws.kq.middleRows(e.k, full_k) = quantized_rows(*kvq, KvKind::Key, ws.kq.middleRows(e.k, full_k));
    }
  }
  ws.vq = cache->v_[b].topRows(n);
  const Index cv = kvq->value_chunk(), full_v = (n - e.v) / cv * cv;
  if (full_v > 0)
    ws.vq.middleRows(e.v, full_v) = quantized_rows(*kvq, KvKind::Value, ws.vq.middleRows(e.v, full_v));
  const KvMix mix{ws.kq.data(), ws.vq.data(), kvq->key_chunk(), kvq->value_chunk(), kvq->residual_length()};
  attention_forward(ws.q, cache->k_[b].data(), cache->v_[b].data(), kvd, past, c.num_heads, c.num_kv_heads,
                    c.head_dim, parallel, ws.attn, &mix);
}

void Transformer::attention_encoded(int b, KvCache& cache, const KvQuantizer& kvq, Workspace& ws) const {
  const ModelConfig& c = w_.config;
  const int64_t past = cache.length_, n = past + 1;
  const int H = c.num_heads, hd = c.head_dim, grp = c.num_heads / c.num_kv_heads;
  if (kvq.key_chunk() != 1 || kvq.value_chunk() != 1)
    throw ShapeError("transformer: encoded attention needs one-token KV chunks (block " + std::to_string(b) + ")");
  const KvCache::Encoded& e = cache.enc_.at(b);
  // The read rule: the new query reads keys/values below q_from quantized. Rows past the
  // encoded ones (the new token when R = 0) are encoded here, as the other paths quantize them.
  const int64_t q_from = std::min(n, kv_exact_from(past, 1, kvq.residual_length()));
  std::vector<const KvChunkCodes*> kc, vc;
  for (const KvChunkCodes& ch : e.codes) (ch.kind == KvKind::Key ? kc : vc).push_back(&ch);
  KvChunkCodes extra_k, extra_v;
  if (q_from > e.k) {
    Matrix rows(n - e.k, ws.k.cols());
    if (kvq.key_stage() == KvStage::PreRope) rows << e.k_pre, ws.k_pre[b];
    else rows = cache.k_[b].middleRows(e.k, n - e.k);
    extra_k = kvq.encode(KvKind::Key, rows.topRows(q_from - e.k));
    kc.push_back(&extra_k);
  }
  if (q_from > e.v) {
    extra_v = kvq.encode(KvKind::Value, cache.v_[b].middleRows(e.v, q_from - e.v));
    vc.push_back(&extra_v);
  }
  Matrix Q(H, hd), Sk, O;
  for (int h = 0; h < H; ++h) Q.row(h) = ws.q.row(0).segment(Index(h) * hd, hd);
  if (q_from > 0 && !kvq.encoded_scores(concat_rows(kc), c.rope, Q, Sk))
    throw ShapeError("transformer: the KV quantizer of block " + std::to_string(b) + " has no encoded attention path");
  // Softmax as attention_forward: scaled scores, max subtracted, exp, normalised.
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  Matrix P(H, n);
  for (int h = 0; h < H; ++h) {
    const Index kv_off = Index(h / grp) * hd;
    for (int64_t j = 0; j < n; ++j)
      P(h, j) = j < q_from ? scale * Sk(h, j) : scale * cache.k_[b].row(j).segment(kv_off, hd).dot(Q.row(h));
    Eigen::ArrayXf p = P.row(h).transpose().array();
    p -= p.maxCoeff();
    detmath::exp_inplace(p.data(), n);
    P.row(h) = (p / p.sum()).transpose().matrix();
  }
  ws.attn = Matrix::Zero(1, Index(H) * hd);
  if (q_from > 0 && !kvq.encoded_value_sum(concat_rows(vc), P.leftCols(q_from), O))
    throw ShapeError("transformer: the KV quantizer of block " + std::to_string(b) + " has no encoded value path");
  for (int h = 0; h < H; ++h) {
    auto o = ws.attn.row(0).segment(Index(h) * hd, hd);
    if (q_from > 0) o = O.row(h);
    for (int64_t j = q_from; j < n; ++j) o += P(h, j) * cache.v_[b].row(j).segment(Index(h / grp) * hd, hd);
  }
}

void Transformer::encode_cache(KvCache& cache, const ForwardHooks* hooks, int64_t n,
                               const std::vector<Matrix>& new_k_pre) const {
  const ModelConfig& c = w_.config;
  for (int b = 0; b < c.num_layers; ++b) {
    const KvQuantizer* kvq = hooks && hooks->kv_quantizer ? hooks->kv_quantizer(b) : nullptr;
    if (!kvq) continue;
    KvCache::Encoded& e = cache.enc_.at(b);
    const bool pre = kvq->key_stage() == KvStage::PreRope;
    if (pre) {
      Matrix all(e.k_pre.rows() + new_k_pre.at(b).rows(), new_k_pre.at(b).cols());
      all << e.k_pre, new_k_pre.at(b);
      e.k_pre.swap(all);
    }
    // Encode every complete chunk that lies below the next query's exact threshold (which,
    // with R = 0, includes that query's own, not yet cached, position).
    const int ck = kvq->key_chunk(), cv = kvq->value_chunk(), R = kvq->residual_length();
    for (const int64_t target = std::min(n, kv_exact_from(n, ck, R)); e.k + ck <= target; e.k += ck) {
      const Matrix rows = pre ? Matrix(e.k_pre.topRows(ck)) : Matrix(cache.k_[b].middleRows(e.k, ck));
      e.codes.push_back(kvq->encode(KvKind::Key, rows));
      Matrix dec;
      kvq->decode(e.codes.back(), dec);
      if (pre) {
        RopeTables tab;
        rope_tables(e.k, ck, c.head_dim, c.rope, tab);
        rope_forward(dec, c.num_kv_heads, c.head_dim, tab);
        e.k_pre = Matrix(e.k_pre.bottomRows(e.k_pre.rows() - ck));
      }
      cache.k_[b].middleRows(e.k, ck) = dec;
    }
    for (const int64_t target = std::min(n, kv_exact_from(n, cv, R)); e.v + cv <= target; e.v += cv) {
      e.codes.push_back(kvq->encode(KvKind::Value, cache.v_[b].middleRows(e.v, cv)));
      Matrix dec;
      kvq->decode(e.codes.back(), dec);
      cache.v_[b].middleRows(e.v, cv) = dec;
    }
  }
}

Matrix Transformer::run_head(const Matrix& h, bool parallel, Workspace& ws) const {
  check_matrix(h, h.rows(), w_.config.hidden_size, "head input");
  rms_norm_forward(h, w_.final_norm, static_cast<float>(w_.config.rms_norm_eps), ws.xn);
  Matrix logits;
  const LinearJob job = {&ws.xn, &w_.lm_head, nullptr, &logits};
  linear_forward(&job, 1, parallel);
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

void Transformer::for_windows(long n, const std::function<void(long, bool, Workspace&)>& f) const {
  if (n < num_threads()) {
    Workspace ws;
    for (long i = 0; i < n; ++i) f(i, true, ws);
    return;
  }
  ParallelErrors errs;
#pragma omp parallel
  {
    Workspace ws;  // one per thread, reused across its windows
#pragma omp for schedule(dynamic, 1)
    for (long i = 0; i < n; ++i) errs.run(i, [&] { f(i, false, ws); });
  }
  errs.rethrow();
}

const DecoderBlock& Transformer::checked_block(int b, const DecoderBlock* override_weights, std::size_t n_windows,
                                               std::size_t n_hooks) const {
  if (n_hooks != n_windows)
    throw ShapeError("transformer: got " + std::to_string(n_hooks) + " hook sets for " + std::to_string(n_windows) +
                     " windows");
  if (b < 0 || b >= w_.config.num_layers)
    throw ShapeError("transformer: block " + std::to_string(b) + " out of range [0, " +
                     std::to_string(w_.config.num_layers) + ")");
  if (override_weights) check_block(*override_weights, "override of model.layers." + std::to_string(b));
  return override_weights ? *override_weights : w_.blocks[b];
}

void Transformer::block_batch(int b, std::vector<Matrix*>& h, const std::vector<ForwardHooks>& per_window,
                              const DecoderBlock* override_weights) const {
  const DecoderBlock& w = checked_block(b, override_weights, h.size(), per_window.size());
  for (std::size_t i = 0; i < h.size(); ++i)
    check_matrix(*h[i], h[i]->rows(), w_.config.hidden_size,
                 "block " + std::to_string(b) + " input of window " + std::to_string(i));
  for_windows(static_cast<long>(h.size()), [&](long i, bool may_parallel, Workspace& ws) {
    run_block(b, w, *h[i], 0, nullptr, &per_window[i], may_parallel && h[i]->rows() >= kMinParallelRows, ws);
  });
}

void Transformer::block_stage_begin(int b, const Matrix& h, BlockStageState& state) const {
  checked_block(b, nullptr, 1, 1);
  check_matrix(h, h.rows(), w_.config.hidden_size, "block " + std::to_string(b) + " input");
  state.h = h;
  state.x.resize(0, 0);
  state.stage = 0;
}

namespace {

void check_stage(int b, int stage, const std::vector<BlockStageState*>& windows) {
  if (stage < 0 || stage >= kBlockStages)
    throw ShapeError("transformer: block stage " + std::to_string(stage) + " outside [0, " +
                     std::to_string(kBlockStages) + ")");
  for (std::size_t i = 0; i < windows.size(); ++i)
    if (windows[i]->stage != stage)
      throw ShapeError("transformer: window " + std::to_string(i) + " of block " + std::to_string(b) + " is at stage " +
                       std::to_string(windows[i]->stage) + ", not " + std::to_string(stage));
}

}  // namespace

void Transformer::block_stage(int b, int stage, std::vector<BlockStageState*>& windows,
                              const std::vector<ForwardHooks>& per_window, const DecoderBlock* override_weights) const {
  const DecoderBlock& w = checked_block(b, override_weights, windows.size(), per_window.size());
  check_stage(b, stage, windows);
  // Stages 1 and 3 read the previous stage's output (attention's, SwiGLU's), kept in x
  // between calls; stages 0 and 2 normalise h themselves.
  for_windows(static_cast<long>(windows.size()), [&](long i, bool may_parallel, Workspace& ws) {
    BlockStageState& st = *windows[i];
    if (stage == 1) ws.attn.swap(st.x);
    if (stage == 3) ws.gate.swap(st.x);
    run_stage(b, stage, w, st.h, 0, nullptr, &per_window[i], may_parallel && st.h.rows() >= kMinParallelRows, ws);
    if (stage == 0)
      st.x.swap(ws.attn);
    else if (stage == 2)
      st.x.swap(ws.gate);
    else
      st.x.resize(0, 0);
    st.stage = stage + 1;
  });
}

void Transformer::block_stage_inputs(int b, int stage, const std::vector<BlockStageState*>& windows,
                                     const std::vector<ForwardHooks>& per_window,
                                     const DecoderBlock* override_weights) const {
  const DecoderBlock& w = checked_block(b, override_weights, windows.size(), per_window.size());
  check_stage(b, stage, windows);
  constexpr LinearKind first[kBlockStages] = {LinearKind::Q, LinearKind::O, LinearKind::Gate, LinearKind::Down};
  for_windows(static_cast<long>(windows.size()), [&](long i, bool, Workspace& ws) {
    BlockStageState& st = *windows[i];
    Matrix* x = &st.x;
    if (stage == 0 || stage == 2) {
      stage_input(stage, w, st.h, ws);
      x = &ws.x;
    }
    hooked_input(&per_window[i], b, first[stage], *x, true, ws.x1);
  });
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
  const bool quantized = hooks && hooks->kv_quantizer;
  if (!quantized && !cache.enc_.empty())
    throw ShapeError("transformer: this KV cache was filled with a KV-cache quantizer; continue it with one");
  if (quantized && cache.enc_.empty()) {
    if (past > 0) throw ShapeError("transformer: a KV-cache quantizer cannot join a cache filled without one");
    cache.enc_.assign(static_cast<std::size_t>(L), KvCache::Encoded{});
    for (auto& e : cache.enc_) e.k_pre.resize(0, kvd);
  }
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
  if (quantized) encode_cache(cache, hooks, past + T, ws.k_pre);
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
