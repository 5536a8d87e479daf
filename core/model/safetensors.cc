#include "core/model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>
#include <unordered_map>

#include "core/error.h"

// Tensor bytes are little-endian and are copied straight into float32 storage.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors reader assumes a little-endian host");

namespace ql {

const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
  }
  return "?";
}

int dtype_size(DType d) { return d == DType::F32 ? 4 : 2; }

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    // Zero or subnormal: value = mant * 2^-24, a normal float32 whenever mant != 0, and the
    // product is exact (mant has at most 10 significant bits).
    const float mag = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -mag : mag;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);  // Inf (mant == 0) or NaN with its payload
  } else {
    bits = sign | ((exp + (127 - 15)) << 23) | (mant << 13);  // rebias the exponent
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float bfloat16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

namespace {

using Json = nlohmann::json;

// Read-only private mapping of a whole file; unmapped on destruction.
struct Mapping {
  const unsigned char* data = nullptr;
  uint64_t size = 0;
  ~Mapping() {
    if (data) munmap(const_cast<unsigned char*>(data), size);
  }
};

std::string sys_error() { return std::strerror(errno); }

// Header length fields are 64-bit unsigned; JSON numbers may arrive as signed or unsigned.
bool json_to_u64(const Json& v, uint64_t& out) {
  if (v.is_number_unsigned()) {
    out = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer()) {
    const int64_t s = v.get<int64_t>();
    if (s < 0) return false;
    out = static_cast<uint64_t>(s);
    return true;
  }
  return false;
}

// The tail of nlohmann's parse_error text after "line L, column C: ".
std::string parse_error_reason(const Json::parse_error& e) {
  std::string w = e.what();
  const size_t col = w.find("column ");
  if (col != std::string::npos) {
    const size_t colon = w.find(": ", col);
    if (colon != std::string::npos) return w.substr(colon + 2);
  }
  return w;
}

}  // namespace

struct SafetensorsFile::Impl {
  std::string path;
  Mapping map;
  uint64_t data_start = 0;  // 8 + N
  std::unordered_map<std::string, TensorInfo> tensors;
  std::vector<std::string> order;  // file order
  std::map<std::string, std::string> metadata;

  [[noreturn]] void fail(const std::string& what) const { throw IoError(path + ": " + what); }
  [[noreturn]] void fail_tensor(const std::string& name, const std::string& what) const {
    throw IoError(path + ": tensor '" + name + "': " + what);
  }

  void map_file();
  void parse_header();
  void parse_entry(const std::string& name, const Json& e);
  void check_overlaps();
};

void SafetensorsFile::Impl::map_file() {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("cannot open: " + sys_error());
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const std::string err = sys_error();
    ::close(fd);
    fail("cannot stat: " + err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail("not a regular file");
  }
  map.size = static_cast<uint64_t>(st.st_size);
  if (map.size < 8) {
    ::close(fd);
    fail("truncated: the file has " + std::to_string(map.size) +
         " bytes, fewer than the 8-byte header length at byte 0");
  }
  void* p = mmap(nullptr, map.size, PROT_READ, MAP_PRIVATE, fd, 0);
  const std::string err = p == MAP_FAILED ? sys_error() : std::string();
  ::close(fd);  // the mapping keeps its own reference to the file
  if (p == MAP_FAILED) fail("mmap failed: " + err);
  map.data = static_cast<const unsigned char*>(p);
}

void SafetensorsFile::Impl::parse_header() {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | map.data[i];
  if (n > map.size - 8) {
    fail("header length " + std::to_string(n) + " (bytes 0-7) runs past the end of the file (" +
         std::to_string(map.size) + " bytes, so at most " + std::to_string(map.size - 8) +
         " header bytes): truncated file or not a safetensors file");
  }
  data_start = 8 + n;
  const char* begin = reinterpret_cast<const char*>(map.data + 8);
  const char* end = begin + n;

  // nlohmann keeps the last of duplicate keys; a repeated tensor name means two conflicting
  // descriptions, so it is rejected while parsing.
  std::set<std::string> seen;
  auto on_event = [&](int depth, Json::parse_event_t ev, Json& parsed) {
    if (ev == Json::parse_event_t::key && depth == 1) {
      const std::string key = parsed.get<std::string>();
      if (!seen.insert(key).second) fail_tensor(key, "appears twice in the header");
    }
    return true;
  };
  Json header;
  try {
    header = Json::parse(begin, end, on_event);
  } catch (const Json::parse_error& e) {
    // e.byte counts characters read, 1-based: the offending character is at e.byte - 1.
    const uint64_t at = e.byte > 0 ? e.byte - 1 : 0;
    fail("header is not valid JSON at byte " + std::to_string(8 + at) + " (header byte " +
         std::to_string(at) + "): " + parse_error_reason(e));
  }
  if (!header.is_object()) fail("header (bytes 8-" + std::to_string(data_start) + ") is not a JSON object");

  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it.value().is_object()) fail("field '__metadata__' is not an object");
      for (auto m = it.value().begin(); m != it.value().end(); ++m) {
        if (!m.value().is_string())
          fail("field '__metadata__." + m.key() + "' is not a string (found " + m.value().dump() + ")");
        metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    parse_entry(it.key(), it.value());
  }
  check_overlaps();
}

void SafetensorsFile::Impl::parse_entry(const std::string& name, const Json& e) {
  if (!e.is_object()) fail_tensor(name, "header entry is not an object (found " + e.dump() + ")");
  for (auto it = e.begin(); it != e.end(); ++it) {
    if (it.key() != "dtype" && it.key() != "shape" && it.key() != "data_offsets")
      fail_tensor(name, "unknown field '" + it.key() + "' (expected dtype, shape, data_offsets)");
  }
  TensorInfo t;
  t.name = name;

  if (!e.contains("dtype") || !e["dtype"].is_string()) fail_tensor(name, "field 'dtype' missing or not a string");
  const std::string dt = e["dtype"].get<std::string>();
  if (dt == "F32") t.dtype = DType::F32;
  else if (dt == "F16") t.dtype = DType::F16;
  else if (dt == "BF16") t.dtype = DType::BF16;
  else fail_tensor(name, "field 'dtype': unsupported dtype '" + dt + "' (supported: F32, F16, BF16)");

  if (!e.contains("shape") || !e["shape"].is_array()) fail_tensor(name, "field 'shape' missing or not an array");
  uint64_t numel = 1;
  for (const Json& d : e["shape"]) {
    uint64_t v;
    if (!json_to_u64(d, v) || v > static_cast<uint64_t>(INT64_MAX))
      fail_tensor(name, "field 'shape' has a non-integer or negative entry (" + e["shape"].dump() + ")");
    if (__builtin_mul_overflow(numel, v, &numel))
      fail_tensor(name, "field 'shape' " + e["shape"].dump() + " overflows 64 bits");
    t.shape.push_back(static_cast<int64_t>(v));
  }
  uint64_t expect_bytes;
  if (numel > static_cast<uint64_t>(INT64_MAX) ||
      __builtin_mul_overflow(numel, static_cast<uint64_t>(dtype_size(t.dtype)), &expect_bytes))
    fail_tensor(name, "field 'shape' " + e["shape"].dump() + " overflows 64 bits");

  if (!e.contains("data_offsets") || !e["data_offsets"].is_array() || e["data_offsets"].size() != 2)
    fail_tensor(name, "field 'data_offsets' missing or not a [begin, end] pair");
  uint64_t b, en;
  if (!json_to_u64(e["data_offsets"][0], b) || !json_to_u64(e["data_offsets"][1], en))
    fail_tensor(name, "field 'data_offsets' " + e["data_offsets"].dump() + " has a non-integer or negative entry");
  const std::string offs = "data_offsets [" + std::to_string(b) + ", " + std::to_string(en) + ")";
  const uint64_t data_size = map.size - data_start;
  if (en < b) fail_tensor(name, offs + ": end before begin");
  if (en > data_size) {
    fail_tensor(name, offs + " ends at file byte " + std::to_string(data_start + en) +
                          ", past the end of the data section (the file has " + std::to_string(map.size) +
                          " bytes): truncated file or header offsets wrong");
  }
  if (en - b != expect_bytes) {
    fail_tensor(name, offs + " span " + std::to_string(en - b) + " bytes but shape " + shape_str(t.shape) +
                          " of " + dt + " needs " + std::to_string(expect_bytes));
  }
  t.offset = data_start + b;
  t.nbytes = en - b;
  tensors.emplace(name, std::move(t));
}

void SafetensorsFile::Impl::check_overlaps() {
  order.reserve(tensors.size());
  for (const auto& kv : tensors) order.push_back(kv.first);
  std::sort(order.begin(), order.end(), [&](const std::string& a, const std::string& b) {
    const TensorInfo& x = tensors.at(a);
    const TensorInfo& y = tensors.at(b);
    return x.offset != y.offset ? x.offset < y.offset : a < b;
  });
  // Sorted by start, the first overlap (if any) is between a tensor and the non-empty one just
  // before it: until then every tensor ends before the next starts.
  const TensorInfo* prev = nullptr;
  for (const std::string& name : order) {
    const TensorInfo& t = tensors.at(name);
    if (t.nbytes == 0) continue;
    if (prev && t.offset < prev->offset + prev->nbytes) {
      fail("tensors '" + prev->name + "' (file bytes [" + std::to_string(prev->offset) + ", " +
           std::to_string(prev->offset + prev->nbytes) + ")) and '" + name + "' (file bytes [" +
           std::to_string(t.offset) + ", " + std::to_string(t.offset + t.nbytes) +
           ")) overlap in data_offsets");
    }
    prev = &t;
  }
}

SafetensorsFile::SafetensorsFile(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SafetensorsFile::SafetensorsFile(SafetensorsFile&&) noexcept = default;
SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&&) noexcept = default;
SafetensorsFile::~SafetensorsFile() = default;

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  impl->map_file();
  impl->parse_header();
  return SafetensorsFile(std::move(impl));
}

const std::string& SafetensorsFile::path() const { return impl_->path; }
std::vector<std::string> SafetensorsFile::names() const { return impl_->order; }
bool SafetensorsFile::contains(const std::string& name) const { return impl_->tensors.count(name) != 0; }
const std::map<std::string, std::string>& SafetensorsFile::metadata() const { return impl_->metadata; }
uint64_t SafetensorsFile::file_size() const { return impl_->map.size; }

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = impl_->tensors.find(name);
  if (it == impl_->tensors.end()) impl_->fail_tensor(name, "not in this file");
  return it->second;
}

void SafetensorsFile::read_into(const std::string& name, float* dst, int64_t count) const {
  const TensorInfo& t = info(name);
  const int64_t n = t.numel();
  if (count != n) {
    throw ShapeError(impl_->path + ": tensor '" + name + "' has " + std::to_string(n) + " elements " +
                     shape_str(t.shape) + ", destination holds " + std::to_string(count));
  }
  const unsigned char* src = impl_->map.data + t.offset;
  const int es = dtype_size(t.dtype);
  // Source bytes may sit at any alignment, so halves are assembled byte by byte.
  switch (t.dtype) {
    case DType::F32:
      std::memcpy(dst, src, static_cast<size_t>(t.nbytes));
      break;
    case DType::F16:
      for (int64_t i = 0; i < n; ++i)
        dst[i] = half_to_float(static_cast<uint16_t>(src[2 * i] | (src[2 * i + 1] << 8)));
      break;
    case DType::BF16:
      for (int64_t i = 0; i < n; ++i)
        dst[i] = bfloat16_to_float(static_cast<uint16_t>(src[2 * i] | (src[2 * i + 1] << 8)));
      break;
  }
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(dst[i])) {
      throw NumericError(impl_->path + ": tensor '" + name + "': element " + std::to_string(i) +
                         " is " + (std::isnan(dst[i]) ? "NaN" : "Inf") + " (" + dtype_name(t.dtype) +
                         " at file byte " + std::to_string(t.offset + static_cast<uint64_t>(i) * es) + ")");
    }
  }
}

Matrix SafetensorsFile::read_matrix(const std::string& name) const {
  const TensorInfo& t = info(name);
  if (t.shape.size() != 2) {
    throw ShapeError(impl_->path + ": tensor '" + name + "' has shape " + shape_str(t.shape) +
                     ", expected a matrix (rank 2)");
  }
  Matrix m(t.shape[0], t.shape[1]);
  read_into(name, m.data(), m.size());
  return m;
}

Vector SafetensorsFile::read_vector(const std::string& name) const {
  const TensorInfo& t = info(name);
  if (t.shape.size() != 1) {
    throw ShapeError(impl_->path + ": tensor '" + name + "' has shape " + shape_str(t.shape) +
                     ", expected a vector (rank 1)");
  }
  Vector v(t.shape[0]);
  read_into(name, v.data(), v.size());
  return v;
}

}  // namespace ql
