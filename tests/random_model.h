// A LLaMA-architecture model with seeded Gaussian weights, built in memory (no checkpoint file):
// for tests of whole-model code (training, model-scope plugins) on shapes small enough for
// finite differences or many runs.
#pragma once
#include <cstdint>
#include <memory>

#include "core/model/model.h"
#include "core/rng.h"

namespace ql::testutil {

struct RandomModelShape {
  int layers = 1, hidden = 32, intermediate = 48, heads = 4, kv_heads = 2, vocab = 50;
  double weight_sd = 0.2;  ///< of every linear; embeddings 1, lm_head weight_sd
};

inline std::shared_ptr<ModelWeights> random_model(const RandomModelShape& s, uint64_t seed = 11) {
  auto w = std::make_shared<ModelWeights>();
  ModelConfig& c = w->config;
  c.architecture = "LlamaForCausalLM";
  c.hidden_size = s.hidden;
  c.intermediate_size = s.intermediate;
  c.num_layers = s.layers;
  c.num_heads = s.heads;
  c.num_kv_heads = s.kv_heads;
  c.head_dim = s.hidden / s.heads;
  c.vocab_size = s.vocab;
  c.max_position_embeddings = 256;
  uint64_t stream = 30;
  auto rnd = [&](Index r, Index k, double sd) {
    const CounterRng g(seed, stream++);
    Matrix m(r, k);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(sd * g.normal(static_cast<uint64_t>(i)));
    return m;
  };
  auto near_one = [&](Index n) {
    const CounterRng g(seed, stream++);
    Vector v(n);
    for (Index i = 0; i < n; ++i) v[i] = static_cast<float>(1.0 + 0.2 * g.normal(static_cast<uint64_t>(i)));
    return v;
  };
  const Index d = s.hidden, kvd = Index(s.kv_heads) * c.head_dim, ff = s.intermediate;
  w->embed = rnd(s.vocab, d, 1.0);
  w->lm_head = rnd(s.vocab, d, s.weight_sd);
  w->final_norm = near_one(d);
  for (int l = 0; l < s.layers; ++l) {
    DecoderBlock b;
    b.input_norm = near_one(d);
    b.post_attn_norm = near_one(d);
    b.q.W = rnd(d, d, s.weight_sd);
    b.k.W = rnd(kvd, d, s.weight_sd);
    b.v.W = rnd(kvd, d, s.weight_sd);
    b.o.W = rnd(d, d, s.weight_sd);
    b.gate.W = rnd(ff, d, s.weight_sd);
    b.up.W = rnd(ff, d, s.weight_sd);
    b.down.W = rnd(d, ff, s.weight_sd);
    w->blocks.push_back(std::move(b));
  }
  return w;
}

}  // namespace ql::testutil
