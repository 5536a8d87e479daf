#include "algorithms/zeroqat/zeroqat.h"

#include <regex>

#include "algorithms/algorithm.h"
#include "algorithms/zeroqat/qat_trainer.h"
#include "core/error.h"

namespace ql {

namespace {

class ZeroQat final : public ModelAlgorithm {
 public:
  explicit ZeroQat(QatTrainOptions o) : o_(std::move(o)) {}

 private:
  void process_model(ModelInput& in, ModelResult& out) const override {
    QatTrainOptions o = o_;
    o.seed = in.seed;
    QatTrainResult r = train_qat(*in.model, *in.windows, o, in.progress);
    out.diagnostics = std::move(r.diagnostics);
    out.trace = std::move(r.trace);
  }
  QatTrainOptions o_;
};

std::shared_ptr<OptionSchema<QatTrainOptions>> make_schema() {
  using O = QatTrainOptions;
  auto s = std::make_shared<OptionSchema<O>>();
  s->add_enum("estimator", &O::estimator, "spsa: two forwards per query (ZeroQAT); first_order: backprop + STE",
              {{"spsa", QatEstimator::Spsa}, {"first_order", QatEstimator::FirstOrder}});
  s->add("clip", &O::clip, "train per-group weight clipping logits on the warm start's grids (LWC)");
  s->add("smooth", &O::smooth, "train per-channel smoothing scales at norm-produced inputs (folded into the norms)");
  s->add("latent_weights", &O::latent_weights, "regex over linear names whose float latent weights train");
  s->add_enum("loss", &O::loss, "next-token cross-entropy, or KL to the FP model's distribution",
              {{"ce", LmLoss::CrossEntropy}, {"kl", LmLoss::KlToReference}});
  s->add("steps", &O::steps, "parameter updates", {0, 1e7});
  s->add("batch", &O::batch, "calibration windows per step", {1, 1e5});
  s->add("queries", &O::queries, "spsa: ± query pairs per step (n)", {1, 1e4});
  s->add("eps", &O::eps, "spsa: perturbation scale ε", {1e-12, 1e3});
  s->add("lr", &O::lr, "learning rate", {0, 1e6});
  s->add("weight_lr_scale", &O::weight_lr_scale, "latent weights step at lr times this", {0, 1e6});
  s->add_enum("lr_schedule", &O::schedule, "constant, or linear from lr to lr · lr_end over the steps",
              {{"constant", LrSchedule::Constant}, {"linear", LrSchedule::Linear}});
  s->add("lr_end", &O::lr_end, "linear schedule: the last step's lr as a fraction of lr", {0, 1});
  s->add_enum("optimizer", &O::optimizer, "first_order: adamw or plain sgd",
              {{"adamw", QatOptimizer::AdamW}, {"sgd", QatOptimizer::Sgd}});
  s->add("weight_decay", &O::weight_decay, "first_order adamw: decoupled weight decay", {0, 1});
  s->add("heldout", &O::heldout, "calibration windows held out for the held-out loss", {0, 1e5});
  s->add("eval_every", &O::eval_every, "held-out loss every k steps (0: at the start and end only)", {0, 1e7});
  s->add("grad_check_every", &O::grad_check_every,
         "spsa: cosine of the estimate with the exact gradient every k steps (0: never)", {0, 1e7});
  s->add("stochastic_perturbation", &O::stochastic_perturbation,
         "spsa: perturb latent weights by whole grid steps (stochastic rounding of eps z / step)");
  s->add("tokens", &O::tokens, "crop calibration windows to their first `tokens` ids (0: as given)", {0, 1e7});
  s->validator([](const O& o, const ConfigNode& map, const std::string& path) {
    if (!o.latent_weights.empty()) {
      try {
        std::regex re(o.latent_weights, std::regex::ECMAScript);
      } catch (const std::regex_error& e) {
        throw ConfigError(map.key_loc("latent_weights"), join_path(path, "latent_weights"),
                          "invalid regex '" + o.latent_weights + "': " + e.what());
      }
    }
    if (!o.clip && !o.smooth && o.latent_weights.empty())
      throw ConfigError(map.loc(), path, "nothing to train: clip and smooth are false and latent_weights is empty");
    auto only = [&](const char* key, bool allowed, const std::string& why) {
      if (!allowed && map.find(key))
        throw ConfigError(map.key_loc(key), join_path(path, key), std::string("'") + key + "' is only used " + why);
    };
    const bool spsa = o.estimator == QatEstimator::Spsa;
    only("queries", spsa, "with estimator: spsa");
    only("eps", spsa, "with estimator: spsa");
    only("grad_check_every", spsa, "with estimator: spsa");
    only("stochastic_perturbation", spsa && !o.latent_weights.empty(), "with estimator: spsa and latent_weights");
    only("optimizer", !spsa, "with estimator: first_order");
    only("weight_decay", !spsa && o.optimizer == QatOptimizer::AdamW, "with estimator: first_order, optimizer: adamw");
    only("lr_end", o.schedule == LrSchedule::Linear, "with lr_schedule: linear");
    only("weight_lr_scale", !o.latent_weights.empty(), "with latent_weights");
  });
  return s;
}

}  // namespace

void register_zeroqat(AlgorithmRegistry& registry) {
  AlgorithmInfo info;
  info.name = "zeroqat";
  info.scope = Scope::Model;
  info.summary =
      "end-to-end QAT of clipping logits, smoothing scales and chosen latent weights on the warm start's grids: "
      "SPSA with two forwards per query (ZeroQAT) or first-order backprop with STE";
  info.paper = "ZeroQAT: End-to-End On-Device Quantization-Aware Training for LLMs at Inference Cost, arXiv 2509.00031";
  info.uses_weight_spec = false;
  info.tiny_model_options = "steps: 3, heldout: 1, batch: 2";
  info.options = make_schema();
  info.make = [](const std::any& o) { return std::make_unique<ZeroQat>(std::any_cast<const QatTrainOptions&>(o)); };
  registry.add(std::move(info));
}

}  // namespace ql
