#include "core/model/quantized_model.h"

#include "core/error.h"
#include "core/linalg.h"

namespace ql {

bool BlockTransforms::empty() const {
  for (auto& s : slot)
    if (s) return false;
  for (int k = 0; k < kLinearKinds; ++k)
    if (!weight_clip[k].empty() || !act_clip[k].identity()) return false;
  return key_clip.identity() && value_clip.identity();
}

namespace {

/// The per-query-head form of a per-kv-head transform: o_proj reads every query head's output,
/// which is its kv head's values transformed by P_v.
InputTransform per_query_head(const InputTransform& pv, const HeadLayout& h) {
  const MatrixD A = pv.matrix().topLeftCorner(h.head_dim, h.head_dim);
  const MatrixD Ai = pv.inverse_transpose().topLeftCorner(h.head_dim, h.head_dim);
  return InputTransform::per_head(TransformFactor{A, Ai}, h.num_heads);
}

/// x ↦ x M with M the product of the input-side transforms of a linear, as a dense double
/// matrix (empty: none).
MatrixD input_map(const BlockTransforms& t, LinearKind k, const HeadLayout& h) {
  switch (k) {
    case LinearKind::Q:
    case LinearKind::K:
    case LinearKind::V:
      return t[TransformSlot::QkvInput] ? t[TransformSlot::QkvInput]->matrix() : MatrixD();
    case LinearKind::Gate:
    case LinearKind::Up:
      return t[TransformSlot::GateUpInput] ? t[TransformSlot::GateUpInput]->matrix() : MatrixD();
    case LinearKind::Down:
      return t[TransformSlot::DownInput] ? t[TransformSlot::DownInput]->matrix() : MatrixD();
    case LinearKind::O: {
      MatrixD M;
      if (t[TransformSlot::VOutputPerHead]) M = per_query_head(*t[TransformSlot::VOutputPerHead], h).matrix();
      if (t[TransformSlot::OInputAcrossHeads]) {
        const MatrixD P = t[TransformSlot::OInputAcrossHeads]->matrix();
        M = M.size() ? matmul_nn(M, P) : P;
      }
      return M;
    }
  }
  return {};
}

}  // namespace

QuantizedModel::QuantizedModel(std::shared_ptr<const ModelWeights> fp)
    : fp_(std::move(fp)), arch_(Architecture::of(fp_ ? fp_->config : ModelConfig{})) {
  if (!fp_) throw Error("QuantizedModel: no FP weights");
  current_ = *fp_;
  transforms_.resize(static_cast<std::size_t>(fp_->config.num_layers));
  online_.resize(transforms_.size());
  folded_.resize(transforms_.size());
  // The slot whose transform acts on each linear's input (the architecture table's placement).
  for (int k = 0; k < kLinearKinds; ++k) {
    input_slot_[k] = -1;
    for (const TransformSlotInfo& s : arch_.transform_slots())
      if (s.input_group == arch_.group_of(static_cast<LinearKind>(k))) input_slot_[k] = static_cast<int>(s.slot);
  }
  act_.resize(static_cast<std::size_t>(fp_->config.num_layers));
  codes_.resize(static_cast<std::size_t>(fp_->config.num_layers));
  kv_.resize(static_cast<std::size_t>(fp_->config.num_layers));
}

double QuantizedModel::kv_bits(int64_t n) const {
  if (kv_.empty()) return 16.0;
  const Index kvd = Index(config().num_kv_heads) * config().head_dim;
  double sum = 0;
  for (auto& q : kv_) sum += q ? q->kv_bits(n, kvd) : 16.0;
  return sum / static_cast<double>(kv_.size());
}

void ActQuantizer::apply(Matrix& X) const {
  if (!active()) return;
  fake_quant_activations(X, *spec, spec->mode == ActRangeMode::Static ? &range : nullptr,
                         clip.identity() ? nullptr : &clip);
}

bool ActQuantizer::same_as(const ActQuantizer& a) const {
  if (active() != a.active()) return false;
  if (!active()) return true;
  const ActQuantSpec &x = *spec, &y = *a.spec;
  if (x.bits != y.bits || x.scheme != y.scheme || x.granularity != y.granularity || x.mode != y.mode ||
      x.clip_ratio != y.clip_ratio || clip.lo != a.clip.lo || clip.hi != a.clip.hi)
    return false;
  return x.mode != ActRangeMode::Static || (range.lo == a.range.lo && range.hi == a.range.hi);
}

bool QuantizedModel::has_activation_quant() const {
  for (auto& blk : act_)
    for (auto& a : blk)
      if (a.active()) return true;
  return false;
}

void QuantizedModel::apply_transforms(int b, const BlockTransforms& t) {
  BlockTransforms& have = transforms_.at(b);
  const HeadLayout& h = arch_.heads();
  for (int s = 0; s < kTransformSlots; ++s) {
    if (!t.slot[s]) continue;
    const char* name = arch_.transform_slots()[s].name;
    if (have.slot[s])
      throw ShapeError("block " + std::to_string(b) + ": slot " + name + " already holds a transform");
    const Index width = arch_.slot_width(static_cast<TransformSlot>(s));
    if (t.slot[s]->width() != width)
      throw ShapeError("block " + std::to_string(b) + ": a " + t.slot[s]->describe() + " does not fit slot " +
                       name + " of width " + std::to_string(width));
  }
  DecoderBlock& blk = current_.blocks.at(b);
  if (auto& p = t[TransformSlot::QkvInput])
    for (LinearKind k : {LinearKind::Q, LinearKind::K, LinearKind::V}) merge_input_transform(blk.linear(k).W, *p);
  if (auto& p = t[TransformSlot::GateUpInput])
    for (LinearKind k : {LinearKind::Gate, LinearKind::Up}) merge_input_transform(blk.linear(k).W, *p);
  if (auto& p = t[TransformSlot::DownInput]) merge_input_transform(blk.down.W, *p);
  if (auto& p = t[TransformSlot::VOutputPerHead]) merge_input_transform(blk.o.W, per_query_head(*p, h));
  if (auto& p = t[TransformSlot::OInputAcrossHeads]) merge_input_transform(blk.o.W, *p);
  for (int k = 0; k < kLinearKinds; ++k) {
    const RowClip& c = t.weight_clip[k];
    if (c.empty()) continue;
    Matrix& W = blk.linear(static_cast<LinearKind>(k)).W;
    if (c.lo.size() != W.rows() || c.hi.size() != W.rows())
      throw ShapeError("block " + std::to_string(b) + ": weight clipping of " + linear_suffix(static_cast<LinearKind>(k)) +
                       " has " + std::to_string(c.lo.size()) + " rows, the weight " + std::to_string(W.rows()));
    for (Index r = 0; r < W.rows(); ++r) {
      auto row = W.row(r);
      const float hi = row.maxCoeff() * c.hi[r], lo = row.minCoeff() * c.lo[r];
      row = row.cwiseMax(lo).cwiseMin(hi);
    }
  }
  if (auto& p = t[TransformSlot::VOutputPerHead]) merge_output_transform(blk.v.W, blk.v.b, *p);
  for (int k = 0; k < kLinearKinds; ++k)
    if (!t.act_clip[k].identity()) act_.at(b)[k].clip = t.act_clip[k];
  for (int s = 0; s < kTransformSlots; ++s)
    if (t.slot[s]) have.slot[s] = online_.at(b)[s] = t.slot[s];
  fold_scales(b);
  for (auto [mine, theirs] : {std::pair{&have.key_clip, &t.key_clip}, {&have.value_clip, &t.value_clip}})
    if (!theirs->identity()) *mine = *theirs;
  // Merged weights are off any earlier grid.
  if (!t.empty())
    for (auto& c : codes_.at(b)) c.reset();
}

void QuantizedModel::fold_scales(int b) {
  DecoderBlock& blk = current_.blocks.at(b);
  for (const TransformSlotInfo& info : arch_.transform_slots()) {
    const int s = static_cast<int>(info.slot);
    const auto& p = online_.at(b)[s];
    if (!p || p->channel_scale().size() == 0 || info.input_group < 0) continue;
    const InputGroup& g = arch_.input_groups()[static_cast<std::size_t>(info.input_group)];
    const VectorD& c = p->channel_scale();
    if (g.norm) {
      Vector& gamma = norm_weight(blk, g);
      for (Index j = 0; j < gamma.size(); ++j) gamma[j] = static_cast<float>(static_cast<double>(gamma[j]) * c[j]);
      folded_.at(b)[s] = g.norm;
    } else if (g.scale_rows) {
      Linear& l = blk.linear(*g.scale_rows);
      for (Index i = 0; i < l.W.rows(); ++i) {
        for (Index j = 0; j < l.W.cols(); ++j) l.W(i, j) = static_cast<float>(static_cast<double>(l.W(i, j)) * c[i]);
        if (l.b.size()) l.b[i] = static_cast<float>(static_cast<double>(l.b[i]) * c[i]);
      }
      folded_.at(b)[s] = std::string(linear_suffix(*g.scale_rows)) + " rows";
    } else {
      continue;
    }
    online_.at(b)[s] = std::make_shared<const InputTransform>(p->without_channel_scale());
  }
}

Matrix QuantizedModel::effective_weight(int b, LinearKind kind, const Matrix& W) const {
  const BlockTransforms& t = transforms_.at(b);
  if (t.empty()) return W;
  MatrixD Wd = W.cast<double>();
  const MatrixD M = input_map(t, kind, arch_.heads());
  if (M.size()) Wd = matmul_nn(Wd, MatrixD(M.transpose()));
  if (kind == LinearKind::V && t[TransformSlot::VOutputPerHead])
    Wd = matmul_nn(t[TransformSlot::VOutputPerHead]->inverse_transpose(), Wd);
  // A channel scale folded into this linear's output rows is undone (rows over c).
  for (const TransformSlotInfo& info : arch_.transform_slots()) {
    if (info.input_group < 0) continue;
    const InputGroup& g = arch_.input_groups()[static_cast<std::size_t>(info.input_group)];
    const int s = static_cast<int>(info.slot);
    if (g.scale_rows == kind && !folded_.at(b)[s].empty())
      Wd = t.slot[s]->channel_scale().cwiseInverse().asDiagonal() * Wd;
  }
  return Wd.cast<float>();
}

ForwardHooks QuantizedModel::hooks() const {
  ForwardHooks h;
  // Without transforms or activation quantizers the linears read their inputs unchanged (and
  // the forward pass need not copy the shared q/k/v and gate/up inputs per linear).
  bool any_input = has_activation_quant();
  for (auto& t : transforms_)
    for (int k = 0; k < kLinearKinds; ++k) any_input = any_input || (input_slot_[k] >= 0 && t.slot[input_slot_[k]]);
  if (any_input) h.transform_input = [this](int b, LinearKind k, Matrix& X) {
    const int slot = input_slot_[static_cast<int>(k)];
    if (slot >= 0 && online_[b][slot]) online_[b][slot]->apply(X);
    act(b, k).apply(X);
  };
  bool any_kv = false;
  for (auto& q : kv_) any_kv = any_kv || q != nullptr;
  if (any_kv) h.kv_quantizer = [this](int b) { return kv_quantizer(b); };
  bool any_qk = false;
  for (auto& t : transforms_) any_qk = any_qk || t[TransformSlot::KeysPerHead] != nullptr;
  if (any_qk) {
    // Queries get P_k⁻ᵀ per query head, keys P_k per kv head: q kᵀ is unchanged.
    std::vector<std::shared_ptr<const InputTransform>> q_side(transforms_.size());
    for (std::size_t b = 0; b < transforms_.size(); ++b)
      if (auto& pk = transforms_[b][TransformSlot::KeysPerHead])
        q_side[b] = std::make_shared<const InputTransform>(
            per_query_head(pk->inverse_transposed(), arch_.heads()));
    h.transform_qk = [this, q_side](int b, Matrix& Q, Matrix& K) {
      if (!q_side[b]) return;
      q_side[b]->apply(Q);
      transforms_[b][TransformSlot::KeysPerHead]->apply(K);
    };
  }
  return h;
}

}  // namespace ql
