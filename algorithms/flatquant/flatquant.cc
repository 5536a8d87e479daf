#include "algorithms/flatquant/flatquant.h"

#include <memory>

#include "algorithms/algorithm.h"
#include "algorithms/flatquant/trainer.h"
#include "core/error.h"
#include "core/rng.h"

namespace ql {
namespace {

struct FlatQuantOptions {
  int epochs = 15;
  double lr = 5e-3, clip_lr_factor = 10, weight_decay = 0.01, diag_alpha = 0.3;
  bool add_diag = true, lwc = true, lac = true, train_transform = true;
  int seed = 0;
  int batch_tokens = 128;
  int batch_size = 4;
  FactorForm form = FactorForm::Svd;
  bool train_kv = true;

  FlatTrainOptions train(uint64_t stream) const {
    FlatTrainOptions o;
    o.form = form;
    o.epochs = epochs;
    o.lr = lr;
    o.clip_lr_factor = clip_lr_factor;
    o.weight_decay = weight_decay;
    o.diag_alpha = diag_alpha;
    o.add_diag = add_diag;
    o.lwc = lwc;
    o.lac = lac;
    o.train_transform = train_transform;
    o.seed = static_cast<uint64_t>(seed);
    o.stream = stream;
    return o;
  }
};

class FlatQuant final : public BlockAlgorithm {
 public:
  explicit FlatQuant(FlatQuantOptions o) : opt_(o) {}

 private:
  BlockTransforms compute_transforms(const BlockInput& in, Diagnostics& diag) const override {
    if (!in.inputs || !in.targets)
      throw ShapeError("'" + in.name + "': flatquant needs the block's calibration inputs and FP outputs");
    const int epochs = opt_.epochs;
    auto progress = [&](int epoch, double loss) {
      if (in.progress)
        in.progress("flatquant epoch " + std::to_string(epoch + 1) + "/" + std::to_string(epochs) + " loss " +
                    std::to_string(loss));
    };
    const ScalarKvSpec* kv = in.kv_grid && opt_.train_kv ? &*in.kv_grid : nullptr;
    FlatBlockResult r = train_flat_block(*in.config, *in.weights, *in.inputs, *in.targets, in.weight_spec,
                                         in.act_spec, kv, opt_.batch_size, opt_.train(in.seed), progress);
    // A KV cache whose grid the graph cannot simulate (codebooks, per-channel keys) still gets
    // P_k per head on keys (P_k⁻ᵀ on queries) after RoPE, random orthogonal as the rotation's.
    if (in.kv_quantized && !kv)
      r.transforms[TransformSlot::KeysPerHead] = std::make_shared<const InputTransform>(InputTransform::per_head(
          TransformFactor::orthogonal(random_orthogonal(in.config->head_dim, static_cast<uint64_t>(opt_.seed),
                                                        mix_stream(in.seed, 97))),
          in.config->num_kv_heads));
    diag = {{"loss_sum_first_epoch", r.loss_sum_first_epoch},
            {"loss_sum_last_epoch", r.loss_sum_last_epoch},
            {"cond_qkv_in", r.cond_a},
            {"cond_gate_up_in", r.cond_ug},
            {"cond_down_in", r.cond_d},
            {"cond_v_out", r.cond_v},
            {"cond_o_in", r.cond_o},
            {"kv_trained", kv ? 1.0 : 0.0},
            {"steps", static_cast<double>(r.steps)},
            {"trained_params", static_cast<double>(r.trained_params)}};
    if (kv) {
      diag.push_back({"cond_k_post_rope", r.cond_k});
      diag.push_back({"key_clip_lo", r.transforms.key_clip.lo});
      diag.push_back({"key_clip_hi", r.transforms.key_clip.hi});
      diag.push_back({"value_clip_lo", r.transforms.value_clip.lo});
      diag.push_back({"value_clip_hi", r.transforms.value_clip.hi});
    }
    return r.transforms;
  }

  StandaloneResult fit_standalone(const StandaloneInput& in) const override {
    if (!in.X_calib || in.weights.size() != 1)
      throw ShapeError("'" + in.name + "': flatquant trains a standalone input against its one consumer and "
                       "calibration inputs");
    const FlatTrainOptions o = opt_.train(in.stream);
    const FlatLayerResult r = train_flat_layer(*in.X_calib, *in.weights.front(), in.weight_spec, in.act_spec,
                                               opt_.batch_tokens, o);
    StandaloneResult out;
    out.transform = r.transform;
    out.weights.push_back(r.weight);
    out.act_clip = r.act_clip;
    out.diagnostics = {{"loss_first_epoch", r.loss_first_epoch}, {"loss_last_epoch", r.loss_last_epoch},
                       {"cond_p1", r.cond_p1},                   {"cond_p2", r.cond_p2},
                       {"steps", static_cast<double>(r.steps)},  {"act_clip_lo", r.act_clip.lo},
                       {"act_clip_hi", r.act_clip.hi}};
    return out;
  }

  FlatQuantOptions opt_;
};

std::shared_ptr<OptionSchema<FlatQuantOptions>> make_schema() {
  auto s = std::make_shared<OptionSchema<FlatQuantOptions>>();
  s->add("epochs", &FlatQuantOptions::epochs, "passes over the calibration data", {1, 100000});
  s->add("lr", &FlatQuantOptions::lr,
         "AdamW learning rate of the transforms and channel scales (the reference's flat_lr)", {0.0, 10.0});
  s->add("clip_lr_factor", &FlatQuantOptions::clip_lr_factor,
         "learning rate of the clipping logits = lr x this", {0.0, 1e6});
  s->add("weight_decay", &FlatQuantOptions::weight_decay,
         "AdamW decoupled weight decay, on every trained tensor as the reference", {0.0, 1.0});
  s->add("diag_alpha", &FlatQuantOptions::diag_alpha,
         "start of the channel scale c_j = max|W_:j|^(1-a) / max|x_j|^a", {0.0, 1.0});
  s->add("add_diag", &FlatQuantOptions::add_diag, "learn a per-channel scale before P");
  s->add("lwc", &FlatQuantOptions::lwc, "learnable weight clipping per output row");
  s->add("lac", &FlatQuantOptions::lac, "learnable activation clipping per tensor");
  s->add("train_transform", &FlatQuantOptions::train_transform,
         "train P (false: P stays at its random orthogonal start; c and clipping still train)");
  s->add_enum("parameterisation", &FlatQuantOptions::form,
              "factors as U diag(s) V^T with Cayley-orthogonal U, V (svd), or the matrix itself with its inverse "
              "computed in double (direct_inverse)",
              {{"svd", FactorForm::Svd}, {"direct_inverse", FactorForm::DirectInverse}});
  s->add("train_kv", &FlatQuantOptions::train_kv,
         "with a later KV-cache step whose grid can be simulated (kv_rtn, per-token post-RoPE): train P_k and the "
         "K/V grids' clipping with the block (false: P_k random orthogonal, no KV in the objective)");
  s->add("seed", &FlatQuantOptions::seed, "seed of the random starting factors", {0, 2147483647});
  s->add("batch_tokens", &FlatQuantOptions::batch_tokens, "calibration tokens per step on a standalone layer",
         {1, 1 << 30});
  s->add("batch_size", &FlatQuantOptions::batch_size, "calibration windows per step on a model block (cali_bsz)",
         {1, 1 << 20});
  return s;
}

}  // namespace

void register_flatquant(AlgorithmRegistry& registry) {
  AlgorithmInfo info;
  info.name = "flatquant";
  info.scope = Scope::Block;
  info.summary =
      "learned Kronecker transforms (SVD form, Cayley factors) with a per-channel scale, learnable weight and "
      "activation clipping, trained per block against the FP block's output (per layer on the synthetic suite)";
  info.paper = "FlatQuant: Flatness Matters for LLM Quantization, arXiv 2410.09426";
  info.uses_weight_spec = false;
  info.standalone_inputs = true;
  info.needs.block_io = true;
  info.options = make_schema();
  info.make = [](const std::any& o) {
    return std::make_unique<FlatQuant>(std::any_cast<const FlatQuantOptions&>(o));
  };
  registry.add(std::move(info));
}

}  // namespace ql
