#include "core/model/model.h"

namespace ql {

const char* linear_suffix(LinearKind k) {
  switch (k) {
    case LinearKind::Q: return "self_attn.q_proj";
    case LinearKind::K: return "self_attn.k_proj";
    case LinearKind::V: return "self_attn.v_proj";
    case LinearKind::O: return "self_attn.o_proj";
    case LinearKind::Gate: return "mlp.gate_proj";
    case LinearKind::Up: return "mlp.up_proj";
    case LinearKind::Down: return "mlp.down_proj";
  }
  return "?";
}

std::string linear_name(int block, LinearKind k) {
  return "model.layers." + std::to_string(block) + "." + linear_suffix(k);
}

Linear& DecoderBlock::linear(LinearKind kind) {
  switch (kind) {
    case LinearKind::Q: return q;
    case LinearKind::K: return k;
    case LinearKind::V: return v;
    case LinearKind::O: return o;
    case LinearKind::Gate: return gate;
    case LinearKind::Up: return up;
    case LinearKind::Down: return down;
  }
  return q;
}

const Linear& DecoderBlock::linear(LinearKind kind) const {
  return const_cast<DecoderBlock*>(this)->linear(kind);
}

}  // namespace ql
