#include "core/model/checkpoint.h"

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>

#include "core/error.h"
#include "core/model/safetensors.h"
#include "tests/model/checkpoint_writer.h"

namespace ql {
namespace {

using testutil::Json;
using testutil::RawTensor;
namespace fs = std::filesystem;

// Runs f, expects an exception of type E whose message contains every one of `parts`.
template <class E, class F>
void expect_error(F&& f, const std::vector<std::string>& parts) {
  try {
    f();
    ADD_FAILURE() << "no exception thrown; expected one mentioning '" << parts.front() << "'";
  } catch (const E& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "message is not one line: " << msg;
    for (const std::string& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
  }
}

// Reference value of a binary16 bit pattern from the IEEE 754 definition, in double.
double half_reference(uint16_t h) {
  const int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
  const double sign = s ? -1.0 : 1.0;
  if (e == 0) return sign * std::ldexp(m, -24);
  if (e == 31) return m ? std::numeric_limits<double>::quiet_NaN() : sign * INFINITY;
  return sign * std::ldexp(1024 + m, e - 25);
}

double bf16_reference(uint16_t b) {
  const int s = b >> 15, e = (b >> 7) & 255, m = b & 127;
  const double sign = s ? -1.0 : 1.0;
  if (e == 0) return sign * std::ldexp(m, -133);
  if (e == 255) return m ? std::numeric_limits<double>::quiet_NaN() : sign * INFINITY;
  return sign * std::ldexp(128 + m, e - 134);
}

// ---------------------------------------------------------------- pure dtype conversion

TEST(DTypeConversion, HalfKnownValues) {
  EXPECT_EQ(half_to_float(0x3C00), 1.0f);
  EXPECT_EQ(half_to_float(0xC000), -2.0f);
  EXPECT_EQ(half_to_float(0x3555), 0.333251953125f);
  EXPECT_EQ(half_to_float(0x7BFF), 65504.0f);                       // largest finite
  EXPECT_EQ(half_to_float(0x0400), std::ldexp(1.0f, -14));          // smallest normal
  EXPECT_EQ(half_to_float(0x0001), std::ldexp(1.0f, -24));          // smallest subnormal
  EXPECT_EQ(half_to_float(0x03FF), std::ldexp(1023.0f, -24));       // largest subnormal
  EXPECT_EQ(half_to_float(0x8001), -std::ldexp(1.0f, -24));         // negative subnormal
  EXPECT_EQ(half_to_float(0x0000), 0.0f);
  EXPECT_FALSE(std::signbit(half_to_float(0x0000)));
  EXPECT_TRUE(std::signbit(half_to_float(0x8000)));                 // -0 keeps its sign
  EXPECT_EQ(half_to_float(0x7C00), INFINITY);
  EXPECT_EQ(half_to_float(0xFC00), -INFINITY);
  EXPECT_TRUE(std::isnan(half_to_float(0x7E00)));
  EXPECT_TRUE(std::isnan(half_to_float(0x7C01)));                   // signalling payload stays NaN
  EXPECT_TRUE(std::isnan(half_to_float(0xFE00)));
}

TEST(DTypeConversion, HalfAllBitPatternsMatchDefinition) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const float f = half_to_float(static_cast<uint16_t>(b));
    const double ref = half_reference(static_cast<uint16_t>(b));
    if (std::isnan(ref)) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << b;
    } else {
      ASSERT_EQ(static_cast<double>(f), ref) << std::hex << b;
      ASSERT_EQ(std::signbit(f), (b & 0x8000) != 0) << std::hex << b;
    }
  }
}

TEST(DTypeConversion, BFloat16AllBitPatternsMatchDefinition) {
  EXPECT_EQ(bfloat16_to_float(0x3F80), 1.0f);
  EXPECT_EQ(bfloat16_to_float(0xC0A0), -5.0f);
  EXPECT_EQ(bfloat16_to_float(0x0001), std::ldexp(1.0f, -133));  // smallest subnormal
  EXPECT_EQ(bfloat16_to_float(0xFF80), -INFINITY);
  for (uint32_t b = 0; b < 65536; ++b) {
    const float f = bfloat16_to_float(static_cast<uint16_t>(b));
    const double ref = bf16_reference(static_cast<uint16_t>(b));
    if (std::isnan(ref)) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << b;
    } else {
      ASSERT_EQ(static_cast<double>(f), ref) << std::hex << b;
      ASSERT_EQ(std::signbit(f), (b & 0x8000) != 0) << std::hex << b;
    }
  }
}

// ---------------------------------------------------------------- synthetic files

class TempDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = testutil::fresh_dir(std::string(info->test_suite_name()) + "_" + info->name());
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }
  std::string dir_;
};

using SafetensorsTest = TempDirTest;

TEST_F(SafetensorsTest, ReadsEveryDTypeExactlyAtAnyAlignment) {
  // Values with subnormal, negative and large halves, all exact in F16; BF16 values exact too.
  const std::vector<uint16_t> half_bits = {0x3C00, 0xC000, 0x0001, 0x83FF, 0x7BFF, 0x8000};
  std::string half_bytes;
  for (uint16_t b : half_bits) testutil::put_u16(half_bytes, b);
  const std::vector<float> bf_vals = {1.0f, -3.5f, 0.0078125f, 65536.0f};
  const std::vector<float> f32_vals = {0.1f, -7.25f, 3e-40f /* subnormal float */, 1e30f, 2.0f, -0.0f};
  const std::vector<RawTensor> tensors = {
      {"a.half", "F16", {2, 3}, half_bytes},
      {"b.bf16", "BF16", {4}, testutil::encode(bf_vals, "BF16")},
      {"c.f32", "F32", {3, 2}, testutil::encode(f32_vals, "F32")},
      {"d.empty", "F32", {0, 5}, ""},
  };
  for (bool pad : {true, false}) {
    const std::string img = testutil::safetensors_image(tensors, Json{{"format", "pt"}, {"note", "x"}}, pad);
    testutil::write_bytes(path("t.safetensors"), img);
    const SafetensorsFile f = SafetensorsFile::open(path("t.safetensors"));
    EXPECT_EQ(f.file_size(), img.size());
    EXPECT_EQ(f.names(), (std::vector<std::string>{"a.half", "b.bf16", "c.f32", "d.empty"})) << "file order: by offset";
    EXPECT_EQ(f.metadata().at("format"), "pt");
    EXPECT_EQ(f.metadata().at("note"), "x");
    EXPECT_TRUE(f.contains("b.bf16"));
    EXPECT_FALSE(f.contains("zzz"));

    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(img[i]);
    const TensorInfo& ci = f.info("c.f32");
    EXPECT_EQ(ci.dtype, DType::F32);
    EXPECT_EQ(ci.shape, (std::vector<int64_t>{3, 2}));
    EXPECT_EQ(ci.offset, 8 + n + 12 + 8);
    EXPECT_EQ(ci.nbytes, 24u);
    EXPECT_EQ(f.info("a.half").dtype, DType::F16);
    EXPECT_EQ(f.info("b.bf16").dtype, DType::BF16);

    const Matrix a = f.read_matrix("a.half");
    ASSERT_EQ(a.rows(), 2);
    ASSERT_EQ(a.cols(), 3);
    for (int k = 0; k < 6; ++k) EXPECT_EQ(static_cast<double>(a(k / 3, k % 3)), half_reference(half_bits[k]));
    EXPECT_TRUE(std::signbit(a(1, 2)));
    const Vector b = f.read_vector("b.bf16");
    for (int k = 0; k < 4; ++k) EXPECT_EQ(b(k), bf_vals[k]);
    const Matrix c = f.read_matrix("c.f32");
    for (int k = 0; k < 6; ++k) EXPECT_EQ(c(k / 2, k % 2), f32_vals[k]);
    EXPECT_EQ(f.read_matrix("d.empty").rows(), 0);
    expect_error<ShapeError>([&] { f.read_vector("a.half"); }, {"t.safetensors", "a.half", "[2, 3]"});
    expect_error<ShapeError>([&] { f.read_matrix("b.bf16"); }, {"t.safetensors", "b.bf16", "[4]"});
    expect_error<IoError>([&] { f.info("nope"); }, {"t.safetensors", "nope"});
  }
}

TEST_F(SafetensorsTest, NonFiniteElementNamesTensorAndByteOffset) {
  std::string half_bytes;
  for (uint16_t b : {0x3C00, 0x4000, 0x7C00, 0x3C00}) testutil::put_u16(half_bytes, static_cast<uint16_t>(b));
  const std::vector<RawTensor> tensors = {{"ok", "F32", {2}, testutil::encode({1.0f, 2.0f}, "F32")},
                                          {"w.inf", "F16", {4}, half_bytes},
                                          {"w.nan", "F32", {1, 3}, testutil::encode({0.f, 1.f, NAN}, "F32")},
                                          {"b.nan", "BF16", {2}, std::string("\x80\x3f\xc0\x7f", 4)}};
  testutil::write_bytes(path("bad.safetensors"), testutil::safetensors_image(tensors));
  const SafetensorsFile f = SafetensorsFile::open(path("bad.safetensors"));
  const uint64_t inf_at = f.info("w.inf").offset + 2 * 2;
  const uint64_t nan_at = f.info("w.nan").offset + 2 * 4;
  const uint64_t bnan_at = f.info("b.nan").offset + 1 * 2;
  expect_error<NumericError>([&] { f.read_vector("w.inf"); },
                             {"bad.safetensors", "'w.inf'", "element 2", "Inf", "byte " + std::to_string(inf_at)});
  expect_error<NumericError>([&] { f.read_matrix("w.nan"); },
                             {"bad.safetensors", "'w.nan'", "element 2", "NaN", "byte " + std::to_string(nan_at)});
  expect_error<NumericError>([&] { f.read_vector("b.nan"); },
                             {"bad.safetensors", "'b.nan'", "element 1", "NaN", "byte " + std::to_string(bnan_at)});
  EXPECT_EQ(f.read_vector("ok")(1), 2.0f);
}

TEST_F(SafetensorsTest, MissingFileAndTooShort) {
  expect_error<IoError>([&] { SafetensorsFile::open(path("absent.safetensors")); },
                        {"absent.safetensors", "cannot open"});
  testutil::write_bytes(path("short.safetensors"), std::string("\x10\x00\x00", 3));
  expect_error<IoError>([&] { SafetensorsFile::open(path("short.safetensors")); },
                        {"short.safetensors", "truncated", "3 bytes"});
}

TEST_F(SafetensorsTest, HeaderLengthPastEndOfFile) {
  std::string img = testutil::frame("{}", "");
  const uint64_t n = 1000000;
  for (int i = 0; i < 8; ++i) img[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  testutil::write_bytes(path("h.safetensors"), img);
  expect_error<IoError>([&] { SafetensorsFile::open(path("h.safetensors")); },
                        {"h.safetensors", "header length 1000000", "bytes 0-7", std::to_string(img.size()) + " bytes"});
}

TEST_F(SafetensorsTest, MalformedHeaderJsonReportsFileByteOffset) {
  const std::string header = "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], ,}}";
  const size_t comma = header.find(", ,") + 2;  // the offending second comma
  testutil::write_bytes(path("j.safetensors"), testutil::frame(header, "abcd"));
  expect_error<IoError>([&] { SafetensorsFile::open(path("j.safetensors")); },
                        {"j.safetensors", "not valid JSON", "at byte " + std::to_string(8 + comma)});
  testutil::write_bytes(path("arr.safetensors"), testutil::frame("[1, 2]", ""));
  expect_error<IoError>([&] { SafetensorsFile::open(path("arr.safetensors")); }, {"arr.safetensors", "not a JSON object"});
}

TEST_F(SafetensorsTest, TruncatedDataSection) {
  const std::vector<RawTensor> tensors = {testutil::make_tensor("first", {4, 4}, "F32"),
                                          testutil::make_tensor("last", {8}, "F32")};
  std::string img = testutil::safetensors_image(tensors);
  img.resize(img.size() - 10);
  testutil::write_bytes(path("trunc.safetensors"), img);
  expect_error<IoError>([&] { SafetensorsFile::open(path("trunc.safetensors")); },
                        {"trunc.safetensors", "'last'", "data_offsets [64, 96)", "truncated",
                         "the file has " + std::to_string(img.size()) + " bytes"});
}

TEST_F(SafetensorsTest, HeaderThatLiesAboutOffsets) {
  auto write_with = [&](const std::string& file, const Json& header, const std::string& data) {
    testutil::write_bytes(path(file), testutil::frame(header.dump(), data));
  };
  const std::string data(64, '\0');
  // Past the data section (file not truncated: the header is wrong).
  write_with("past.safetensors", Json{{"w", {{"dtype", "F32"}, {"shape", {20}}, {"data_offsets", {0, 80}}}}}, data);
  expect_error<IoError>([&] { SafetensorsFile::open(path("past.safetensors")); },
                        {"past.safetensors", "'w'", "data_offsets [0, 80)", "past the end of the data section"});
  // Size that disagrees with the shape.
  write_with("size.safetensors", Json{{"w", {{"dtype", "F32"}, {"shape", {2, 3}}, {"data_offsets", {0, 20}}}}}, data);
  expect_error<IoError>([&] { SafetensorsFile::open(path("size.safetensors")); },
                        {"size.safetensors", "'w'", "data_offsets [0, 20)", "20 bytes", "[2, 3]", "needs 24"});
  // End before begin.
  write_with("rev.safetensors", Json{{"w", {{"dtype", "F32"}, {"shape", {0}}, {"data_offsets", {8, 4}}}}}, data);
  expect_error<IoError>([&] { SafetensorsFile::open(path("rev.safetensors")); },
                        {"rev.safetensors", "'w'", "[8, 4)", "end before begin"});
  // Overlap.
  write_with("ovl.safetensors",
             Json{{"a", {{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {0, 16}}}},
                  {"b", {{"dtype", "F16"}, {"shape", {8}}, {"data_offsets", {8, 24}}}}},
             data);
  expect_error<IoError>([&] { SafetensorsFile::open(path("ovl.safetensors")); },
                        {"ovl.safetensors", "'a'", "'b'", "overlap"});
  // A tensor nested inside another.
  write_with("nest.safetensors",
             Json{{"a", {{"dtype", "F32"}, {"shape", {16}}, {"data_offsets", {0, 64}}}},
                  {"b", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {8, 16}}}},
                  {"c", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {40, 48}}}}},
             data);
  expect_error<IoError>([&] { SafetensorsFile::open(path("nest.safetensors")); },
                        {"nest.safetensors", "'a'", "'b'", "overlap"});
  // Duplicate tensor names.
  testutil::write_bytes(path("dup.safetensors"),
                        testutil::frame("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                                        "\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                                        data));
  expect_error<IoError>([&] { SafetensorsFile::open(path("dup.safetensors")); }, {"dup.safetensors", "'w'", "twice"});
  // Gaps are allowed: they carry no tensor.
  write_with("gap.safetensors",
             Json{{"a", {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {0, 4}}}},
                  {"b", {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {16, 20}}}}},
             data);
  EXPECT_NO_THROW(SafetensorsFile::open(path("gap.safetensors")));
}

TEST_F(SafetensorsTest, BadFieldsAndUnsupportedDType) {
  const std::string data(16, '\0');
  auto open_with = [&](const Json& entry) {
    testutil::write_bytes(path("f.safetensors"), testutil::frame(Json{{"t.x", entry}}.dump(), data));
    return SafetensorsFile::open(path("f.safetensors"));
  };
  expect_error<IoError>([&] { open_with({{"dtype", "F64"}, {"shape", {2}}, {"data_offsets", {0, 16}}}); },
                        {"f.safetensors", "'t.x'", "dtype", "'F64'", "F32, F16, BF16"});
  expect_error<IoError>([&] { open_with({{"dtype", "I8"}, {"shape", {2}}, {"data_offsets", {0, 2}}}); },
                        {"f.safetensors", "'t.x'", "'I8'"});
  expect_error<IoError>([&] { open_with({{"dtype", "F32"}, {"shape", {-2}}, {"data_offsets", {0, 8}}}); },
                        {"f.safetensors", "'t.x'", "'shape'"});
  expect_error<IoError>([&] { open_with({{"dtype", "F32"}, {"shape", "2"}, {"data_offsets", {0, 8}}}); },
                        {"f.safetensors", "'t.x'", "'shape'"});
  expect_error<IoError>([&] { open_with({{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0}}}); },
                        {"f.safetensors", "'t.x'", "'data_offsets'"});
  expect_error<IoError>([&] { open_with({{"dtype", "F32"}, {"shape", {2}}}); },
                        {"f.safetensors", "'t.x'", "'data_offsets'"});
  expect_error<IoError>([&] { open_with({{"shape", {2}}, {"data_offsets", {0, 8}}}); },
                        {"f.safetensors", "'t.x'", "'dtype'"});
  expect_error<IoError>(
      [&] { open_with({{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 8}}, {"layout", "nchw"}}); },
      {"f.safetensors", "'t.x'", "'layout'"});
  expect_error<IoError>([&] { open_with(Json(3)); }, {"f.safetensors", "'t.x'", "not an object"});
  testutil::write_bytes(path("m.safetensors"), testutil::frame(Json{{"__metadata__", {{"n", 3}}}}.dump(), ""));
  expect_error<IoError>([&] { SafetensorsFile::open(path("m.safetensors")); },
                        {"m.safetensors", "__metadata__.n", "not a string"});
}

// ---------------------------------------------------------------- checkpoints

using CheckpointTest = TempDirTest;

// Expected float values of a tensor written by the test writer (F32/F16/BF16 all exact).
Matrix pattern_matrix(const std::string& name, Index r, Index c) {
  const std::vector<float> v = testutil::pattern_values(name, r * c);
  Matrix m(r, c);
  std::memcpy(m.data(), v.data(), v.size() * sizeof(float));
  return m;
}
Vector pattern_vector(const std::string& name, Index n) {
  const std::vector<float> v = testutil::pattern_values(name, n);
  return Eigen::Map<const Vector>(v.data(), n);
}

void expect_same_weights(const ModelWeights& a, const ModelWeights& b) {
  ASSERT_EQ(a.blocks.size(), b.blocks.size());
  EXPECT_EQ(a.embed, b.embed);
  EXPECT_EQ(a.final_norm, b.final_norm);
  EXPECT_EQ(a.lm_head, b.lm_head);
  for (size_t i = 0; i < a.blocks.size(); ++i) {
    EXPECT_EQ(a.blocks[i].input_norm, b.blocks[i].input_norm);
    EXPECT_EQ(a.blocks[i].post_attn_norm, b.blocks[i].post_attn_norm);
    for (int k = 0; k < kLinearKinds; ++k) {
      const auto kind = static_cast<LinearKind>(k);
      EXPECT_EQ(a.blocks[i].linear(kind).W, b.blocks[i].linear(kind).W) << linear_name(int(i), kind);
      EXPECT_EQ(a.blocks[i].linear(kind).b, b.blocks[i].linear(kind).b) << linear_name(int(i), kind);
    }
  }
}

TEST_F(CheckpointTest, TinyLlamaLoadsEveryTensorWhereItBelongs) {
  const Json cfg = testutil::tiny_config();
  testutil::write_checkpoint(dir_, cfg, testutil::tiny_model_tensors(cfg));
  const ModelWeights w = load_checkpoint(dir_);
  EXPECT_EQ(w.config.architecture, "LlamaForCausalLM");
  EXPECT_EQ(w.config.head_dim, 4);
  EXPECT_FALSE(w.config.attention_bias);
  ASSERT_EQ(w.blocks.size(), 2u);
  EXPECT_EQ(w.embed, pattern_matrix("model.embed_tokens.weight", 16, 8));
  EXPECT_EQ(w.lm_head, pattern_matrix("lm_head.weight", 16, 8));
  EXPECT_EQ(w.final_norm, pattern_vector("model.norm.weight", 8));
  for (int l = 0; l < 2; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const DecoderBlock& b = w.blocks[l];
    EXPECT_EQ(b.input_norm, pattern_vector(p + "input_layernorm.weight", 8));
    EXPECT_EQ(b.post_attn_norm, pattern_vector(p + "post_attention_layernorm.weight", 8));
    EXPECT_EQ(b.q.W, pattern_matrix(p + "self_attn.q_proj.weight", 8, 8));
    EXPECT_EQ(b.k.W, pattern_matrix(p + "self_attn.k_proj.weight", 4, 8));
    EXPECT_EQ(b.v.W, pattern_matrix(p + "self_attn.v_proj.weight", 4, 8));
    EXPECT_EQ(b.o.W, pattern_matrix(p + "self_attn.o_proj.weight", 8, 8));
    EXPECT_EQ(b.gate.W, pattern_matrix(p + "mlp.gate_proj.weight", 12, 8));
    EXPECT_EQ(b.up.W, pattern_matrix(p + "mlp.up_proj.weight", 12, 8));
    EXPECT_EQ(b.down.W, pattern_matrix(p + "mlp.down_proj.weight", 8, 12));
    for (int k = 0; k < kLinearKinds; ++k) EXPECT_EQ(b.linear(static_cast<LinearKind>(k)).b.size(), 0);
  }
  // expected_tensors agrees with what the independent writer produced.
  std::set<std::string> written, expected;
  for (const RawTensor& t : testutil::tiny_model_tensors(cfg)) written.insert(t.name);
  for (const ExpectedTensor& t : expected_tensors(w.config)) expected.insert(t.name);
  EXPECT_EQ(written, expected);
}

TEST_F(CheckpointTest, HalfAndBFloat16CheckpointsEqualTheF32One) {
  const Json cfg = testutil::tiny_config();
  testutil::write_checkpoint(dir_ + "/f32", cfg, testutil::tiny_model_tensors(cfg, "F32"));
  testutil::write_checkpoint(dir_ + "/f16", cfg, testutil::tiny_model_tensors(cfg, "F16"));
  testutil::write_checkpoint(dir_ + "/bf16", cfg, testutil::tiny_model_tensors(cfg, "BF16"));
  // Mixed dtypes in one file, as in checkpoints that keep norms in F32.
  std::vector<RawTensor> mixed = testutil::tiny_model_tensors(cfg, "BF16");
  for (RawTensor& t : mixed)
    if (t.name.find("norm") != std::string::npos) t = testutil::make_tensor(t.name, t.shape, "F32");
  testutil::write_checkpoint(dir_ + "/mixed", cfg, mixed);
  const ModelWeights ref = load_checkpoint(dir_ + "/f32");
  expect_same_weights(ref, load_checkpoint(dir_ + "/f16"));
  expect_same_weights(ref, load_checkpoint(dir_ + "/bf16"));
  expect_same_weights(ref, load_checkpoint(dir_ + "/mixed"));
}

TEST_F(CheckpointTest, ShardedCheckpointEqualsSingleFile) {
  const Json cfg = testutil::tiny_config();
  const auto tensors = testutil::tiny_model_tensors(cfg);
  testutil::write_checkpoint(dir_ + "/single", cfg, tensors);
  testutil::write_sharded_checkpoint(dir_ + "/sharded", cfg, tensors, 2);
  ASSERT_TRUE(fs::exists(dir_ + "/sharded/model-00002-of-00002.safetensors"));
  expect_same_weights(load_checkpoint(dir_ + "/single"), load_checkpoint(dir_ + "/sharded"));
  testutil::write_sharded_checkpoint(dir_ + "/three", cfg, tensors, 3);
  expect_same_weights(load_checkpoint(dir_ + "/single"), load_checkpoint(dir_ + "/three"));
}

TEST_F(CheckpointTest, ShardedIndexErrors) {
  const Json cfg = testutil::tiny_config();
  const auto tensors = testutil::tiny_model_tensors(cfg);
  testutil::write_sharded_checkpoint(dir_, cfg, tensors, 2);
  const std::string index = dir_ + "/model.safetensors.index.json";
  const Json good = Json::parse(std::ifstream(index));

  // A tensor the index lists but that is absent from the whole checkpoint: named with the index.
  std::vector<RawTensor> fewer;
  for (const RawTensor& t : tensors)
    if (t.name != "model.layers.1.mlp.up_proj.weight") fewer.push_back(t);
  testutil::write_sharded_checkpoint(dir_, cfg, fewer, 2);
  expect_error<IoError>([&] { load_checkpoint(dir_); },
                        {"model.safetensors.index.json", "'model.layers.1.mlp.up_proj.weight'", "missing", "[12, 8]"});

  // The index points a tensor at the wrong shard.
  testutil::write_sharded_checkpoint(dir_, cfg, tensors, 2);
  Json j = good;
  j["weight_map"]["model.norm.weight"] =
      good["weight_map"]["model.norm.weight"] == "model-00001-of-00002.safetensors" ? "model-00002-of-00002.safetensors"
                                                                                    : "model-00001-of-00002.safetensors";
  testutil::write_bytes(index, j.dump());
  expect_error<IoError>([&] { load_checkpoint(dir_); }, {"'model.norm.weight'", "model.safetensors.index.json", "shard"});

  // A shard file the index names but that does not exist.
  j = good;
  j["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors";
  testutil::write_bytes(index, j.dump());
  expect_error<IoError>([&] { load_checkpoint(dir_); }, {"model-00009-of-00009.safetensors", "not found", "index.json"});

  // A stored tensor the index does not list.
  j = good;
  j["weight_map"].erase("model.norm.weight");
  testutil::write_bytes(index, j.dump());
  expect_error<IoError>([&] { load_checkpoint(dir_); }, {"'model.norm.weight'", "not listed", "index.json"});

  // Escaping the directory, and a malformed index.
  j = good;
  j["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors";
  testutil::write_bytes(index, j.dump());
  expect_error<IoError>([&] { load_checkpoint(dir_); }, {"index.json", "weight_map.model.norm.weight", "relative"});
  testutil::write_bytes(index, "{\"weight_map\": {\"a\": }");
  expect_error<IoError>([&] { load_checkpoint(dir_); }, {"index.json", "invalid JSON", "line 1"});

  // Both layouts at once are ambiguous.
  testutil::write_sharded_checkpoint(dir_, cfg, tensors, 2);
  testutil::write_bytes(dir_ + "/model.safetensors", testutil::safetensors_image(tensors));
  expect_error<IoError>([&] { load_checkpoint(dir_); }, {"model.safetensors", "model.safetensors.index.json", "both"});
}

TEST_F(CheckpointTest, Qwen2LoadsQkvBiases) {
  Json cfg = testutil::tiny_config("Qwen2ForCausalLM");
  cfg["max_window_layers"] = 2;
  cfg["use_sliding_window"] = false;
  cfg["sliding_window"] = 4;  // inactive while use_sliding_window is false
  testutil::write_checkpoint(dir_, cfg, testutil::tiny_model_tensors(cfg));
  const ModelWeights w = load_checkpoint(dir_);
  EXPECT_TRUE(w.config.attention_bias);
  EXPECT_EQ(w.config.max_position_embeddings, 64);
  for (int l = 0; l < 2; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".self_attn.";
    EXPECT_EQ(w.blocks[l].q.b, pattern_vector(p + "q_proj.bias", 8));
    EXPECT_EQ(w.blocks[l].k.b, pattern_vector(p + "k_proj.bias", 4));
    EXPECT_EQ(w.blocks[l].v.b, pattern_vector(p + "v_proj.bias", 4));
    EXPECT_EQ(w.blocks[l].o.b.size(), 0);
    EXPECT_EQ(w.blocks[l].gate.b.size(), 0);
  }
  EXPECT_NE(describe(w.config).find("q/k/v biases"), std::string::npos);

  // The same tensors without a bias: the missing one is named.
  std::vector<RawTensor> no_bias;
  for (const RawTensor& t : testutil::tiny_model_tensors(cfg))
    if (t.name != "model.layers.0.self_attn.k_proj.bias") no_bias.push_back(t);
  testutil::write_checkpoint(dir_, cfg, no_bias);
  expect_error<IoError>([&] { load_checkpoint(dir_); },
                        {"model.safetensors", "'model.layers.0.self_attn.k_proj.bias'", "[4]", "missing"});
}

TEST_F(CheckpointTest, LlamaAttentionBiasIncludesOutputProjection) {
  Json cfg = testutil::tiny_config();
  cfg["attention_bias"] = true;
  testutil::write_checkpoint(dir_, cfg, testutil::tiny_model_tensors(cfg));
  const ModelWeights w = load_checkpoint(dir_);
  EXPECT_TRUE(w.config.attention_bias);
  EXPECT_EQ(w.blocks[1].q.b, pattern_vector("model.layers.1.self_attn.q_proj.bias", 8));
  EXPECT_EQ(w.blocks[1].o.b, pattern_vector("model.layers.1.self_attn.o_proj.bias", 8));
}

TEST_F(CheckpointTest, TiedEmbeddings) {
  Json cfg = testutil::tiny_config();
  cfg["tie_word_embeddings"] = true;
  auto tensors = testutil::tiny_model_tensors(cfg);  // no lm_head.weight
  testutil::write_checkpoint(dir_, cfg, tensors);
  const ModelWeights w = load_checkpoint(dir_);
  EXPECT_TRUE(w.config.tie_word_embeddings);
  EXPECT_EQ(w.lm_head, w.embed);
  EXPECT_EQ(w.lm_head, pattern_matrix("model.embed_tokens.weight", 16, 8));

  // A stored copy equal to the embedding is accepted.
  RawTensor copy = tensors.front();
  copy.name = "lm_head.weight";
  tensors.push_back(copy);
  testutil::write_checkpoint(dir_, cfg, tensors);
  EXPECT_EQ(load_checkpoint(dir_).lm_head, w.embed);

  // A different one contradicts tie_word_embeddings.
  tensors.back() = testutil::make_tensor("lm_head.weight", {16, 8}, "F32");
  testutil::write_checkpoint(dir_, cfg, tensors);
  expect_error<IoError>([&] { load_checkpoint(dir_); },
                        {"model.safetensors", "'lm_head.weight'", "differs", "tie_word_embeddings"});
}

TEST_F(CheckpointTest, RopeBuffersAreSkippedOtherExtrasRejected) {
  const Json cfg = testutil::tiny_config();
  auto tensors = testutil::tiny_model_tensors(cfg);
  tensors.push_back(testutil::make_tensor("model.layers.0.self_attn.rotary_emb.inv_freq", {2}, "F32"));
  tensors.push_back(testutil::make_tensor("model.layers.1.self_attn.rotary_emb.inv_freq", {2}, "F32"));
  testutil::write_checkpoint(dir_, cfg, tensors);
  expect_same_weights(load_checkpoint(dir_), [&] {
    testutil::write_checkpoint(dir_ + "/plain", cfg, testutil::tiny_model_tensors(cfg));
    return load_checkpoint(dir_ + "/plain");
  }());

  tensors.push_back(testutil::make_tensor("model.layers.0.self_attn.q_norm.weight", {4}, "F32"));
  testutil::write_checkpoint(dir_, cfg, tensors);
  expect_error<IoError>([&] { load_checkpoint(dir_); },
                        {"model.safetensors", "unexpected tensor 'model.layers.0.self_attn.q_norm.weight'", "[4]"});

  // A bias the config does not enable; and a layer beyond num_hidden_layers.
  tensors = testutil::tiny_model_tensors(cfg);
  tensors.push_back(testutil::make_tensor("model.layers.1.self_attn.v_proj.bias", {4}, "F32"));
  testutil::write_checkpoint(dir_, cfg, tensors);
  expect_error<IoError>([&] { load_checkpoint(dir_); },
                        {"model.safetensors", "'model.layers.1.self_attn.v_proj.bias'", "no such bias"});
  tensors = testutil::tiny_model_tensors(cfg);
  tensors.push_back(testutil::make_tensor("model.layers.2.input_layernorm.weight", {8}, "F32"));
  testutil::write_checkpoint(dir_, cfg, tensors);
  expect_error<IoError>([&] { load_checkpoint(dir_); },
                        {"model.safetensors", "'model.layers.2.input_layernorm.weight'", "2 layers"});
}

TEST_F(CheckpointTest, MissingTensorNamesItAndTheFile) {
  const Json cfg = testutil::tiny_config();
  std::vector<RawTensor> tensors;
  for (const RawTensor& t : testutil::tiny_model_tensors(cfg))
    if (t.name != "model.layers.1.mlp.up_proj.weight" && t.name != "model.norm.weight") tensors.push_back(t);
  testutil::write_checkpoint(dir_, cfg, tensors);
  expect_error<IoError>([&] { load_checkpoint(dir_); },
                        {dir_ + "/model.safetensors", "'model.layers.1.mlp.up_proj.weight'", "[12, 8]", "missing",
                         "1 more missing: model.norm.weight"});
}

TEST_F(CheckpointTest, ShapeMismatchGivesExpectedAndFound) {
  const Json cfg = testutil::tiny_config();
  auto tensors = testutil::tiny_model_tensors(cfg);
  for (RawTensor& t : tensors)
    if (t.name == "model.layers.1.self_attn.k_proj.weight") t = testutil::make_tensor(t.name, {8, 8}, "F32");
  testutil::write_checkpoint(dir_, cfg, tensors);
  expect_error<IoError>([&] { load_checkpoint(dir_); },
                        {"model.safetensors", "'model.layers.1.self_attn.k_proj.weight'", "shape [8, 8]",
                         "expected [4, 8]", "config.json"});
  // A vocabulary that disagrees with config.json shows up on the embedding.
  Json big = cfg;
  big["vocab_size"] = 32;
  testutil::write_checkpoint(dir_, big, testutil::tiny_model_tensors(cfg));
  expect_error<IoError>([&] { load_checkpoint(dir_); },
                        {"'model.embed_tokens.weight'", "shape [16, 8]", "expected [32, 8]"});
}

TEST_F(CheckpointTest, NonFiniteWeightIsANumericErrorIndependentOfThreads) {
  const Json cfg = testutil::tiny_config();
  auto tensors = testutil::tiny_model_tensors(cfg);
  // Two broken tensors: the one earlier in model order is reported whatever the schedule.
  for (RawTensor& t : tensors) {
    if (t.name == "model.layers.0.mlp.down_proj.weight") {
      const float inf = INFINITY;
      std::memcpy(&t.bytes[4 * 5], &inf, 4);
    }
    if (t.name == "model.layers.1.self_attn.q_proj.weight") {
      const float nan = NAN;
      std::memcpy(&t.bytes[4 * 3], &nan, 4);
    }
  }
  testutil::write_checkpoint(dir_, cfg, tensors);
  const uint64_t at = SafetensorsFile::open(dir_ + "/model.safetensors").info("model.layers.0.mlp.down_proj.weight").offset + 20;
  const int saved = omp_get_max_threads();
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    expect_error<NumericError>([&] { load_checkpoint(dir_); },
                               {"model.safetensors", "'model.layers.0.mlp.down_proj.weight'", "element 5", "Inf",
                                "byte " + std::to_string(at)});
  }
  omp_set_num_threads(saved);
}

TEST_F(CheckpointTest, BrokenFilesInsideACheckpointNameTheFile) {
  const Json cfg = testutil::tiny_config();
  const auto tensors = testutil::tiny_model_tensors(cfg);
  testutil::write_checkpoint(dir_, cfg, tensors);
  const std::string st = dir_ + "/model.safetensors";
  std::string img = testutil::safetensors_image(tensors);
  testutil::write_bytes(st, img.substr(0, img.size() - 3));
  expect_error<IoError>([&] { load_checkpoint(dir_); }, {st, "'lm_head.weight'", "truncated"});

  std::vector<RawTensor> bad = tensors;
  bad[3].dtype = "F64";
  testutil::write_bytes(st, testutil::safetensors_image(bad));
  expect_error<IoError>([&] { load_checkpoint(dir_); }, {st, "'" + bad[3].name + "'", "'F64'"});

  fs::remove(st);
  expect_error<IoError>([&] { load_checkpoint(dir_); }, {dir_, "no model.safetensors"});
  testutil::write_bytes(dir_ + "/pytorch_model.bin", "x");
  expect_error<IoError>([&] { load_checkpoint(dir_); }, {"pytorch_model.bin", "not supported"});
}

TEST_F(CheckpointTest, MissingOrMalformedConfig) {
  const Json cfg = testutil::tiny_config();
  std::filesystem::create_directories(dir_);
  testutil::write_bytes(dir_ + "/model.safetensors", testutil::safetensors_image(testutil::tiny_model_tensors(cfg)));
  expect_error<IoError>([&] { load_checkpoint(dir_); }, {dir_ + "/config.json", "not found"});
  testutil::write_bytes(dir_ + "/config.json", "{\n  \"hidden_size\": 8,\n  \"vocab_size\" 16\n}");
  expect_error<IoError>([&] { load_checkpoint(dir_); }, {"config.json", "invalid JSON", "line 3"});
  expect_error<IoError>([&] { load_checkpoint(dir_ + "/nope"); }, {dir_ + "/nope", "not found"});
  // No tokenizer file is needed to load weights.
  testutil::write_config(dir_, cfg);
  EXPECT_FALSE(fs::exists(dir_ + "/tokenizer.model"));
  EXPECT_NO_THROW(load_checkpoint(dir_));
}

// ---------------------------------------------------------------- config.json

class ModelConfigJson : public TempDirTest {
 protected:
  ModelConfig load(const Json& cfg) {
    testutil::write_config(dir_, cfg);
    return load_model_config(dir_ + "/config.json");
  }
  void expect_config_error(const Json& cfg, const std::vector<std::string>& parts) {
    testutil::write_config(dir_, cfg);
    std::vector<std::string> all = parts;
    all.push_back(dir_ + "/config.json");
    expect_error<ConfigError>([&] { load_model_config(dir_ + "/config.json"); }, all);
  }
};

TEST_F(ModelConfigJson, DefaultsFollowTransformers) {
  const Json cfg = {{"architectures", {"MistralForCausalLM"}}, {"hidden_size", 64}, {"intermediate_size", 128},
                    {"num_hidden_layers", 3}, {"num_attention_heads", 4}, {"vocab_size", 100}};
  const ModelConfig c = load(cfg);
  EXPECT_EQ(c.architecture, "MistralForCausalLM");
  EXPECT_EQ(c.num_kv_heads, 4);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_EQ(c.rope.theta, 10000.0);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_EQ(c.max_position_embeddings, 131072);
  EXPECT_EQ(c.bos_token_id, -1);
  EXPECT_EQ(c.eos_token_id, -1);

  Json more = cfg;
  more["architectures"] = {"LlamaForCausalLM"};
  more["head_dim"] = 32;  // explicit head_dim need not equal hidden/heads
  more["num_key_value_heads"] = nullptr;
  more["rope_theta"] = 500000;  // an integer is a number too
  more["eos_token_id"] = {7, 9};
  more["bos_token_id"] = 3;
  more["rope_scaling"] = nullptr;
  more["sliding_window"] = 16;  // not a Llama option: ignored as transformers does
  const ModelConfig d = load(more);
  EXPECT_EQ(d.head_dim, 32);
  EXPECT_EQ(d.num_kv_heads, 4);
  EXPECT_EQ(d.rope.theta, 500000.0);
  EXPECT_EQ(d.eos_token_id, 7);
  EXPECT_EQ(d.bos_token_id, 3);
  EXPECT_EQ(d.max_position_embeddings, 2048);

  // transformers 5 spelling of the RoPE base.
  more.erase("rope_theta");
  more["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 1e6}};
  EXPECT_EQ(load(more).rope.theta, 1e6);
  more["rope_parameters"]["rope_type"] = "yarn";
  expect_config_error(more, {"rope_parameters.rope_type", "yarn"});

  // A Mistral window as long as the context never binds.
  Json mistral = cfg;
  mistral["sliding_window"] = 4096;
  mistral["max_position_embeddings"] = 4096;
  EXPECT_EQ(load(mistral).max_position_embeddings, 4096);
}

TEST_F(ModelConfigJson, UnsupportedArchitectureListsTheSupportedOnes) {
  Json cfg = testutil::tiny_config();
  cfg["architectures"] = {"GPT2LMHeadModel"};
  expect_config_error(cfg, {"'architectures'", "GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM",
                            "Qwen2ForCausalLM"});
  cfg.erase("architectures");
  expect_config_error(cfg, {"'architectures'", "missing", "LlamaForCausalLM"});
  cfg["architectures"] = "LlamaForCausalLM";
  expect_config_error(cfg, {"'architectures'", "list"});
  cfg = testutil::tiny_config();
  cfg["model_type"] = "gemma";
  expect_config_error(cfg, {"'model_type'", "gemma", "llama"});
}

TEST_F(ModelConfigJson, RequiredFieldsTypesAndDivisibility) {
  for (const char* key : {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"}) {
    Json cfg = testutil::tiny_config();
    cfg.erase(key);
    expect_config_error(cfg, {std::string("'") + key + "'", "missing"});
    cfg[key] = "8";
    expect_config_error(cfg, {std::string("'") + key + "'", "integer", "string"});
    cfg[key] = 0;
    expect_config_error(cfg, {std::string("'") + key + "'", "found 0"});
  }
  Json cfg = testutil::tiny_config();
  cfg["hidden_size"] = 8.5;
  expect_config_error(cfg, {"'hidden_size'", "integer", "8.5"});
  cfg = testutil::tiny_config();
  cfg["num_key_value_heads"] = 3;
  expect_config_error(cfg, {"'num_key_value_heads'", "3", "does not divide", "2"});
  cfg = testutil::tiny_config();
  cfg["hidden_size"] = 9;
  expect_config_error(cfg, {"'num_attention_heads'", "does not divide hidden_size 9"});
  cfg = testutil::tiny_config();
  cfg["head_dim"] = 5;
  expect_config_error(cfg, {"'head_dim'", "odd"});
  cfg = testutil::tiny_config();
  cfg["rms_norm_eps"] = "1e-5";
  expect_config_error(cfg, {"'rms_norm_eps'", "number"});
  cfg = testutil::tiny_config();
  cfg["rope_theta"] = -1;
  expect_config_error(cfg, {"'rope_theta'", "positive"});
  cfg = testutil::tiny_config();
  cfg["tie_word_embeddings"] = 1;
  expect_config_error(cfg, {"'tie_word_embeddings'", "true or false"});
  cfg = testutil::tiny_config();
  cfg["eos_token_id"] = "</s>";
  expect_config_error(cfg, {"'eos_token_id'"});
  testutil::write_bytes(dir_ + "/config.json", "[1, 2]");
  expect_error<IoError>([&] { load_model_config(dir_ + "/config.json"); }, {"config.json", "JSON object"});
}

// rope_scaling as transformers writes it (rope_type, or the older "type"; also inside
// transformers 5's rope_parameters), with every missing or bad factor named by its key path.
TEST_F(ModelConfigJson, RopeScaling) {
  Json cfg = testutil::tiny_config();
  cfg["rope_theta"] = 500000.0;
  cfg["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0},
                         {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 8192}};
  const ModelConfig c = load(cfg);
  EXPECT_EQ(c.rope.scaling, RopeSpec::Scaling::Llama3);
  EXPECT_EQ(c.rope.theta, 500000.0);
  EXPECT_EQ(c.rope.factor, 8.0);
  EXPECT_EQ(c.rope.original_max_position, 8192);
  cfg["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  EXPECT_EQ(load(cfg).rope.scaling, RopeSpec::Scaling::Linear);
  cfg["rope_scaling"] = {{"type", "dynamic"}, {"factor", 2.0}};
  const ModelConfig d = load(cfg);
  EXPECT_EQ(d.rope.scaling, RopeSpec::Scaling::Dynamic);
  EXPECT_EQ(d.rope.original_max_position, d.max_position_embeddings);
  cfg.erase("rope_scaling");
  cfg["rope_parameters"] = {{"rope_type", "linear"}, {"factor", 4.0}, {"rope_theta", 1e6}};
  EXPECT_EQ(load(cfg).rope.factor, 4.0);
  EXPECT_EQ(load(cfg).rope.theta, 1e6);
  cfg.erase("rope_parameters");
  cfg["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0}};
  expect_config_error(cfg, {"'rope_scaling.original_max_position_embeddings'", "missing"});
  cfg["rope_scaling"] = {{"rope_type", "linear"}, {"factor", -2.0}};
  expect_config_error(cfg, {"'rope_scaling.factor'", "positive"});
  cfg["rope_scaling"] = {{"rope_type", "linear"}};
  expect_config_error(cfg, {"'rope_scaling.factor'", "missing"});
}

TEST_F(ModelConfigJson, UnimplementedFeaturesAreRejectedByName) {
  Json cfg = testutil::tiny_config();
  cfg["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  expect_config_error(cfg, {"'rope_scaling.rope_type'", "yarn", "llama3"});
  cfg["rope_scaling"] = {{"type", "longrope"}};
  expect_config_error(cfg, {"'rope_scaling.type'", "longrope"});
  cfg = testutil::tiny_config();
  cfg["hidden_act"] = "gelu";
  expect_config_error(cfg, {"'hidden_act'", "gelu", "silu"});
  cfg = testutil::tiny_config("MistralForCausalLM");
  cfg["sliding_window"] = 16;
  expect_config_error(cfg, {"'sliding_window'", "16", "max_position_embeddings 64"});
  cfg = testutil::tiny_config("Qwen2ForCausalLM");
  cfg["use_sliding_window"] = true;
  cfg["sliding_window"] = 32;
  expect_config_error(cfg, {"'use_sliding_window'", "32"});
  cfg = testutil::tiny_config("MistralForCausalLM");
  cfg["attention_bias"] = true;
  expect_config_error(cfg, {"'attention_bias'", "Mistral"});
  cfg = testutil::tiny_config();
  cfg["mlp_bias"] = true;
  expect_config_error(cfg, {"'mlp_bias'"});
  cfg = testutil::tiny_config();
  cfg["quantization_config"] = {{"quant_method", "gptq"}};
  expect_config_error(cfg, {"'quantization_config'", "already quantized"});
}

// ---------------------------------------------------------------- the real shared model

std::string shared_model_dir() { return std::string(QL_SHARED_DATA_DIR) + "/austen-llama-7m"; }

TEST(RealCheckpoint, AustenLlamaLoadsWithTheDocumentedShapesAndBytes) {
  const std::string dir = shared_model_dir();
  if (!fs::exists(dir + "/model.safetensors")) GTEST_SKIP() << "../shared/data not found at " << dir;
  const ModelWeights w = load_checkpoint(dir);
  const ModelConfig& c = w.config;
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
  EXPECT_EQ(c.num_layers, 6);
  EXPECT_EQ(c.hidden_size, 256);
  EXPECT_EQ(c.num_heads, 8);
  EXPECT_EQ(c.num_kv_heads, 4);
  EXPECT_EQ(c.head_dim, 32);
  EXPECT_EQ(c.intermediate_size, 768);
  EXPECT_EQ(c.vocab_size, 4096);
  EXPECT_EQ(c.max_position_embeddings, 1024);
  EXPECT_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_EQ(c.rope.theta, 10000.0);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_id, 2);
  EXPECT_EQ(describe(c),
            "LlamaForCausalLM: 6 layers, hidden 256, 8 heads / 4 kv heads x head_dim 32, mlp 768, vocab 4096, "
            "max_pos 1024, rope_theta 10000, rms_eps 1e-05, untied lm_head, no attention bias");

  ASSERT_EQ(w.blocks.size(), 6u);
  EXPECT_EQ(w.embed.rows(), 4096);
  EXPECT_EQ(w.embed.cols(), 256);
  EXPECT_EQ(w.lm_head.rows(), 4096);
  EXPECT_EQ(w.final_norm.size(), 256);
  for (const DecoderBlock& b : w.blocks) {
    EXPECT_EQ(b.q.W.rows(), 256);
    EXPECT_EQ(b.k.W.rows(), 128);
    EXPECT_EQ(b.v.W.rows(), 128);
    EXPECT_EQ(b.o.W.cols(), 256);
    EXPECT_EQ(b.gate.W.rows(), 768);
    EXPECT_EQ(b.up.W.rows(), 768);
    EXPECT_EQ(b.down.W.rows(), 256);
    EXPECT_EQ(b.down.W.cols(), 768);
    EXPECT_EQ(b.input_norm.size(), 256);
    EXPECT_EQ(b.q.b.size(), 0);
  }
  EXPECT_NE(w.lm_head, w.embed);

  // Spot checks against the raw file: header parsed here independently of the loader.
  std::ifstream in(dir + "/model.safetensors", std::ios::binary);
  unsigned char len[8];
  in.read(reinterpret_cast<char*>(len), 8);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len[i];
  std::string header(n, '\0');
  in.read(&header[0], static_cast<std::streamsize>(n));
  const Json h = Json::parse(header);
  auto raw = [&](const std::string& name, int64_t flat) {
    EXPECT_EQ(h[name]["dtype"], "F32");
    in.seekg(static_cast<std::streamoff>(8 + n + h[name]["data_offsets"][0].get<uint64_t>() + 4 * flat));
    float f;
    in.read(reinterpret_cast<char*>(&f), 4);
    return f;
  };
  const struct { const char* name; const Matrix* m; } mats[] = {
      {"model.embed_tokens.weight", &w.embed},
      {"lm_head.weight", &w.lm_head},
      {"model.layers.0.self_attn.q_proj.weight", &w.blocks[0].q.W},
      {"model.layers.3.self_attn.k_proj.weight", &w.blocks[3].k.W},
      {"model.layers.5.mlp.down_proj.weight", &w.blocks[5].down.W},
  };
  for (const auto& m : mats) {
    const Index rows = m.m->rows(), cols = m.m->cols();
    for (Index r : {Index(0), rows / 3, rows - 1})
      for (Index col : {Index(0), cols / 2 + 1, cols - 1})
        EXPECT_EQ((*m.m)(r, col), raw(m.name, r * cols + col)) << m.name << " [" << r << ", " << col << "]";
  }
  EXPECT_EQ(w.final_norm(17), raw("model.norm.weight", 17));
  EXPECT_EQ(w.blocks[2].post_attn_norm(255), raw("model.layers.2.post_attention_layernorm.weight", 255));
}

TEST(RealCheckpoint, LoadIsIndependentOfThreadCount) {
  const std::string dir = shared_model_dir();
  if (!fs::exists(dir + "/model.safetensors")) GTEST_SKIP() << "../shared/data not found at " << dir;
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const ModelWeights a = load_checkpoint(dir);
  omp_set_num_threads(2);
  const ModelWeights b = load_checkpoint(dir);
  omp_set_num_threads(saved);
  expect_same_weights(a, b);
}

}  // namespace
}  // namespace ql
