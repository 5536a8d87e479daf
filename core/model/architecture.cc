#include "core/model/architecture.h"

#include <cstring>

#include "core/error.h"

namespace ql {

namespace {

/// The LLaMA block. Order = InputSite order, members in data-flow order.
const std::vector<InputGroup>& llama_groups() {
  static const std::vector<InputGroup> g = {
      {InputSite::AttnIn, "attn_in", {LinearKind::Q, LinearKind::K, LinearKind::V}, "input_layernorm"},
      {InputSite::AttnOut, "attn_out", {LinearKind::O}, nullptr},
      {InputSite::MlpIn, "mlp_in", {LinearKind::Gate, LinearKind::Up}, "post_attention_layernorm"},
      {InputSite::MlpHidden, "mlp_hidden", {LinearKind::Down}, nullptr, LinearKind::Up}};
  return g;
}

const std::vector<TransformSlotInfo>& llama_slots() {
  static const std::vector<TransformSlotInfo> s = {
      {TransformSlot::QkvInput, "qkv_in", 0, false, true},
      {TransformSlot::VOutputPerHead, "v_out", -1, true, true},
      {TransformSlot::OInputAcrossHeads, "o_in", 1, false, false},
      {TransformSlot::GateUpInput, "gate_up_in", 2, false, true},
      {TransformSlot::DownInput, "down_in", 3, false, false},
      {TransformSlot::KeysPerHead, "k_post_rope", -1, true, false}};
  return s;
}

const char* const kKnown[] = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"};

}  // namespace

Architecture Architecture::of(const ModelConfig& c) {
  bool known = false;
  for (const char* k : kKnown) known = known || c.architecture == k;
  if (!known)
    throw ShapeError("architecture '" + c.architecture +
                     "' has no architecture table (known: LlamaForCausalLM, MistralForCausalLM, "
                     "Qwen2ForCausalLM, Qwen3ForCausalLM)");
  if (c.num_heads <= 0 || c.num_kv_heads <= 0 || c.head_dim <= 0 || c.num_heads % c.num_kv_heads != 0 ||
      c.head_dim % 2 != 0)
    throw ShapeError("architecture: " + std::to_string(c.num_heads) + " heads, " +
                     std::to_string(c.num_kv_heads) + " kv heads of head_dim " + std::to_string(c.head_dim) +
                     " (need positive sizes, heads divisible by kv heads, even head_dim)");
  Architecture a;
  a.name_ = c.architecture;
  a.groups_ = llama_groups();
  for (std::size_t g = 0; g < a.groups_.size(); ++g) {
    if (static_cast<int>(a.groups_[g].site) != static_cast<int>(g))
      throw Error("architecture table: input groups out of InputSite order");
    for (LinearKind k : a.groups_[g].members) a.group_of_[static_cast<int>(k)] = static_cast<int>(g);
  }
  a.heads_ = HeadLayout{c.num_heads, c.num_kv_heads, c.head_dim};
  a.widths_ = {Index(c.hidden_size), a.heads_.q_dim(), Index(c.hidden_size), Index(c.intermediate_size)};
  a.slots_ = llama_slots();
  a.rope_ = RopePairing{c.head_dim, c.rope};
  a.qkv_bias_ = c.attention_bias;
  if (c.qk_norm) a.head_norms_ = {{LinearKind::Q, "self_attn.q_norm"}, {LinearKind::K, "self_attn.k_norm"}};
  return a;
}

std::string Architecture::norm_name(int block, int group) const {
  const char* n = groups_.at(group).norm;
  return n ? "model.layers." + std::to_string(block) + "." + n : std::string();
}

Index Architecture::slot_width(TransformSlot s) const {
  const TransformSlotInfo& info = slot(s);
  return info.input_group >= 0 ? widths_[info.input_group] : heads_.kv_dim();
}

Vector& norm_weight(DecoderBlock& blk, const InputGroup& g) {
  if (g.site == InputSite::AttnIn) return blk.input_norm;
  if (g.site == InputSite::MlpIn) return blk.post_attn_norm;
  throw ShapeError(std::string("input group '") + g.name + "' is not produced by a norm");
}

}  // namespace ql
