#include "core/model/checkpoint.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/error.h"
#include "core/model/safetensors.h"
#include "core/parallel.h"

namespace ql {

namespace {

using Json = nlohmann::json;
namespace fs = std::filesystem;

const char* const kLlama = "LlamaForCausalLM";
const char* const kMistral = "MistralForCausalLM";
const char* const kQwen2 = "Qwen2ForCausalLM";
const char* const kQwen3 = "Qwen3ForCausalLM";

std::string join_list(const std::vector<std::string>& items) {
  std::string s;
  for (size_t i = 0; i < items.size(); ++i) s += (i ? ", " : "") + items[i];
  return s;
}

std::string short_dump(const Json& v) {
  std::string s = v.dump();
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return s;
}

std::string fmt_double(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", x);
  return buf;
}

// Typed access to config.json fields; every failure is a ConfigError naming the file and field.
class ConfigReader {
 public:
  ConfigReader(std::string path, const Json& j) : path_(std::move(path)), j_(j) {}

  [[noreturn]] void fail(const std::string& key, const std::string& what) const {
    throw ConfigError(SourceLoc{path_, 0, 0}, key, what);
  }
  // A null value is treated like an absent one: transformers writes null for unset options.
  bool has(const std::string& key) const { return j_.contains(key) && !j_.at(key).is_null(); }
  const Json& at(const std::string& key) const { return j_.at(key); }

  int get_int(const std::string& key, bool required, int fallback, int min_value) const {
    if (!has(key)) {
      if (required) fail(key, "missing (a required field)");
      return fallback;
    }
    const Json& v = j_.at(key);
    if (!v.is_number_integer())
      fail(key, "expected an integer, found " + std::string(v.type_name()) + " " + short_dump(v));
    const int64_t x = v.is_number_unsigned() ? static_cast<int64_t>(std::min<uint64_t>(v.get<uint64_t>(), INT64_MAX))
                                             : v.get<int64_t>();
    if (x < min_value || x > INT_MAX)
      fail(key, "expected an integer in [" + std::to_string(min_value) + ", " + std::to_string(INT_MAX) +
                    "], found " + short_dump(v));
    return static_cast<int>(x);
  }
  double get_positive_double(const std::string& key, double fallback) const {
    if (!has(key)) return fallback;
    const Json& v = j_.at(key);
    if (!v.is_number()) fail(key, "expected a number, found " + std::string(v.type_name()) + " " + short_dump(v));
    const double x = v.get<double>();
    if (!(x > 0.0) || !std::isfinite(x)) fail(key, "expected a positive finite number, found " + short_dump(v));
    return x;
  }
  bool get_bool(const std::string& key, bool fallback) const {
    if (!has(key)) return fallback;
    const Json& v = j_.at(key);
    if (!v.is_boolean()) fail(key, "expected true or false, found " + std::string(v.type_name()) + " " + short_dump(v));
    return v.get<bool>();
  }
  std::string get_string(const std::string& key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    const Json& v = j_.at(key);
    if (!v.is_string()) fail(key, "expected a string, found " + std::string(v.type_name()) + " " + short_dump(v));
    return v.get<std::string>();
  }
  // Token ids: an integer, or a list whose first entry is used (Llama 3 lists several EOS ids).
  int get_token_id(const std::string& key) const {
    if (!has(key)) return -1;
    const Json& v = j_.at(key);
    const Json* x = &v;
    if (v.is_array()) {
      if (v.empty()) return -1;
      x = &v[0];
    }
    if (!x->is_number_integer() || x->get<int64_t>() < 0 || x->get<int64_t>() > INT_MAX)
      fail(key, "expected a non-negative integer or a list of them, found " + short_dump(v));
    return static_cast<int>(x->get<int64_t>());
  }

 private:
  std::string path_;
  const Json& j_;
};

Json read_json_file(const std::string& path, const std::string& role) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw IoError(path + ": not found (" + role + ")");
  if (!fs::is_regular_file(path, ec)) throw IoError(path + ": not a regular file (" + role + ")");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError(path + ": cannot open for reading (" + role + ")");
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return Json::parse(ss.str());
  } catch (const Json::parse_error& e) {
    std::string w = e.what();
    const size_t p = w.find("parse error");
    throw IoError(path + ": invalid JSON: " + (p == std::string::npos ? w : w.substr(p)));
  }
}

struct Slot {
  ExpectedTensor t;
  float* dst = nullptr;
};

// The tensors a config implies, in model order. With `w`, also sizes w's storage and records
// where each tensor lands; w->blocks is sized once here so the recorded pointers stay valid.
std::vector<Slot> plan(const ModelConfig& c, ModelWeights* w) {
  std::vector<Slot> s;
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  const int64_t qd = static_cast<int64_t>(c.num_heads) * c.head_dim;
  const int64_t kvd = static_cast<int64_t>(c.num_kv_heads) * c.head_dim;
  const bool o_bias = c.attention_bias && (c.architecture == kLlama || c.architecture == kQwen3);
  auto mat = [&](const std::string& name, Matrix* m, int64_t r, int64_t cols) {
    if (m) m->resize(r, cols);
    s.push_back({{name, {r, cols}}, m ? m->data() : nullptr});
  };
  auto vec = [&](const std::string& name, Vector* v, int64_t n) {
    if (v) v->resize(n);
    s.push_back({{name, {n}}, v ? v->data() : nullptr});
  };
  if (w) {
    w->config = c;
    w->blocks.assign(c.num_layers, DecoderBlock());
  }
  mat("model.embed_tokens.weight", w ? &w->embed : nullptr, V, H);
  for (int i = 0; i < c.num_layers; ++i) {
    DecoderBlock* b = w ? &w->blocks[i] : nullptr;
    const std::string p = "model.layers." + std::to_string(i) + ".";
    vec(p + "input_layernorm.weight", b ? &b->input_norm : nullptr, H);
    const struct { LinearKind kind; int64_t out, in; bool bias; } lin[] = {
        {LinearKind::Q, qd, H, c.attention_bias},  {LinearKind::K, kvd, H, c.attention_bias},
        {LinearKind::V, kvd, H, c.attention_bias}, {LinearKind::O, H, qd, o_bias},
        {LinearKind::Gate, I, H, false},           {LinearKind::Up, I, H, false},
        {LinearKind::Down, H, I, false}};
    for (const auto& l : lin) {
      Linear* L = b ? &b->linear(l.kind) : nullptr;
      const std::string base = p + linear_suffix(l.kind);
      mat(base + ".weight", L ? &L->W : nullptr, l.out, l.in);
      if (l.bias) vec(base + ".bias", L ? &L->b : nullptr, l.out);
      if (l.kind == LinearKind::K && c.qk_norm) {
        vec(p + "self_attn.q_norm.weight", b ? &b->q_norm : nullptr, c.head_dim);
        vec(p + "self_attn.k_norm.weight", b ? &b->k_norm : nullptr, c.head_dim);
      }
      if (l.kind == LinearKind::O)
        vec(p + "post_attention_layernorm.weight", b ? &b->post_attn_norm : nullptr, H);
    }
  }
  vec("model.norm.weight", w ? &w->final_norm : nullptr, H);
  if (!c.tie_word_embeddings) mat("lm_head.weight", w ? &w->lm_head : nullptr, V, H);
  return s;
}

// "model.layers.<digits>.self_attn.rotary_emb.inv_freq": a RoPE buffer older transformers
// versions saved; derived from rope_theta, so it carries no weights.
bool is_rope_buffer(const std::string& name) {
  const std::string pre = "model.layers.", suf = ".self_attn.rotary_emb.inv_freq";
  if (name.size() <= pre.size() + suf.size()) return false;
  if (name.compare(0, pre.size(), pre) != 0) return false;
  if (name.compare(name.size() - suf.size(), suf.size(), suf) != 0) return false;
  const std::string mid = name.substr(pre.size(), name.size() - pre.size() - suf.size());
  return !mid.empty() && std::all_of(mid.begin(), mid.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
}

// The opened weight files of one checkpoint and which file holds each tensor.
struct WeightSource {
  std::vector<SafetensorsFile> files;
  std::map<std::string, size_t> where;  // tensor -> index into files
  std::string listing;                   // the file that lists the tensors (for "missing" errors)
};

WeightSource open_single(const std::string& path) {
  WeightSource src;
  src.files.push_back(SafetensorsFile::open(path));
  for (const std::string& n : src.files[0].names()) src.where[n] = 0;
  src.listing = path;
  return src;
}

WeightSource open_sharded(const std::string& dir, const std::string& index_path) {
  const Json idx = read_json_file(index_path, "sharded checkpoint index");
  if (!idx.is_object() || !idx.contains("weight_map") || !idx["weight_map"].is_object())
    throw IoError(index_path + ": field 'weight_map' missing or not an object of tensor name -> shard file");
  const Json& wm = idx["weight_map"];
  WeightSource src;
  src.listing = index_path;
  std::map<std::string, std::string> shard_of;
  std::set<std::string> shard_names;
  for (auto it = wm.begin(); it != wm.end(); ++it) {
    if (!it.value().is_string())
      throw IoError(index_path + ": field 'weight_map." + it.key() + "' is not a file name (found " +
                    short_dump(it.value()) + ")");
    const std::string shard = it.value().get<std::string>();
    const fs::path sp(shard);
    const bool escapes = std::any_of(sp.begin(), sp.end(), [](const fs::path& part) { return part == ".."; });
    if (shard.empty() || sp.is_absolute() || escapes)
      throw IoError(index_path + ": field 'weight_map." + it.key() + "': shard '" + shard +
                    "' must be a file name relative to the checkpoint directory");
    shard_of[it.key()] = shard;
    shard_names.insert(shard);
  }
  if (shard_of.empty()) throw IoError(index_path + ": field 'weight_map' is empty");

  // Each shard is opened (and its header validated) once, in name order.
  std::map<std::string, size_t> file_index;
  for (const std::string& shard : shard_names) {
    const std::string sp = (fs::path(dir) / shard).string();
    std::error_code ec;
    if (!fs::exists(sp, ec))
      throw IoError(sp + ": not found (shard listed in " + index_path + ")");
    file_index[shard] = src.files.size();
    src.files.push_back(SafetensorsFile::open(sp));
  }
  for (const auto& kv : shard_of) {
    const size_t fi = file_index.at(kv.second);
    if (!src.files[fi].contains(kv.first))
      throw IoError(src.files[fi].path() + ": tensor '" + kv.first + "' is not in this shard, but " +
                    index_path + " maps it here");
    src.where[kv.first] = fi;
  }
  // The index must describe the shards completely: a tensor it does not list would be loaded by
  // nobody, or twice if two shards hold it.
  for (size_t fi = 0; fi < src.files.size(); ++fi) {
    for (const std::string& n : src.files[fi].names()) {
      auto it = src.where.find(n);
      if (it == src.where.end())
        throw IoError(src.files[fi].path() + ": tensor '" + n + "' is not listed in " + index_path);
      if (it->second != fi)
        throw IoError(src.files[fi].path() + ": tensor '" + n + "' is also stored here, but " + index_path +
                      " maps it to " + src.files[it->second].path());
    }
  }
  return src;
}

WeightSource open_weights(const std::string& dir) {
  const std::string single = (fs::path(dir) / "model.safetensors").string();
  const std::string index = (fs::path(dir) / "model.safetensors.index.json").string();
  std::error_code ec;
  const bool has_single = fs::exists(single, ec), has_index = fs::exists(index, ec);
  if (has_single && has_index)
    throw IoError(dir + ": holds both model.safetensors and model.safetensors.index.json; keep one so it is clear which weights are meant");
  if (has_single) return open_single(single);
  if (has_index) return open_sharded(dir, index);
  std::vector<std::string> found;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string n = e.path().filename().string();
    if (n.find(".safetensors") != std::string::npos || n.find(".bin") != std::string::npos) found.push_back(n);
  }
  std::sort(found.begin(), found.end());
  throw IoError(dir + ": no model.safetensors or model.safetensors.index.json" +
                (found.empty() ? std::string() : " (found " + join_list(found) + "; PyTorch .bin weights are not supported)"));
}

std::string config_summary(const ModelConfig& c) {
  return "hidden_size " + std::to_string(c.hidden_size) + ", intermediate_size " +
         std::to_string(c.intermediate_size) + ", heads " + std::to_string(c.num_heads) + "/" +
         std::to_string(c.num_kv_heads) + " kv, head_dim " + std::to_string(c.head_dim) + ", vocab_size " +
         std::to_string(c.vocab_size);
}

// Checks the stored tensor set against the plan; throws on the first problem, mentioning how
// many more of the same kind there are so one run shows the size of the damage.
void check_tensor_set(const ModelConfig& c, const std::vector<Slot>& slots, const WeightSource& src,
                      const std::string& config_path) {
  std::vector<const Slot*> missing;
  for (const Slot& s : slots)
    if (!src.where.count(s.t.name)) missing.push_back(&s);
  if (!missing.empty()) {
    std::string more;
    if (missing.size() > 1) {
      std::vector<std::string> next;
      for (size_t i = 1; i < missing.size() && i < 4; ++i) next.push_back(missing[i]->t.name);
      more = " (" + std::to_string(missing.size() - 1) + " more missing: " + join_list(next) +
             (missing.size() > 4 ? ", ..." : "") + ")";
    }
    throw IoError(src.listing + ": tensor '" + missing[0]->t.name + "' " + shape_str(missing[0]->t.shape) +
                  " is missing (required by " + config_path + ", " + c.architecture + ")" + more);
  }

  std::set<std::string> expected;
  for (const Slot& s : slots) expected.insert(s.t.name);
  for (const auto& kv : src.where) {
    const std::string& n = kv.first;
    if (expected.count(n) || is_rope_buffer(n)) continue;
    if (n == "lm_head.weight" && c.tie_word_embeddings) continue;  // compared with embed after loading
    std::string hint;
    if (n.size() > 5 && n.compare(n.size() - 5, 5, ".bias") == 0)
      hint = "; " + config_path + " implies no such bias";
    throw IoError(src.files[kv.second].path() + ": unexpected tensor '" + n + "' " +
                  shape_str(src.files[kv.second].info(n).shape) + " (not part of " + c.architecture + " with " +
                  std::to_string(c.num_layers) + " layers" + hint + ")");
  }

  auto check_shape = [&](const std::string& name, const std::vector<int64_t>& want) {
    const SafetensorsFile& f = src.files[src.where.at(name)];
    const TensorInfo& t = f.info(name);
    if (t.shape != want)
      throw IoError(f.path() + ": tensor '" + name + "' has shape " + shape_str(t.shape) + ", expected " +
                    shape_str(want) + " from " + config_path + " (" + config_summary(c) + ")");
  };
  for (const Slot& s : slots) check_shape(s.t.name, s.t.shape);
  if (c.tie_word_embeddings && src.where.count("lm_head.weight"))
    check_shape("lm_head.weight", {c.vocab_size, c.hidden_size});
}

}  // namespace

const std::vector<std::string>& supported_architectures() {
  static const std::vector<std::string> archs = {kLlama, kMistral, kQwen2, kQwen3};
  return archs;
}

namespace {

// rope_theta and rope_scaling (transformers < 5) or rope_parameters (>= 5: {"rope_type": ...,
// "rope_theta": x, factors}); scaling keys are "rope_type" or the older "type".
RopeSpec read_rope(const ConfigReader& r, int max_position_embeddings) {
  RopeSpec rope(r.get_positive_double("rope_theta", 10000.0));
  const char* key = r.has("rope_parameters") ? "rope_parameters" : r.has("rope_scaling") ? "rope_scaling" : nullptr;
  if (!key) return rope;
  const Json& o = r.at(key);
  const std::string k = key;
  if (!o.is_object()) r.fail(k, "expected an object, found " + short_dump(o));
  auto number = [&](const char* name, bool required, double fallback) {
    if (!o.contains(name) || o[name].is_null()) {
      if (required) r.fail(k + "." + name, "missing (required by rope_type '" + rope.type_name() + "')");
      return fallback;
    }
    if (!o[name].is_number() || !(o[name].get<double>() > 0.0) || !std::isfinite(o[name].get<double>()))
      r.fail(k + "." + name, "expected a positive number, found " + short_dump(o[name]));
    return o[name].get<double>();
  };
  rope.theta = number("rope_theta", false, rope.theta);
  const char* type_key = o.contains("rope_type") ? "rope_type" : "type";
  std::string type = "default";
  if (o.contains(type_key)) {
    if (!o[type_key].is_string()) r.fail(k + "." + type_key, "expected a string, found " + short_dump(o[type_key]));
    type = o[type_key].get<std::string>();
  }
  if (type == "default") return rope;
  if (type == "linear") {
    rope.scaling = RopeSpec::Scaling::Linear;
  } else if (type == "dynamic") {
    rope.scaling = RopeSpec::Scaling::Dynamic;
    rope.original_max_position = max_position_embeddings;  // as transformers' dynamic NTK
  } else if (type == "llama3") {
    rope.scaling = RopeSpec::Scaling::Llama3;
  } else {
    r.fail(k + "." + type_key, "'" + type + "' is not implemented (implemented: default, " +
                                   join_list(supported_rope_scalings()) + "; " + join_list(rejected_rope_scalings()) +
                                   " also rescale attention and are not supported yet)");
  }
  rope.factor = number("factor", true, 1.0);
  if (rope.scaling == RopeSpec::Scaling::Llama3) {
    rope.low_freq_factor = number("low_freq_factor", true, 1.0);
    rope.high_freq_factor = number("high_freq_factor", true, 4.0);
    rope.original_max_position = static_cast<int64_t>(number("original_max_position_embeddings", true, 0.0));
    if (!(rope.high_freq_factor > rope.low_freq_factor))
      r.fail(k + ".high_freq_factor", "must exceed low_freq_factor (" + fmt_double(rope.low_freq_factor) + ")");
  }
  return rope;
}

}  // namespace

const std::vector<std::string>& supported_rope_scalings() {
  static const std::vector<std::string> types = {"linear", "dynamic", "llama3"};
  return types;
}

const std::vector<std::string>& rejected_rope_scalings() {
  static const std::vector<std::string> types = {"yarn", "longrope"};
  return types;
}

ModelConfig load_model_config(const std::string& path) {
  const Json j = read_json_file(path, "model config");
  if (!j.is_object()) throw IoError(path + ": expected a JSON object at the top level");
  const ConfigReader r(path, j);
  ModelConfig c;

  const std::string supported = join_list(supported_architectures());
  if (!r.has("architectures")) r.fail("architectures", "missing (supported: " + supported + ")");
  const Json& archs = r.at("architectures");
  if (!archs.is_array() || archs.empty() || !archs[0].is_string())
    r.fail("architectures", "expected a non-empty list of names, found " + short_dump(archs) + " (supported: " + supported + ")");
  c.architecture = archs[0].get<std::string>();
  const auto& sa = supported_architectures();
  if (std::find(sa.begin(), sa.end(), c.architecture) == sa.end())
    r.fail("architectures", "unsupported architecture '" + c.architecture + "' (supported: " + supported + ")");
  const bool llama = c.architecture == kLlama, mistral = c.architecture == kMistral, qwen2 = c.architecture == kQwen2;
  const bool qwen3 = c.architecture == kQwen3;

  if (r.has("model_type")) {
    const std::string mt = r.get_string("model_type", "");
    const std::string want = llama ? "llama" : mistral ? "mistral" : qwen2 ? "qwen2" : "qwen3";
    if (mt != want)
      r.fail("model_type", "'" + mt + "' does not match architecture " + c.architecture + " (expected '" + want + "')");
  }

  c.hidden_size = r.get_int("hidden_size", true, 0, 1);
  c.intermediate_size = r.get_int("intermediate_size", true, 0, 1);
  c.num_layers = r.get_int("num_hidden_layers", true, 0, 1);
  c.num_heads = r.get_int("num_attention_heads", true, 0, 1);
  c.vocab_size = r.get_int("vocab_size", true, 0, 1);
  c.num_kv_heads = r.get_int("num_key_value_heads", false, c.num_heads, 1);
  if (c.num_heads % c.num_kv_heads != 0)
    r.fail("num_key_value_heads", std::to_string(c.num_kv_heads) + " does not divide num_attention_heads " +
                                      std::to_string(c.num_heads));
  if (r.has("head_dim")) {
    c.head_dim = r.get_int("head_dim", false, 0, 1);
  } else {
    if (c.hidden_size % c.num_heads != 0)
      r.fail("num_attention_heads", std::to_string(c.num_heads) + " does not divide hidden_size " +
                                        std::to_string(c.hidden_size) + " (and no head_dim is given)");
    c.head_dim = c.hidden_size / c.num_heads;
  }
  // Rotate-half RoPE pairs dimension j with j + head_dim/2.
  if (c.head_dim % 2 != 0)
    r.fail(r.has("head_dim") ? "head_dim" : "num_attention_heads",
           "head_dim " + std::to_string(c.head_dim) + " is odd; rotate-half RoPE needs an even head_dim");
  c.max_position_embeddings =
      r.get_int("max_position_embeddings", false, llama ? 2048 : mistral ? 131072 : 32768, 1);
  c.rms_norm_eps = r.get_positive_double("rms_norm_eps", 1e-6);
  c.tie_word_embeddings = r.get_bool("tie_word_embeddings", false);
  c.bos_token_id = r.get_token_id("bos_token_id");
  c.eos_token_id = r.get_token_id("eos_token_id");

  c.rope = read_rope(r, c.max_position_embeddings);

  const std::string act = r.get_string("hidden_act", "silu");
  if (act != "silu") r.fail("hidden_act", "only 'silu' (SwiGLU MLP) is implemented, found '" + act + "'");

  if (r.has("quantization_config"))
    r.fail("quantization_config", "the checkpoint is already quantized; quantlab loads floating-point checkpoints only");

  if (qwen2 || qwen3) {
    // Qwen2Attention always has q/k/v biases; Qwen3Attention has them (and o_proj's) when
    // attention_bias says so, and a per-head RMSNorm on q and k before RoPE.
    c.attention_bias = qwen2 || r.get_bool("attention_bias", false);
    c.qk_norm = qwen3;
    if (r.get_bool("use_sliding_window", false) && r.has("sliding_window")) {
      const int win = r.get_int("sliding_window", false, 0, 1);
      if (win < c.max_position_embeddings)
        r.fail("use_sliding_window", "sliding-window attention (sliding_window " + std::to_string(win) +
                                         " < max_position_embeddings " + std::to_string(c.max_position_embeddings) +
                                         ") is not supported");
    }
  } else if (mistral) {
    if (r.get_bool("attention_bias", false))
      r.fail("attention_bias", "MistralForCausalLM has no attention biases; true is not a valid Mistral config");
    if (r.has("sliding_window")) {
      const int win = r.get_int("sliding_window", false, 0, 1);
      if (win < c.max_position_embeddings)
        r.fail("sliding_window", "sliding-window attention (window " + std::to_string(win) +
                                     " < max_position_embeddings " + std::to_string(c.max_position_embeddings) +
                                     ") is not supported");
    }
  } else {
    c.attention_bias = r.get_bool("attention_bias", false);
    if (r.get_bool("mlp_bias", false)) r.fail("mlp_bias", "MLP biases are not supported");
  }
  return c;
}

std::vector<ExpectedTensor> expected_tensors(const ModelConfig& config) {
  std::vector<ExpectedTensor> out;
  for (Slot& s : plan(config, nullptr)) out.push_back(std::move(s.t));
  return out;
}

ModelWeights load_checkpoint(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw IoError(dir + ": checkpoint directory not found");
  const std::string config_path = (fs::path(dir) / "config.json").string();
  if (!fs::exists(config_path, ec))
    throw IoError(config_path + ": not found (a checkpoint directory needs config.json beside its weights)");
  const ModelConfig config = load_model_config(config_path);

  const WeightSource src = open_weights(dir);
  ModelWeights w;
  const std::vector<Slot> slots = plan(config, &w);
  check_tensor_set(config, slots, src, config_path);

  // Each task converts one tensor into storage no other task touches, so the loaded bits do not
  // depend on the schedule; the first failure in plan order is the one reported.
  ParallelErrors errs;
  const long n = static_cast<long>(slots.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (long i = 0; i < n; ++i) {
    errs.run(i, [&] {
      const Slot& s = slots[i];
      int64_t numel = 1;
      for (int64_t d : s.t.shape) numel *= d;
      src.files[src.where.at(s.t.name)].read_into(s.t.name, s.dst, numel);
    });
  }
  errs.rethrow();

  if (config.tie_word_embeddings) {
    auto it = src.where.find("lm_head.weight");
    if (it != src.where.end()) {
      const SafetensorsFile& f = src.files[it->second];
      const Matrix stored = f.read_matrix("lm_head.weight");
      for (Index r = 0; r < stored.rows(); ++r)
        for (Index col = 0; col < stored.cols(); ++col)
          if (stored(r, col) != w.embed(r, col))
            throw IoError(f.path() + ": tensor 'lm_head.weight' differs from model.embed_tokens.weight at [" +
                          std::to_string(r) + ", " + std::to_string(col) + "] (" + fmt_double(stored(r, col)) +
                          " vs " + fmt_double(w.embed(r, col)) + ") but " + config_path +
                          " sets tie_word_embeddings: true");
    }
    w.lm_head = w.embed;
  }
  return w;
}

std::string describe(const ModelConfig& c) {
  std::string s = c.architecture + ": " + std::to_string(c.num_layers) + " layers, hidden " +
                  std::to_string(c.hidden_size) + ", " + std::to_string(c.num_heads) + " heads / " +
                  std::to_string(c.num_kv_heads) + " kv heads x head_dim " + std::to_string(c.head_dim) +
                  ", mlp " + std::to_string(c.intermediate_size) + ", vocab " + std::to_string(c.vocab_size) +
                  ", max_pos " + std::to_string(c.max_position_embeddings) + ", rope_theta " +
                  fmt_double(c.rope.theta);
  if (c.rope.scaling != RopeSpec::Scaling::None)
    s += " (" + c.rope.type_name() + " scaling x" + fmt_double(c.rope.factor) + ")";
  s += ", rms_eps " + fmt_double(c.rms_norm_eps) + ", " + (c.tie_word_embeddings ? "tied" : "untied") + " lm_head, ";
  if (!c.attention_bias) s += "no attention bias";
  else s += c.architecture == kQwen2 ? "q/k/v biases" : "q/k/v/o biases";
  if (c.qk_norm) s += ", per-head q/k RMSNorm";
  return s;
}

}  // namespace ql
