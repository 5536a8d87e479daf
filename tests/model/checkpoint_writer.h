// Test helper: writes small safetensors files and Hugging Face checkpoint directories, valid or
// deliberately broken. Independent of core/model (its own tensor naming and encoders), so the
// loader is checked against a second implementation of the format rather than against itself.
#pragma once
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

namespace ql {
namespace testutil {

using Json = nlohmann::json;

struct RawTensor {
  std::string name;
  std::string dtype;  // "F32", "F16", "BF16" or anything else for negative tests
  std::vector<int64_t> shape;
  std::string bytes;  // little-endian element bytes
};

inline void put_u16(std::string& out, uint16_t v) {
  out.push_back(static_cast<char>(v & 0xff));
  out.push_back(static_cast<char>(v >> 8));
}

inline void put_u32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

/// binary16 bits of a float that binary16 represents exactly as a normal number or zero
/// (throws otherwise: the helper never rounds, so a test's expected values are exact).
inline uint16_t half_bits_exact(float v) {
  const uint16_t sign = std::signbit(v) ? 0x8000 : 0;
  if (v == 0.0f) return sign;
  int e;
  const double m = std::frexp(std::fabs(static_cast<double>(v)), &e);  // |v| = m 2^e, m in [0.5, 1)
  const int biased = e - 1 + 15;
  const double frac = (2.0 * m - 1.0) * 1024.0;
  if (biased < 1 || biased > 30 || frac != std::floor(frac))
    throw std::logic_error("half_bits_exact: value not exactly representable as a normal half");
  return static_cast<uint16_t>(sign | (biased << 10) | static_cast<uint16_t>(frac));
}

/// bfloat16 bits of a float whose low 16 bits are zero (throws otherwise).
inline uint16_t bf16_bits_exact(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  if (b & 0xffffu) throw std::logic_error("bf16_bits_exact: value not exactly representable");
  return static_cast<uint16_t>(b >> 16);
}

inline std::string encode(const std::vector<float>& values, const std::string& dtype) {
  std::string out;
  for (float v : values) {
    if (dtype == "F32") {
      uint32_t b;
      std::memcpy(&b, &v, 4);
      put_u32(out, b);
    } else if (dtype == "F16") {
      put_u16(out, half_bits_exact(v));
    } else if (dtype == "BF16") {
      put_u16(out, bf16_bits_exact(v));
    } else {
      throw std::logic_error("encode: unknown dtype " + dtype);
    }
  }
  return out;
}

inline int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

/// Deterministic values i/64 with |i| <= 127 (exact in F32, F16 and BF16), distinct per name.
inline std::vector<float> pattern_values(const std::string& name, int64_t n) {
  uint32_t h = 2166136261u;
  for (unsigned char ch : name) h = (h ^ ch) * 16777619u;
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t x = (h + static_cast<uint32_t>(k) * 2654435761u) >> 8;
    v[static_cast<size_t>(k)] = static_cast<float>(static_cast<int>(x % 255u) - 127) / 64.0f;
  }
  return v;
}

inline RawTensor make_tensor(const std::string& name, const std::vector<int64_t>& shape,
                             const std::string& dtype) {
  return {name, dtype, shape, encode(pattern_values(name, numel(shape)), dtype)};
}

/// 8-byte little-endian length + header text + data bytes.
inline std::string frame(const std::string& header, const std::string& data) {
  std::string out;
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  return out + header + data;
}

/// The JSON header for tensors stored back to back in the given order.
inline Json header_for(const std::vector<RawTensor>& tensors, const Json& metadata = nullptr) {
  Json h = Json::object();
  uint64_t off = 0;
  for (const RawTensor& t : tensors) {
    h[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {off, off + t.bytes.size()}}};
    off += t.bytes.size();
  }
  if (!metadata.is_null()) h["__metadata__"] = metadata;
  return h;
}

/// A whole valid file image. pad = true pads the header with spaces to a multiple of 8 bytes
/// (as the reference writer does); pad = false leaves the data section at an arbitrary offset.
inline std::string safetensors_image(const std::vector<RawTensor>& tensors, const Json& metadata = nullptr,
                                     bool pad = true) {
  std::string header = header_for(tensors, metadata).dump();
  if (pad)
    while ((8 + header.size()) % 8 != 0) header.push_back(' ');
  std::string data;
  for (const RawTensor& t : tensors) data += t.bytes;
  return frame(header, data);
}

inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write " + path);
}

/// A tiny config: hidden 8, 2 layers, 2 heads / 1 kv head of dim 4, mlp 12, vocab 16.
inline Json tiny_config(const std::string& arch = "LlamaForCausalLM") {
  const std::string type = arch == "Qwen2ForCausalLM" ? "qwen2" : arch == "MistralForCausalLM" ? "mistral" : "llama";
  return Json{{"architectures", {arch}},
              {"model_type", type},
              {"hidden_size", 8},
              {"intermediate_size", 12},
              {"num_hidden_layers", 2},
              {"num_attention_heads", 2},
              {"num_key_value_heads", 1},
              {"vocab_size", 16},
              {"max_position_embeddings", 64},
              {"rms_norm_eps", 1e-5},
              {"rope_theta", 10000.0},
              {"hidden_act", "silu"},
              {"tie_word_embeddings", false}};
}

/// Every tensor of the model `cfg` describes, Hugging Face names, values from pattern_values.
/// Biases: q/k/v for Qwen2 (or attention_bias), plus o for Llama with attention_bias.
inline std::vector<RawTensor> tiny_model_tensors(const Json& cfg, const std::string& dtype = "F32") {
  const int64_t H = cfg["hidden_size"], I = cfg["intermediate_size"], V = cfg["vocab_size"];
  const int64_t L = cfg["num_hidden_layers"], nh = cfg["num_attention_heads"], kv = cfg["num_key_value_heads"];
  const int64_t hd = cfg.contains("head_dim") ? cfg["head_dim"].get<int64_t>() : H / nh;
  const std::string arch = cfg["architectures"][0];
  const bool cfg_bias = cfg.contains("attention_bias") && cfg["attention_bias"].get<bool>();
  const bool qkv_bias = arch == "Qwen2ForCausalLM" || cfg_bias;
  const bool o_bias = arch == "LlamaForCausalLM" && cfg_bias;
  const bool tied = cfg.value("tie_word_embeddings", false);
  std::vector<RawTensor> t;
  t.push_back(make_tensor("model.embed_tokens.weight", {V, H}, dtype));
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    t.push_back(make_tensor(p + "input_layernorm.weight", {H}, dtype));
    t.push_back(make_tensor(p + "post_attention_layernorm.weight", {H}, dtype));
    t.push_back(make_tensor(p + "self_attn.q_proj.weight", {nh * hd, H}, dtype));
    t.push_back(make_tensor(p + "self_attn.k_proj.weight", {kv * hd, H}, dtype));
    t.push_back(make_tensor(p + "self_attn.v_proj.weight", {kv * hd, H}, dtype));
    t.push_back(make_tensor(p + "self_attn.o_proj.weight", {H, nh * hd}, dtype));
    if (qkv_bias) {
      t.push_back(make_tensor(p + "self_attn.q_proj.bias", {nh * hd}, dtype));
      t.push_back(make_tensor(p + "self_attn.k_proj.bias", {kv * hd}, dtype));
      t.push_back(make_tensor(p + "self_attn.v_proj.bias", {kv * hd}, dtype));
    }
    if (o_bias) t.push_back(make_tensor(p + "self_attn.o_proj.bias", {H}, dtype));
    t.push_back(make_tensor(p + "mlp.gate_proj.weight", {I, H}, dtype));
    t.push_back(make_tensor(p + "mlp.up_proj.weight", {I, H}, dtype));
    t.push_back(make_tensor(p + "mlp.down_proj.weight", {H, I}, dtype));
  }
  t.push_back(make_tensor("model.norm.weight", {H}, dtype));
  if (!tied) t.push_back(make_tensor("lm_head.weight", {V, H}, dtype));
  return t;
}

inline void write_config(const std::string& dir, const Json& cfg) {
  write_bytes(dir + "/config.json", cfg.dump(2));
}

/// dir/config.json + dir/model.safetensors.
inline void write_checkpoint(const std::string& dir, const Json& cfg, const std::vector<RawTensor>& tensors) {
  std::filesystem::create_directories(dir);
  write_config(dir, cfg);
  write_bytes(dir + "/model.safetensors", safetensors_image(tensors, Json{{"format", "pt"}}));
}

/// dir/config.json + n shards "model-0000k-of-0000n.safetensors" (tensors dealt round-robin)
/// + dir/model.safetensors.index.json.
inline void write_sharded_checkpoint(const std::string& dir, const Json& cfg, const std::vector<RawTensor>& tensors,
                                     int n) {
  std::filesystem::create_directories(dir);
  write_config(dir, cfg);
  std::vector<std::vector<RawTensor>> shards(static_cast<size_t>(n));
  Json weight_map = Json::object();
  auto shard_name = [n](int k) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "model-%05d-of-%05d.safetensors", k + 1, n);
    return std::string(buf);
  };
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int k = static_cast<int>(i % static_cast<size_t>(n));
    shards[static_cast<size_t>(k)].push_back(tensors[i]);
    weight_map[tensors[i].name] = shard_name(k);
  }
  uint64_t total = 0;
  for (int k = 0; k < n; ++k) {
    for (const RawTensor& t : shards[static_cast<size_t>(k)]) total += t.bytes.size();
    write_bytes(dir + "/" + shard_name(k), safetensors_image(shards[static_cast<size_t>(k)]));
  }
  write_bytes(dir + "/model.safetensors.index.json",
              Json{{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}}.dump(2));
}

/// A fresh empty directory under the system temp dir, unique per process and tag.
inline std::string fresh_dir(const std::string& tag) {
  const std::filesystem::path p = std::filesystem::temp_directory_path() /
                                  ("ql_ckpt_" + std::to_string(::getpid()) + "_" + tag);
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p.string();
}

}  // namespace testutil
}  // namespace ql
