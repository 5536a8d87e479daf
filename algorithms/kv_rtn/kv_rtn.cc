#include "algorithms/kv_rtn/kv_rtn.h"

#include "algorithms/algorithm.h"
#include "core/error.h"

namespace ql {
namespace {

enum class KeyAxis { Token, Channel };

struct KvRtnOptions {
  int k_bits = 4, v_bits = 4;
  KeyAxis keys = KeyAxis::Token;
  int group_size = 0;
  int token_group = 32;
  int residual_length = 0;
  KvStage key_stage = KvStage::PostRope;
  bool learned_clip = true;

  ScalarKvSpec spec() const {
    ScalarKvSpec s;
    s.key_bits = k_bits;
    s.value_bits = v_bits;
    s.keys_per_channel = keys == KeyAxis::Channel;
    s.group_size = group_size;
    s.token_group = token_group;
    s.residual_length = residual_length;
    s.key_stage = key_stage;
    return s;
  }
};

class KvRtn final : public KvCacheAlgorithm {
 public:
  explicit KvRtn(KvRtnOptions o) : opt_(o) {}

 private:
  std::shared_ptr<const KvQuantizer> fit_quantizer(const KvCacheInput& in, Diagnostics&) const override {
    if (opt_.k_bits == 16 && opt_.v_bits == 16) return nullptr;
    if (opt_.k_bits == 16 || opt_.v_bits == 16)
      throw ConfigError(SourceLoc{}, "k_bits", "'" + in.name + "': kv_rtn quantizes keys and values together; " +
                                                   "k_bits and v_bits must both be 16 or both 1..8");
    ScalarKvSpec s = opt_.spec();
    if (opt_.learned_clip && scalar_grid()) {
      s.key_clip = in.key_clip;
      s.value_clip = in.value_clip;
    }
    return make_scalar_kv_quantizer(s, in.heads.head_dim, in.heads.kv_dim());
  }
  // Per-token post-RoPE grids are what a block-local objective can simulate (residual tokens
  // are few next to a window; training quantizes every token).
  std::optional<ScalarKvSpec> scalar_grid() const override {
    if (opt_.keys != KeyAxis::Token || opt_.key_stage != KvStage::PostRope || opt_.k_bits == 16) return std::nullopt;
    return opt_.spec();
  }
  KvRtnOptions opt_;
};

std::shared_ptr<OptionSchema<KvRtnOptions>> make_schema() {
  auto s = std::make_shared<OptionSchema<KvRtnOptions>>();
  auto bits_ok = [](int b) { return (b >= 1 && b <= 8) || b == 16; };
  s->add("k_bits", &KvRtnOptions::k_bits, "key bits, 1..8, or 16 = exact", {1, 16});
  s->add("v_bits", &KvRtnOptions::v_bits, "value bits, 1..8, or 16 = exact", {1, 16});
  s->add_enum("keys", &KvRtnOptions::keys,
              "key grids per token (with channel groups) or per channel over token_group tokens (KIVI)",
              {{"token", KeyAxis::Token}, {"channel", KeyAxis::Channel}});
  s->add("channel_group", &KvRtnOptions::group_size,
         "channels per per-token grid (keys per token and values); 0 = head_dim; must divide the KV width",
         {0, 1 << 20});
  s->add("token_group", &KvRtnOptions::token_group, "tokens per per-channel key grid (keys: channel)", {1, 1 << 20});
  s->add("residual_length", &KvRtnOptions::residual_length, "most recent tokens kept exact (KIVI's R)",
         {0, 1 << 30});
  s->add_enum("key_stage", &KvRtnOptions::key_stage, "quantize keys after RoPE (KIVI) or before it (KVQuant)",
              {{"post_rope", KvStage::PostRope}, {"pre_rope", KvStage::PreRope}});
  s->add("learned_clip", &KvRtnOptions::learned_clip,
         "use the grids' clipping learned by an earlier trained block step (flatquant), when the grids are per "
         "token after RoPE");
  s->validator([bits_ok](const KvRtnOptions& o, const ConfigNode& map, const std::string& path) {
    for (auto [key, b] : {std::pair<const char*, int>{"k_bits", o.k_bits}, {"v_bits", o.v_bits}})
      if (!bits_ok(b))
        throw ConfigError(map.find(key) ? map.find(key)->loc() : map.loc(), join_path(path, key),
                          "expected 1..8 or 16, found " + std::to_string(b));
    if ((o.k_bits == 16) != (o.v_bits == 16))
      throw ConfigError(map.loc(), path, "k_bits and v_bits must both be 16 (exact cache) or both 1..8");
  });
  return s;
}

}  // namespace

void register_kv_rtn(AlgorithmRegistry& registry) {
  AlgorithmInfo info;
  info.name = "kv_rtn";
  info.scope = Scope::KvCache;
  info.summary =
      "scalar asymmetric KV-cache quantization: per-token keys/values with channel groups, or "
      "per-channel keys over token groups (KIVI), R exact recent tokens, pre- or post-RoPE keys";
  info.paper = "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache, arXiv 2402.02750 (layout)";
  info.uses_weight_spec = false;
  info.needs.kv = true;  // only for the held-out error diagnostics; the grids use no calibration
  info.options = make_schema();
  info.make = [](const std::any& o) { return std::make_unique<KvRtn>(std::any_cast<const KvRtnOptions&>(o)); };
  registry.add(std::move(info));
}

}  // namespace ql
