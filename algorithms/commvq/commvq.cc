#include "algorithms/commvq/commvq.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>

#include "algorithms/algorithm.h"
#include "core/error.h"
#include "core/model/kv_vq.h"
#include "core/model/ops.h"

namespace ql {
namespace {

enum class KeyCodebook { Commutative, Free };
enum class KeyStageOpt { Auto, PreRope, PostRope };

struct CommVqOptions {
  double k_bits = 2.0, v_bits = 2.0;
  int k_stages = 0, v_stages = 0;
  KeyCodebook keys = KeyCodebook::Commutative;
  KeyStageOpt key_stage = KeyStageOpt::Auto;
  int group_heads = 0;
  int residual_length = 0;
  int sub_bits = 6;
  int em_steps = 100;
  double t_start = 1e-3, t_end = 1e-5;
  int train_tokens = 8192;
};

/// Whole KV heads per group: the count dividing num_kv_heads whose width is closest to 128
/// (ties: the smaller group).
int auto_group_heads(const HeadLayout& h) {
  int best = 1;
  for (int g = 1; g <= h.num_kv_heads; ++g) {
    if (h.num_kv_heads % g != 0) continue;
    if (std::abs(g * h.head_dim - 128) < std::abs(best * h.head_dim - 128)) best = g;
  }
  return best;
}

class CommVq final : public KvCacheAlgorithm {
 public:
  explicit CommVq(CommVqOptions o) : opt_(o) {}

  void check_heads(const HeadLayout& heads) const override { (void)spec_for(heads, 0); }

 private:
  /// The quantizer spec for these heads; ConfigError (key path = the option) when the options
  /// do not fit them.
  KvVqSpec spec_for(const HeadLayout& heads, uint64_t seed) const;
  std::shared_ptr<const KvQuantizer> fit_quantizer(const KvCacheInput& in, Diagnostics& diag) const override;

  CommVqOptions opt_;
};

KvVqSpec CommVq::spec_for(const HeadLayout& heads, uint64_t seed) const {
  KvVqSpec s;
  if (heads.head_dim % 2 != 0)
    throw ConfigError(SourceLoc{}, "keys", "head_dim " + std::to_string(heads.head_dim) + " has no RoPE pairs");
  s.group_heads = opt_.group_heads > 0 ? opt_.group_heads : auto_group_heads(heads);
  if (heads.num_kv_heads % s.group_heads != 0)
    throw ConfigError(SourceLoc{}, "group_heads",
                      std::to_string(s.group_heads) + " KV heads per group do not divide the model's " +
                          std::to_string(heads.num_kv_heads) + " KV heads: a group would split a head");
  const Index gw = Index(s.group_heads) * heads.head_dim;
  const int stage_bits = 2 * opt_.sub_bits;
  auto stages = [&](double bits, int explicit_stages, const char* key) {
    if (explicit_stages > 0) return explicit_stages;
    const int n = static_cast<int>(std::floor(bits * static_cast<double>(gw) / stage_bits + 1e-9));
    if (n < 1) {
      char b[160];
      std::snprintf(b, sizeof b, "%g bits x %lld channels = %.3g code bits per token and group: fewer than one %d-bit stage",
                    bits, static_cast<long long>(gw), bits * static_cast<double>(gw), stage_bits);
      throw ConfigError(SourceLoc{}, key, b);
    }
    return n;
  };
  s.key_stages = stages(opt_.k_bits, opt_.k_stages, "k_bits");
  s.value_stages = stages(opt_.v_bits, opt_.v_stages, "v_bits");
  s.key_structure = opt_.keys == KeyCodebook::Commutative ? VqStructure::Commutative : VqStructure::Free;
  s.key_stage = opt_.key_stage == KeyStageOpt::PostRope ||
                        (opt_.key_stage == KeyStageOpt::Auto && opt_.keys == KeyCodebook::Free)
                    ? KvStage::PostRope
                    : KvStage::PreRope;
  s.sub_bits = opt_.sub_bits;
  s.residual_length = opt_.residual_length;
  s.max_steps = opt_.em_steps;
  s.t_start = opt_.t_start;
  s.t_end = opt_.t_end;
  s.seed = seed;
  return s;
}

/// Rows [r0, r0 + n) of the stacked windows w0..w1-1, at most `cap` of them evenly strided.
Matrix take_rows(const Matrix& X, Index r0, Index n, Index cap) {
  if (n <= cap) return X.middleRows(r0, n);
  Matrix Y(cap, X.cols());
  for (Index i = 0; i < cap; ++i) Y.row(i) = X.row(r0 + i * n / cap);
  return Y;
}

void stage_diagnostics(const KvVqFitReport& rep, Diagnostics& diag) {
  for (std::size_t g = 0; g < rep.keys.size(); ++g)
    for (int kind = 0; kind < 2; ++kind) {
      const auto& stages = kind == 0 ? rep.keys[g] : rep.values[g];
      for (std::size_t s = 0; s < stages.size(); ++s) {
        char p[64];
        std::snprintf(p, sizeof p, "%s_g%zu_s%02zu_", kind == 0 ? "key" : "value", g, s);
        diag.emplace_back(std::string(p) + "em_steps", stages[s].steps);
        diag.emplace_back(std::string(p) + "mse", stages[s].mse_after);
      }
    }
}

std::shared_ptr<const KvQuantizer> CommVq::fit_quantizer(const KvCacheInput& in, Diagnostics& diag) const {
  if (!in.keys_pre_rope || !in.keys_post_rope || !in.values)
    throw ShapeError("'" + in.name + "': commvq needs the calibration keys and values");
  const KvVqSpec spec = spec_for(in.heads, in.seed);
  // Fit on the windows before the held-out ones (KvCacheAlgorithm::run measures those); rows
  // without window boundaries are one window.
  const std::vector<Index> windows = in.window_rows.empty() ? std::vector<Index>{in.values->rows()} : in.window_rows;
  const std::size_t nw = windows.size(), hw = kv_heldout_window(nw);
  const Index fit_rows = kv_window_rows(windows, hw > 0 ? hw : nw);
  const Matrix& Kc = spec.key_stage == KvStage::PreRope ? *in.keys_pre_rope : *in.keys_post_rope;
  KvVqFitReport rep;
  auto q = VqKvQuantizer::fit(spec, in.heads, take_rows(Kc, 0, fit_rows, opt_.train_tokens),
                              take_rows(*in.values, 0, fit_rows, opt_.train_tokens), &rep);
  diag.emplace_back("train_tokens", static_cast<double>(std::min<Index>(fit_rows, opt_.train_tokens)));
  diag.emplace_back("key_stages", spec.key_stages);
  diag.emplace_back("value_stages", spec.value_stages);
  diag.emplace_back("group_width", static_cast<double>(q->group_width()));
  diag.emplace_back("codebook_bytes", static_cast<double>(q->codebook_bytes()));
  stage_diagnostics(rep, diag);
  return q;
}

std::shared_ptr<OptionSchema<CommVqOptions>> make_schema() {
  auto s = std::make_shared<OptionSchema<CommVqOptions>>();
  s->add("k_bits", &CommVqOptions::k_bits,
         "key code bits per element; stages = floor(k_bits x group width / (2 sub_bits)) (fp16 norms come on top)",
         {0.0, 16.0});
  s->add("v_bits", &CommVqOptions::v_bits, "value code bits per element, as k_bits", {0.0, 16.0});
  s->add("k_stages", &CommVqOptions::k_stages, "key residual stages (0 = from k_bits)", {0, 1024});
  s->add("v_stages", &CommVqOptions::v_stages, "value residual stages (0 = from v_bits)", {0, 1024});
  s->add_enum("keys", &CommVqOptions::keys,
              "key codebook: commutative (CommVQ, pre-RoPE) or free (unconstrained residual VQ, the ablation)",
              {{"commutative", KeyCodebook::Commutative}, {"free", KeyCodebook::Free}});
  s->add_enum("key_stage", &CommVqOptions::key_stage,
              "where keys are quantized: auto (commutative: pre_rope; free: post_rope), pre_rope, post_rope",
              {{"auto", KeyStageOpt::Auto}, {"pre_rope", KeyStageOpt::PreRope}, {"post_rope", KeyStageOpt::PostRope}});
  s->add("group_heads", &CommVqOptions::group_heads,
         "KV heads per codebook group (0 = the whole heads closest to 128 channels); must divide the KV heads",
         {0, 1 << 16});
  s->add("residual_length", &CommVqOptions::residual_length, "most recent tokens kept exact (R)", {0, 1 << 30});
  s->add("sub_bits", &CommVqOptions::sub_bits, "bits of each of the two sub-table indices of a stage", {1, 8});
  s->add("em_steps", &CommVqOptions::em_steps, "EM steps per stage (early stop when the MSE stops improving)",
         {1, 100000});
  s->add("t_start", &CommVqOptions::t_start, "E-step temperature at the first step (times the stage scale)",
         {1e-30, 1e30});
  s->add("t_end", &CommVqOptions::t_end, "E-step temperature at the last step (times the stage scale)", {1e-30, 1e30});
  s->add("train_tokens", &CommVqOptions::train_tokens, "most calibration tokens the codebooks are fitted on",
         {64, 1 << 30});
  s->validator([](const CommVqOptions& o, const ConfigNode& map, const std::string& path) {
    auto at = [&](const char* key) { return map.find(key) ? map.find(key)->loc() : map.loc(); };
    for (auto [key, b] : {std::pair<const char*, double>{"k_bits", o.k_bits}, {"v_bits", o.v_bits}})
      if (!(b > 0)) throw ConfigError(at(key), join_path(path, key), "expected a positive bit width");
    if (o.keys == KeyCodebook::Commutative && o.key_stage == KeyStageOpt::PostRope)
      throw ConfigError(at("key_stage"), join_path(path, "key_stage"),
                        "commutative key codebooks quantize keys before RoPE (their point); use keys: free for "
                        "post-RoPE VQ");
  });
  return s;
}

}  // namespace

void register_commvq(AlgorithmRegistry& registry) {
  AlgorithmInfo info;
  info.name = "commvq";
  info.scope = Scope::KvCache;
  info.summary =
      "RoPE-commutative residual VQ of pre-RoPE keys (EM, structured M-step), R exact recent tokens; "
      "values: unconstrained residual VQ after per-channel scale + norm (deviation: the paper trains an encoder)";
  info.paper = "CommVQ: Commutative Vector Quantization for KV Cache Compression, arXiv 2506.18879";
  info.uses_weight_spec = false;
  info.needs.kv = true;
  // 4 KV channels: 2-bit sub-indices (16 codewords per stage), 2 stages per 2 bits.
  info.tiny_model_options = "sub_bits: 2, em_steps: 20";
  info.options = make_schema();
  info.make = [](const std::any& o) { return std::make_unique<CommVq>(std::any_cast<const CommVqOptions&>(o)); };
  registry.add(std::move(info));
}

}  // namespace ql
