#include "core/model/model_grad.h"

#include <cmath>
#include <string>

#include "core/detmath.h"
#include "core/error.h"

namespace ql {

template <class S>
ModelParams<S> ModelParams<S>::from(const ModelWeights& w) {
  ModelParams p;
  p.embed = w.embed.cast<S>();
  for (const DecoderBlock& blk : w.blocks) p.blocks.push_back(BlockParams<S>::from(blk));
  p.final_norm = w.final_norm.cast<S>();
  p.lm_head = w.lm_head.cast<S>();
  return p;
}

template <class S>
ModelParams<S> ModelParams<S>::zeros_like(const ModelParams& p) {
  ModelParams z;
  z.embed = MatT<S>::Zero(p.embed.rows(), p.embed.cols());
  for (const auto& b : p.blocks) z.blocks.push_back(BlockParams<S>::zeros_like(b));
  z.final_norm = VecT<S>::Zero(p.final_norm.size());
  z.lm_head = MatT<S>::Zero(p.lm_head.rows(), p.lm_head.cols());
  return z;
}

template <class S>
void model_blocks_fwd(const BlockShape& s, const ModelParams<S>& p, const std::vector<std::vector<int32_t>>& windows,
                      int n_blocks, ModelTape<S>& tape, const ModelInputQuant<S>& iq) {
  if (windows.empty()) throw ShapeError("model_grad: no windows");
  const Index T = static_cast<Index>(windows[0].size());
  if (T < 2) throw ShapeError("model_grad: a window needs at least 2 tokens");
  if (n_blocks < 0 || n_blocks > static_cast<int>(p.blocks.size()))
    throw ShapeError("model_grad: " + std::to_string(n_blocks) + " blocks requested of " +
                     std::to_string(p.blocks.size()));
  const Index vocab = p.embed.rows(), d = p.embed.cols();
  tape.window = T;
  tape.tokens.clear();
  for (std::size_t w = 0; w < windows.size(); ++w) {
    if (static_cast<Index>(windows[w].size()) != T)
      throw ShapeError("model_grad: window " + std::to_string(w) + " has " + std::to_string(windows[w].size()) +
                       " tokens, window 0 has " + std::to_string(T));
    for (int32_t id : windows[w]) {
      if (id < 0 || id >= vocab)
        throw ShapeError("model_grad: token id " + std::to_string(id) + " outside the vocabulary of " +
                         std::to_string(vocab));
      tape.tokens.push_back(id);
    }
  }
  MatT<S> h(static_cast<Index>(tape.tokens.size()), d);
  for (Index r = 0; r < h.rows(); ++r) h.row(r) = p.embed.row(tape.tokens[static_cast<std::size_t>(r)]);
  tape.blocks.resize(static_cast<std::size_t>(n_blocks));
  for (int b = 0; b < n_blocks; ++b) {
    InputQuant<S> block_iq;
    if (iq) block_iq = [&iq, b](LinearKind k, MatT<S>& X) { iq(b, k, X); };
    block_fwd(s, p.blocks[b], b == 0 ? h : tape.blocks[b - 1].y, T, 0, tape.tab, tape.blocks[b], block_iq);
  }
  if (n_blocks == 0) {  // keep the embedding where the last block's output would be
    tape.blocks.resize(1);
    tape.blocks[0].y = std::move(h);
    tape.blocks[0].window = T;
  }
}

namespace {

/// Log-softmax of one row in double: returns log Σ exp(z - max) + max.
template <class S>
double log_sum_exp(const S* z, Index n) {
  double m = z[0];
  for (Index i = 1; i < n; ++i) m = std::max(m, static_cast<double>(z[i]));
  double sum = 0;
  for (Index i = 0; i < n; ++i) sum += detmath::exp(static_cast<double>(z[i]) - m);
  return m + detmath::log(sum);
}

/// The loss of one scored row of logits z (V entries): cross-entropy with target y, or KL to the
/// reference row. With grad_scale > 0, z is overwritten by grad_scale · dL/dz.
template <class S>
double lm_row_loss(S* z, Index V, LmLoss loss, int32_t y, const float* ref, double grad_scale) {
  const double lse = log_sum_exp(z, V);
  if (loss == LmLoss::CrossEntropy) {
    const double l = lse - static_cast<double>(z[y]);
    if (grad_scale > 0) {
      for (Index i = 0; i < V; ++i) z[i] = static_cast<S>(detmath::exp(static_cast<double>(z[i]) - lse) * grad_scale);
      z[y] -= static_cast<S>(grad_scale);
    }
    return l;
  }
  const double lse_ref = log_sum_exp(ref, V);
  double l = 0;
  for (Index i = 0; i < V; ++i) {
    const double logp = ref[i] - lse_ref, logq = static_cast<double>(z[i]) - lse;
    const double pi = detmath::exp(logp);
    l += pi * (logp - logq);
    if (grad_scale > 0) z[i] = static_cast<S>((detmath::exp(logq) - pi) * grad_scale);
  }
  return l;
}

}  // namespace

template <class S>
double model_loss_fwd(const BlockShape& s, const ModelParams<S>& p, const std::vector<std::vector<int32_t>>& windows,
                      LmLoss loss, const std::vector<Matrix>* reference, ModelTape<S>& tape,
                      const ModelInputQuant<S>& iq) {
  model_blocks_fwd(s, p, windows, static_cast<int>(p.blocks.size()), tape, iq);
  const MatT<S>& h = tape.blocks.back().y;
  const S eps = static_cast<S>(static_cast<float>(s.eps));
  rmsnorm_fwd(h, p.final_norm, eps, tape.xn, tape.rstd);
  linear_fwd<S>(tape.xn, p.lm_head, nullptr, tape.dlogits);  // logits, turned into dL/dz below
  const Index T = tape.window, V = p.lm_head.rows(), rows = tape.dlogits.rows();
  const Index n_windows = rows / T;
  if (loss == LmLoss::KlToReference) {
    if (!reference || static_cast<Index>(reference->size()) != n_windows)
      throw ShapeError("model_grad: KL loss needs one reference logit matrix per window");
    for (const Matrix& r : *reference)
      if (r.rows() < T - 1 || r.cols() != V)
        throw ShapeError("model_grad: reference logits must be at least " + std::to_string(T - 1) + " x " +
                         std::to_string(V));
  }
  const double inv_n = 1.0 / static_cast<double>(n_windows * (T - 1));
  std::vector<double> row_loss(static_cast<std::size_t>(rows), 0.0);
#pragma omp parallel for schedule(static)
  for (Index r = 0; r < rows; ++r) {
    S* z = tape.dlogits.data() + r * V;
    const Index t = r % T;
    if (t == T - 1) {  // the last position predicts nothing inside the window
      for (Index i = 0; i < V; ++i) z[i] = S(0);
      continue;
    }
    const float* ref = loss == LmLoss::KlToReference ? (*reference)[static_cast<std::size_t>(r / T)].data() + t * V : nullptr;
    row_loss[static_cast<std::size_t>(r)] = lm_row_loss(z, V, loss, tape.tokens[static_cast<std::size_t>(r + 1)], ref, inv_n);
  }
  double total = 0;
  for (double l : row_loss) total += l;  // rows in order: independent of the thread count
  tape.loss = total * inv_n;
  return tape.loss;
}

double lm_loss(const std::vector<Matrix>& logits, const std::vector<std::vector<int32_t>>& windows, LmLoss loss,
               const std::vector<Matrix>* reference) {
  if (logits.size() != windows.size() || windows.empty())
    throw ShapeError("lm_loss: one logit matrix per window expected");
  if (loss == LmLoss::KlToReference && (!reference || reference->size() != windows.size()))
    throw ShapeError("lm_loss: KL loss needs one reference logit matrix per window");
  Index n = 0;
  for (const auto& w : windows) n += static_cast<Index>(w.size()) - 1;
  if (n <= 0) throw ShapeError("lm_loss: no scored position (windows of one token)");
  std::vector<double> per_window(windows.size(), 0.0);
#pragma omp parallel for schedule(static)
  for (std::size_t w = 0; w < windows.size(); ++w) {
    const Matrix& z = logits[w];
    const Index V = z.cols();
    std::vector<float> row(static_cast<std::size_t>(V));
    double sum = 0;
    for (Index t = 0; t + 1 < static_cast<Index>(windows[w].size()); ++t) {
      std::copy(z.data() + t * V, z.data() + (t + 1) * V, row.begin());
      const float* ref = loss == LmLoss::KlToReference ? (*reference)[w].data() + t * V : nullptr;
      sum += lm_row_loss(row.data(), V, loss, windows[w][static_cast<std::size_t>(t + 1)], ref, 0.0);
    }
    per_window[w] = sum;
  }
  double total = 0;
  for (double l : per_window) total += l;
  return total / static_cast<double>(n);
}

template <class S>
void model_blocks_bwd(const BlockShape& s, const ModelParams<S>& p, const ModelTape<S>& tape, const MatT<S>& dh,
                      ModelParams<S>& grads) {
  const int n_blocks = static_cast<int>(tape.blocks.size());
  const bool ran_blocks = n_blocks > 0 && tape.blocks[0].x.size() > 0;
  MatT<S> d = dh, dx;
  if (ran_blocks) {
    for (int b = n_blocks - 1; b >= 0; --b) {
      block_bwd(s, p.blocks[b], tape.blocks[b], tape.tab, d, dx, grads.blocks[b]);
      d.swap(dx);
    }
  }
  // Embedding rows, token by token in batch order (a repeated id sums in that order).
  for (Index r = 0; r < d.rows(); ++r) grads.embed.row(tape.tokens[static_cast<std::size_t>(r)]) += d.row(r);
}

template <class S>
void model_bwd(const BlockShape& s, const ModelParams<S>& p, const ModelTape<S>& tape, ModelParams<S>& grads) {
  const MatT<S>& h = tape.blocks.back().y;
  MatT<S> dxn;
  linear_bwd<S>(tape.dlogits, tape.xn, p.lm_head, &dxn, false, &grads.lm_head, nullptr);
  MatT<S> dh = MatT<S>::Zero(h.rows(), h.cols());
  rmsnorm_bwd(dxn, h, p.final_norm, tape.rstd, dh, &grads.final_norm);
  model_blocks_bwd(s, p, tape, dh, grads);
}

#define QL_MODEL_GRAD_INSTANTIATE(S)                                                                               \
  template struct ModelParams<S>;                                                                                  \
  template void model_blocks_fwd<S>(const BlockShape&, const ModelParams<S>&,                                      \
                                    const std::vector<std::vector<int32_t>>&, int, ModelTape<S>&,                  \
                                    const ModelInputQuant<S>&);                                                    \
  template double model_loss_fwd<S>(const BlockShape&, const ModelParams<S>&,                                      \
                                    const std::vector<std::vector<int32_t>>&, LmLoss, const std::vector<Matrix>*, \
                                    ModelTape<S>&, const ModelInputQuant<S>&);                                     \
  template void model_blocks_bwd<S>(const BlockShape&, const ModelParams<S>&, const ModelTape<S>&, const MatT<S>&, \
                                    ModelParams<S>&);                                                              \
  template void model_bwd<S>(const BlockShape&, const ModelParams<S>&, const ModelTape<S>&, ModelParams<S>&);

QL_MODEL_GRAD_INSTANTIATE(float)
QL_MODEL_GRAD_INSTANTIATE(double)

}  // namespace ql
