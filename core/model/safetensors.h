// Reader of one .safetensors file (the Hugging Face tensor container), memory-mapped read-only.
//
// File layout: bytes [0, 8) hold N, the header length, as a little-endian uint64; bytes
// [8, 8+N) hold a UTF-8 JSON object mapping each tensor name to
//   {"dtype": "F32"|"F16"|"BF16"|..., "shape": [d0, d1, ...], "data_offsets": [begin, end]}
// plus an optional "__metadata__" object of string -> string. Offsets are relative to the data
// section that starts at byte 8+N; a tensor's bytes are [8+N+begin, 8+N+end), row-major,
// little-endian.
//
// open() validates the whole header against the file before any tensor is read, so a file that
// opens successfully can be read without further I/O errors: header length within the file,
// well-formed JSON (no duplicate tensor names), every field of the expected type, a supported
// dtype (F32, F16, BF16), begin <= end <= data-section size, end - begin == prod(shape) x dtype
// size, and no two tensors sharing a byte. Gaps between tensors and bytes after the last one
// are allowed (they carry no tensor). Every error is a one-line ql::IoError naming the file,
// the tensor and the field or byte offset at fault.
//
// Reading converts to float32 exactly (every F16 and BF16 value is a float32 value) and rejects
// non-finite elements with a ql::NumericError naming the file, the tensor, the element index
// and its absolute byte offset in the file: a weight that is NaN or Inf is a broken checkpoint,
// not something to propagate into a forward pass.
//
// Thread safety: after open(), all const member functions may be called concurrently (the
// mapping is read-only and never modified). The object is movable, not copyable; the mapping
// lives until the object is destroyed.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace ql {

enum class DType { F32, F16, BF16 };

/// "F32", "F16", "BF16" (the safetensors spelling).
const char* dtype_name(DType d);
/// Bytes per element: 4, 2, 2.
int dtype_size(DType d);

/// IEEE 754 binary16 bits -> float32, exact for every input: subnormals, signed zeros, ±Inf,
/// and NaN (payload kept in the top mantissa bits, so a NaN stays a NaN).
float half_to_float(uint16_t bits);
/// bfloat16 bits (the top half of a float32) -> float32, exact.
float bfloat16_to_float(uint16_t bits);

/// One tensor's header entry, after validation.
struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;  ///< empty for a scalar
  uint64_t offset = 0;         ///< absolute byte offset of the first element in the file
  uint64_t nbytes = 0;         ///< == numel() * dtype_size(dtype)

  int64_t numel() const;
};

/// "[4096, 256]".
std::string shape_str(const std::vector<int64_t>& shape);

class SafetensorsFile {
 public:
  /// Maps and validates `path`. Throws IoError (see the header comment).
  static SafetensorsFile open(const std::string& path);

  SafetensorsFile(SafetensorsFile&&) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  ~SafetensorsFile();

  /// The path given to open().
  const std::string& path() const;
  /// Tensor names in file order (ascending data offset; ties, i.e. empty tensors, by name).
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const;
  /// Throws IoError naming the file when the tensor is absent.
  const TensorInfo& info(const std::string& name) const;
  /// The "__metadata__" object (empty when absent).
  const std::map<std::string, std::string>& metadata() const;
  /// Size of the whole file in bytes.
  uint64_t file_size() const;

  /// A rank-2 tensor [rows, cols] as a row-major float32 matrix. ShapeError if the rank is not
  /// 2; NumericError on a non-finite element.
  Matrix read_matrix(const std::string& name) const;
  /// A rank-1 tensor as a float32 vector. ShapeError if the rank is not 1; NumericError on a
  /// non-finite element.
  Vector read_vector(const std::string& name) const;
  /// Converts the tensor's elements in row-major order into dst[0, count). ShapeError unless
  /// count == numel(); NumericError on a non-finite element. dst must not alias the mapping.
  void read_into(const std::string& name, float* dst, int64_t count) const;

 private:
  struct Impl;
  explicit SafetensorsFile(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace ql
