// Thin RAII layer over the HDF5 C API (1.10), for the result store and anything else that writes
// tables readable by h5py/pandas.
//
// Every handle closes itself. Every failing HDF5 call throws ql::IoError whose message names the
// file and the object ("results.h5: /runs/ab12/layers: cannot read dataset (<HDF5's reason>)");
// HDF5's own automatic error printing to stderr is switched off when a file is opened.
//
// On-disk conventions (what h5py sees):
// - strings are fixed-length, UTF-8 (H5T_CSET_UTF8), NULLPAD, length = the longest value of the
//   column/dataset/attribute (at least 1 byte); h5py returns them as bytes, decode("utf-8");
// - a table is a 1-D dataset of a compound type, one member per column, in insertion order;
//   columns are string, int64, uint32, uint64 or double (little-endian);
// - non-empty datasets are chunked and deflate-compressed (level 4); empty ones (0 rows) are
//   still written, contiguous, so readers see the schema;
// - files use the HDF5 1.8+ object format, so attributes larger than 64 KiB (a long resolved
//   config) go to dense attribute storage instead of failing.
//
// Thread safety: Debian's HDF5 is built without the thread-safe option, so no two threads may
// call into this layer (or HDF5) at the same time. Objects are movable, not copyable.
#pragma once
#include <hdf5.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace ql::h5 {

/// Owns one HDF5 identifier and releases it with the matching H5*close function.
class Id {
 public:
  using Closer = herr_t (*)(hid_t);
  Id() = default;
  Id(hid_t id, Closer closer) : id_(id), closer_(closer) {}
  ~Id() { reset(); }
  Id(Id&& o) noexcept : id_(o.id_), closer_(o.closer_) { o.id_ = H5I_INVALID_HID; }
  Id& operator=(Id&& o) noexcept;
  Id(const Id&) = delete;
  Id& operator=(const Id&) = delete;

  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }
  /// Close now; returns the closer's status (negative on failure), 0 if nothing was held.
  herr_t reset();

 private:
  hid_t id_ = H5I_INVALID_HID;
  Closer closer_ = nullptr;
};

enum class ColumnType { String, Int64, UInt32, UInt64, Double };
const char* column_type_name(ColumnType t);

/// One column of a table; only the vector matching `type` is used.
struct Column {
  std::string name;
  ColumnType type = ColumnType::Double;
  std::vector<std::string> strings;
  std::vector<int64_t> int64s;
  std::vector<uint32_t> uint32s;
  std::vector<uint64_t> uint64s;
  std::vector<double> doubles;

  size_t size() const;
};

/// A column-oriented table written as one compound dataset. All columns have the same length;
/// column names are unique. Accessors throw IoError naming `source` (set by Group::read_table to
/// "file: /object") when a column is missing or has an incompatible type.
class Table {
 public:
  Table& add_strings(const std::string& name, std::vector<std::string> values);
  Table& add_int64(const std::string& name, std::vector<int64_t> values);
  Table& add_uint32(const std::string& name, std::vector<uint32_t> values);
  Table& add_uint64(const std::string& name, std::vector<uint64_t> values);
  Table& add_double(const std::string& name, std::vector<double> values);

  size_t n_rows() const { return columns_.empty() ? 0 : columns_.front().size(); }
  const std::vector<Column>& columns() const { return columns_; }
  bool has(const std::string& name) const;
  const Column& column(const std::string& name) const;

  const std::vector<std::string>& strings(const std::string& name) const;
  /// Any integer column, converted (IoError if a value does not fit).
  std::vector<int64_t> int64s(const std::string& name) const;
  std::vector<uint32_t> uint32s(const std::string& name) const;
  std::vector<uint64_t> uint64s(const std::string& name) const;
  /// A double column.
  const std::vector<double>& doubles(const std::string& name) const;

  std::string source;  ///< for error messages

 private:
  Column& push(const std::string& name, ColumnType type, size_t n);
  std::vector<Column> columns_;
};

/// A group (or the root group of a file): child groups, datasets and attributes, addressed by
/// a single link name relative to this group (no '/').
class Group {
 public:
  const std::string& file_path() const { return file_; }
  const std::string& path() const { return path_; }  ///< absolute, e.g. "/runs/ab12"
  hid_t id() const { return id_.get(); }

  bool has(const std::string& name) const;  ///< a link of that name exists
  Group create_group(const std::string& name) const;
  Group open_group(const std::string& name) const;
  /// Remove the link (and so the object); its space is not reclaimed in the file.
  void remove(const std::string& name) const;
  /// Names of the direct children, in name order.
  std::vector<std::string> children() const;

  bool has_attr(const std::string& name) const;
  /// Setters replace an existing attribute of the same name.
  void set_string_attr(const std::string& name, const std::string& value) const;
  void set_int64_attr(const std::string& name, int64_t value) const;
  void set_uint64_attr(const std::string& name, uint64_t value) const;
  void set_double_attr(const std::string& name, double value) const;
  /// Fixed- or variable-length string attribute (trailing NUL padding removed).
  std::string string_attr(const std::string& name) const;
  int64_t int64_attr(const std::string& name) const;    ///< any integer attribute
  uint64_t uint64_attr(const std::string& name) const;  ///< any integer attribute
  double double_attr(const std::string& name) const;   ///< any numeric attribute

  void write_table(const std::string& name, const Table& table) const;
  Table read_table(const std::string& name) const;
  /// 2-D float64 dataset, rows x cols as in the matrix (row-major on disk as in memory).
  void write_matrix(const std::string& name, const MatrixD& m) const;
  MatrixD read_matrix(const std::string& name) const;
  /// 1-D fixed-length UTF-8 string dataset (reading also accepts variable-length strings).
  void write_strings(const std::string& name, const std::vector<std::string>& values) const;
  std::vector<std::string> read_strings(const std::string& name) const;

 private:
  friend class File;
  Group(std::string file, std::string path, Id id)
      : file_(std::move(file)), path_(std::move(path)), id_(std::move(id)) {}
  std::string child_path(const std::string& name) const;
  [[noreturn]] void fail(const std::string& object, const std::string& what) const;

  std::string file_, path_;
  Id id_;
};

enum class Access { ReadOnly, ReadWrite };

/// An open HDF5 file. Closing (explicitly or by the destructor) closes every object still open
/// in it (H5F_CLOSE_STRONG), so after close() the bytes on disk are complete.
class File {
 public:
  /// Create (truncating any existing file).
  static File create(const std::string& path);
  /// Open an existing file; IoError if it is missing or not HDF5.
  static File open(const std::string& path, Access access);
  /// True if `path` exists and has an HDF5 signature.
  static bool is_hdf5(const std::string& path);

  File(File&&) noexcept = default;
  File& operator=(File&&) noexcept = default;
  ~File() = default;

  const std::string& path() const { return path_; }
  Group root() const;
  /// Flush and close; IoError if HDF5 reports a failure. Idempotent.
  void close();

 private:
  File(std::string path, Id id) : path_(std::move(path)), id_(std::move(id)) {}
  std::string path_;
  Id id_;
};

}  // namespace ql::h5
