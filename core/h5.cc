#include "core/h5.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <functional>
#include <type_traits>
#include <limits>
#include <utility>

#include "core/error.h"

namespace ql::h5 {
namespace {

// Chunks of about this many bytes: large enough for deflate to work well, small enough that
// reading a few rows does not decompress megabytes.
constexpr size_t kChunkBytes = 64 * 1024;
constexpr unsigned kDeflateLevel = 4;

// HDF5 prints its error stack to stderr by default; we turn every failure into an IoError
// instead. The setting is per error stack, so it is (re)applied whenever a file is opened.
void silence_hdf5() { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }

// The innermost description on HDF5's error stack: the most specific reason (e.g. the errno
// text of a failed open). Must be called right after the failing call.
herr_t walk_cb(unsigned, const H5E_error2_t* err, void* data) {
  if (err && err->desc && *err->desc) *static_cast<std::string*>(data) = err->desc;
  return 0;
}
std::string hdf5_reason() {
  std::string reason;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, walk_cb, &reason);
  H5Eclear2(H5E_DEFAULT);
  return reason.empty() ? std::string() : " (" + reason + ")";
}

[[noreturn]] void fail_file(const std::string& file, const std::string& what) {
  throw IoError(file + ": " + what + hdf5_reason());
}

Id make_fapl(const std::string& file) {
  Id fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  if (!fapl.valid()) fail_file(file, "cannot create file access properties");
  // 1.8+ object format: dense attribute storage, so attributes may exceed 64 KiB.
  if (H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_V18, H5F_LIBVER_LATEST) < 0)
    fail_file(file, "cannot set file format bounds");
  // Closing the file closes every object still open in it: after close() the file is complete
  // on disk, whatever handles a caller still holds.
  if (H5Pset_fclose_degree(fapl.get(), H5F_CLOSE_STRONG) < 0)
    fail_file(file, "cannot set close degree");
  return fapl;
}

bool valid_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos;
}

// Fixed-length UTF-8 string type of `len` bytes (at least 1: HDF5 rejects size 0).
Id string_type(size_t len, const std::function<void(const std::string&)>& fail) {
  Id t(H5Tcopy(H5T_C_S1), H5Tclose);
  if (!t.valid() || H5Tset_size(t.get(), std::max<size_t>(len, 1)) < 0 ||
      H5Tset_cset(t.get(), H5T_CSET_UTF8) < 0 || H5Tset_strpad(t.get(), H5T_STR_NULLPAD) < 0)
    fail("cannot create string type");
  return t;
}

size_t max_length(const std::vector<std::string>& v) {
  size_t n = 1;
  for (const auto& s : v) n = std::max(n, s.size());
  return n;
}

// A fixed-length string from `size` bytes: NULLPAD pads with NULs after the value, NULLTERM
// ends it at the first NUL.
std::string unpad(const char* p, size_t size, bool nullterm) {
  size_t n = size;
  if (nullterm) {
    const void* z = std::memchr(p, '\0', size);
    if (z) n = static_cast<size_t>(static_cast<const char*>(z) - p);
  } else {
    while (n > 0 && p[n - 1] == '\0') --n;
  }
  return std::string(p, n);
}

size_t element_size(ColumnType t, const Column& c) {
  switch (t) {
    case ColumnType::String: return max_length(c.strings);
    case ColumnType::UInt32: return 4;
    default: return 8;
  }
}

// Dataset creation properties: chunked + deflate when there is data, contiguous otherwise
// (HDF5 does not allow zero-sized chunks).
Id dataset_props(const std::vector<hsize_t>& dims, size_t row_bytes,
                 const std::function<void(const std::string&)>& fail) {
  Id dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
  if (!dcpl.valid()) fail("cannot create dataset properties");
  bool empty = false;
  for (hsize_t d : dims) empty = empty || d == 0;
  if (empty) return dcpl;
  std::vector<hsize_t> chunk = dims;
  const hsize_t rows = std::max<hsize_t>(1, kChunkBytes / std::max<size_t>(row_bytes, 1));
  chunk[0] = std::min(dims[0], rows);
  if (H5Pset_chunk(dcpl.get(), static_cast<int>(chunk.size()), chunk.data()) < 0 ||
      H5Pset_deflate(dcpl.get(), kDeflateLevel) < 0)
    fail("cannot set chunking/compression");
  return dcpl;
}

// Shape of a dataset or attribute: rank and dimensions.
std::vector<hsize_t> extent(hid_t space) {
  int rank = H5Sget_simple_extent_ndims(space);
  if (rank < 0) return {};
  std::vector<hsize_t> dims(static_cast<size_t>(rank));
  if (rank > 0) H5Sget_simple_extent_dims(space, dims.data(), nullptr);
  return dims;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Id

Id& Id::operator=(Id&& o) noexcept {
  if (this != &o) {
    reset();
    id_ = o.id_;
    closer_ = o.closer_;
    o.id_ = H5I_INVALID_HID;
  }
  return *this;
}

herr_t Id::reset() {
  herr_t status = 0;
  if (id_ >= 0 && closer_) status = closer_(id_);
  id_ = H5I_INVALID_HID;
  return status;
}

// ---------------------------------------------------------------------------------------------
// Column / Table

const char* column_type_name(ColumnType t) {
  switch (t) {
    case ColumnType::String: return "string";
    case ColumnType::Int64: return "int64";
    case ColumnType::UInt32: return "uint32";
    case ColumnType::UInt64: return "uint64";
    case ColumnType::Double: return "double";
  }
  return "?";
}

size_t Column::size() const {
  switch (type) {
    case ColumnType::String: return strings.size();
    case ColumnType::Int64: return int64s.size();
    case ColumnType::UInt32: return uint32s.size();
    case ColumnType::UInt64: return uint64s.size();
    case ColumnType::Double: return doubles.size();
  }
  return 0;
}

Column& Table::push(const std::string& name, ColumnType type, size_t n) {
  if (name.empty()) throw Error("table column name must not be empty");
  if (has(name)) throw Error("table " + source + ": duplicate column '" + name + "'");
  if (!columns_.empty() && n != n_rows())
    throw ShapeError("table " + source + ": column '" + name + "' has " + std::to_string(n) +
                     " rows, the others " + std::to_string(n_rows()));
  columns_.emplace_back();
  columns_.back().name = name;
  columns_.back().type = type;
  return columns_.back();
}

Table& Table::add_strings(const std::string& name, std::vector<std::string> v) {
  push(name, ColumnType::String, v.size()).strings = std::move(v);
  return *this;
}
Table& Table::add_int64(const std::string& name, std::vector<int64_t> v) {
  push(name, ColumnType::Int64, v.size()).int64s = std::move(v);
  return *this;
}
Table& Table::add_uint32(const std::string& name, std::vector<uint32_t> v) {
  push(name, ColumnType::UInt32, v.size()).uint32s = std::move(v);
  return *this;
}
Table& Table::add_uint64(const std::string& name, std::vector<uint64_t> v) {
  push(name, ColumnType::UInt64, v.size()).uint64s = std::move(v);
  return *this;
}
Table& Table::add_double(const std::string& name, std::vector<double> v) {
  push(name, ColumnType::Double, v.size()).doubles = std::move(v);
  return *this;
}

bool Table::has(const std::string& name) const {
  for (const auto& c : columns_)
    if (c.name == name) return true;
  return false;
}

const Column& Table::column(const std::string& name) const {
  for (const auto& c : columns_)
    if (c.name == name) return c;
  throw IoError(source + ": no column '" + name + "'");
}

namespace {
[[noreturn]] void wrong_type(const Table& t, const Column& c, const char* wanted) {
  throw IoError(t.source + ": column '" + c.name + "' is " + column_type_name(c.type) +
                ", expected " + wanted);
}

// Integer column values as T, refusing values that do not fit.
template <class T>
std::vector<T> integers_as(const Table& t, const Column& c, const char* wanted) {
  auto fits = [](auto v) {
    if constexpr (std::is_signed_v<decltype(v)>) {
      if (v < 0)
        return std::is_signed_v<T> &&
               static_cast<int64_t>(v) >= static_cast<int64_t>(std::numeric_limits<T>::min());
    }
    return static_cast<uint64_t>(v) <= static_cast<uint64_t>(std::numeric_limits<T>::max());
  };
  std::vector<T> out;
  auto copy = [&](const auto& src) {
    out.reserve(src.size());
    for (auto v : src) {
      if (!fits(v))
        throw IoError(t.source + ": column '" + c.name + "': value " + std::to_string(v) +
                      " does not fit " + wanted);
      out.push_back(static_cast<T>(v));
    }
  };
  switch (c.type) {
    case ColumnType::Int64: copy(c.int64s); break;
    case ColumnType::UInt32: copy(c.uint32s); break;
    case ColumnType::UInt64: copy(c.uint64s); break;
    default: wrong_type(t, c, wanted);
  }
  return out;
}
}  // namespace

const std::vector<std::string>& Table::strings(const std::string& name) const {
  const Column& c = column(name);
  if (c.type != ColumnType::String) wrong_type(*this, c, "string");
  return c.strings;
}
std::vector<int64_t> Table::int64s(const std::string& name) const {
  return integers_as<int64_t>(*this, column(name), "int64");
}
std::vector<uint32_t> Table::uint32s(const std::string& name) const {
  return integers_as<uint32_t>(*this, column(name), "uint32");
}
std::vector<uint64_t> Table::uint64s(const std::string& name) const {
  return integers_as<uint64_t>(*this, column(name), "uint64");
}
const std::vector<double>& Table::doubles(const std::string& name) const {
  const Column& c = column(name);
  if (c.type != ColumnType::Double) wrong_type(*this, c, "double");
  return c.doubles;
}

// ---------------------------------------------------------------------------------------------
// Group: links

std::string Group::child_path(const std::string& name) const {
  return path_ == "/" ? "/" + name : path_ + "/" + name;
}

void Group::fail(const std::string& object, const std::string& what) const {
  throw IoError(file_ + ": " + object + ": " + what + hdf5_reason());
}

bool Group::has(const std::string& name) const {
  if (!valid_name(name)) return false;
  htri_t r = H5Lexists(id_.get(), name.c_str(), H5P_DEFAULT);
  if (r < 0) fail(child_path(name), "cannot look up link");
  return r > 0;
}

Group Group::create_group(const std::string& name) const {
  if (!valid_name(name)) fail(child_path(name), "invalid group name '" + name + "'");
  Id g(H5Gcreate2(id_.get(), name.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
  if (!g.valid()) fail(child_path(name), "cannot create group");
  return Group(file_, child_path(name), std::move(g));
}

Group Group::open_group(const std::string& name) const {
  if (!has(name)) fail(child_path(name), "no such group");
  Id g(H5Gopen2(id_.get(), name.c_str(), H5P_DEFAULT), H5Gclose);
  if (!g.valid()) fail(child_path(name), "cannot open group");
  return Group(file_, child_path(name), std::move(g));
}

void Group::remove(const std::string& name) const {
  if (!valid_name(name) || H5Ldelete(id_.get(), name.c_str(), H5P_DEFAULT) < 0)
    fail(child_path(name), "cannot remove");
}

namespace {
herr_t collect_link(hid_t, const char* name, const H5L_info_t*, void* data) {
  static_cast<std::vector<std::string>*>(data)->emplace_back(name);
  return 0;
}
}  // namespace

std::vector<std::string> Group::children() const {
  std::vector<std::string> names;
  hsize_t idx = 0;
  if (H5Literate(id_.get(), H5_INDEX_NAME, H5_ITER_INC, &idx, collect_link, &names) < 0)
    fail(path_, "cannot list group");
  return names;
}

// ---------------------------------------------------------------------------------------------
// Group: attributes

bool Group::has_attr(const std::string& name) const {
  htri_t r = H5Aexists(id_.get(), name.c_str());
  if (r < 0) fail(path_, "cannot look up attribute '" + name + "'");
  return r > 0;
}

namespace {
// Create (replacing) a scalar attribute of file type `ftype` and write `value` of `mtype`.
void write_scalar_attr(const Group& g, const std::string& name, hid_t ftype, hid_t mtype,
                       const void* value,
                       const std::function<void(const std::string&)>& fail) {
  if (g.has_attr(name) && H5Adelete(g.id(), name.c_str()) < 0)
    fail("cannot replace attribute '" + name + "'");
  Id space(H5Screate(H5S_SCALAR), H5Sclose);
  if (!space.valid()) fail("cannot create dataspace for attribute '" + name + "'");
  Id attr(H5Acreate2(g.id(), name.c_str(), ftype, space.get(), H5P_DEFAULT, H5P_DEFAULT),
          H5Aclose);
  if (!attr.valid()) fail("cannot create attribute '" + name + "'");
  if (H5Awrite(attr.get(), mtype, value) < 0) fail("cannot write attribute '" + name + "'");
}
}  // namespace

void Group::set_string_attr(const std::string& name, const std::string& value) const {
  auto f = [&](const std::string& w) { fail(path_, w); };
  Id t = string_type(value.size(), f);
  std::string buf = value;
  buf.resize(std::max<size_t>(value.size(), 1), '\0');
  write_scalar_attr(*this, name, t.get(), t.get(), buf.data(), f);
}
void Group::set_int64_attr(const std::string& name, int64_t value) const {
  write_scalar_attr(*this, name, H5T_STD_I64LE, H5T_NATIVE_INT64, &value,
                    [&](const std::string& w) { fail(path_, w); });
}
void Group::set_uint64_attr(const std::string& name, uint64_t value) const {
  write_scalar_attr(*this, name, H5T_STD_U64LE, H5T_NATIVE_UINT64, &value,
                    [&](const std::string& w) { fail(path_, w); });
}
void Group::set_double_attr(const std::string& name, double value) const {
  write_scalar_attr(*this, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &value,
                    [&](const std::string& w) { fail(path_, w); });
}

namespace {
// Open a one-element attribute and return (attribute, its type, its class).
struct OpenAttr {
  Id attr, type;
  H5T_class_t cls = H5T_NO_CLASS;
};
OpenAttr open_attr(const Group& g, const std::string& name,
                   const std::function<void(const std::string&)>& fail) {
  if (!g.has_attr(name)) fail("no attribute '" + name + "'");
  OpenAttr a;
  a.attr = Id(H5Aopen(g.id(), name.c_str(), H5P_DEFAULT), H5Aclose);
  if (!a.attr.valid()) fail("cannot open attribute '" + name + "'");
  Id space(H5Aget_space(a.attr.get()), H5Sclose);
  if (!space.valid() || H5Sget_simple_extent_npoints(space.get()) != 1)
    fail("attribute '" + name + "' is not a single value");
  a.type = Id(H5Aget_type(a.attr.get()), H5Tclose);
  if (!a.type.valid()) fail("cannot read type of attribute '" + name + "'");
  a.cls = H5Tget_class(a.type.get());
  return a;
}
}  // namespace

std::string Group::string_attr(const std::string& name) const {
  auto f = [&](const std::string& w) { fail(path_, w); };
  OpenAttr a = open_attr(*this, name, f);
  if (a.cls != H5T_STRING) f("attribute '" + name + "' is not a string");
  if (H5Tis_variable_str(a.type.get()) > 0) {
    Id mt(H5Tcopy(H5T_C_S1), H5Tclose);
    if (!mt.valid() || H5Tset_size(mt.get(), H5T_VARIABLE) < 0)
      f("cannot create string type");
    char* p = nullptr;
    if (H5Aread(a.attr.get(), mt.get(), &p) < 0) f("cannot read attribute '" + name + "'");
    std::string s = p ? std::string(p) : std::string();
    if (p) H5free_memory(p);
    return s;
  }
  size_t size = H5Tget_size(a.type.get());
  std::vector<char> buf(std::max<size_t>(size, 1), '\0');
  if (H5Aread(a.attr.get(), a.type.get(), buf.data()) < 0)
    f("cannot read attribute '" + name + "'");
  return unpad(buf.data(), size, H5Tget_strpad(a.type.get()) == H5T_STR_NULLTERM);
}

int64_t Group::int64_attr(const std::string& name) const {
  auto f = [&](const std::string& w) { fail(path_, w); };
  OpenAttr a = open_attr(*this, name, f);
  if (a.cls != H5T_INTEGER) f("attribute '" + name + "' is not an integer");
  int64_t v = 0;
  if (H5Aread(a.attr.get(), H5T_NATIVE_INT64, &v) < 0) f("cannot read attribute '" + name + "'");
  return v;
}

uint64_t Group::uint64_attr(const std::string& name) const {
  auto f = [&](const std::string& w) { fail(path_, w); };
  OpenAttr a = open_attr(*this, name, f);
  if (a.cls != H5T_INTEGER) f("attribute '" + name + "' is not an integer");
  uint64_t v = 0;
  if (H5Aread(a.attr.get(), H5T_NATIVE_UINT64, &v) < 0) f("cannot read attribute '" + name + "'");
  return v;
}

double Group::double_attr(const std::string& name) const {
  auto f = [&](const std::string& w) { fail(path_, w); };
  OpenAttr a = open_attr(*this, name, f);
  if (a.cls != H5T_FLOAT && a.cls != H5T_INTEGER) f("attribute '" + name + "' is not a number");
  double v = 0;
  if (H5Aread(a.attr.get(), H5T_NATIVE_DOUBLE, &v) < 0) f("cannot read attribute '" + name + "'");
  return v;
}

// ---------------------------------------------------------------------------------------------
// Group: datasets

namespace {
// Create dataset `name` with the given file type and dims, chunked/compressed when non-empty.
Id create_dataset(hid_t loc, const std::string& name, hid_t ftype, const std::vector<hsize_t>& dims,
                  size_t row_bytes, const std::function<void(const std::string&)>& fail) {
  if (!valid_name(name)) fail("invalid dataset name");
  Id space(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
  if (!space.valid()) fail("cannot create dataspace");
  Id dcpl = dataset_props(dims, row_bytes, fail);
  Id d(H5Dcreate2(loc, name.c_str(), ftype, space.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT),
       H5Dclose);
  if (!d.valid()) fail("cannot create dataset");
  return d;
}

struct OpenDataset {
  Id dset, type, space;
  std::vector<hsize_t> dims;
};
OpenDataset open_dataset(const Group& g, const std::string& name,
                         const std::function<void(const std::string&)>& fail) {
  if (!g.has(name)) fail("no such dataset");
  OpenDataset d;
  d.dset = Id(H5Dopen2(g.id(), name.c_str(), H5P_DEFAULT), H5Dclose);
  if (!d.dset.valid()) fail("cannot open dataset");
  d.type = Id(H5Dget_type(d.dset.get()), H5Tclose);
  d.space = Id(H5Dget_space(d.dset.get()), H5Sclose);
  if (!d.type.valid() || !d.space.valid()) fail("cannot read dataset type/shape");
  d.dims = extent(d.space.get());
  return d;
}
}  // namespace

void Group::write_table(const std::string& name, const Table& table) const {
  const std::string obj = child_path(name);
  auto f = [&](const std::string& w) { fail(obj, w); };
  const auto& cols = table.columns();
  if (cols.empty()) f("a table needs at least one column");
  const size_t n = table.n_rows();

  // Packed layout, identical in memory and on disk apart from the member types' byte order.
  std::vector<size_t> offset(cols.size()), size(cols.size());
  size_t row = 0;
  for (size_t j = 0; j < cols.size(); ++j) {
    offset[j] = row;
    size[j] = element_size(cols[j].type, cols[j]);
    row += size[j];
  }
  Id mtype(H5Tcreate(H5T_COMPOUND, row), H5Tclose);
  Id ftype(H5Tcreate(H5T_COMPOUND, row), H5Tclose);
  if (!mtype.valid() || !ftype.valid()) f("cannot create compound type");
  std::vector<Id> str_types;
  for (size_t j = 0; j < cols.size(); ++j) {
    hid_t mt = -1, ft = -1;
    switch (cols[j].type) {
      case ColumnType::String:
        str_types.push_back(string_type(size[j], f));
        mt = ft = str_types.back().get();
        break;
      case ColumnType::Int64: mt = H5T_NATIVE_INT64; ft = H5T_STD_I64LE; break;
      case ColumnType::UInt32: mt = H5T_NATIVE_UINT32; ft = H5T_STD_U32LE; break;
      case ColumnType::UInt64: mt = H5T_NATIVE_UINT64; ft = H5T_STD_U64LE; break;
      case ColumnType::Double: mt = H5T_NATIVE_DOUBLE; ft = H5T_IEEE_F64LE; break;
    }
    if (H5Tinsert(mtype.get(), cols[j].name.c_str(), offset[j], mt) < 0 ||
        H5Tinsert(ftype.get(), cols[j].name.c_str(), offset[j], ft) < 0)
      f("cannot add column '" + cols[j].name + "'");
  }

  std::vector<char> buf(n * row, '\0');
  for (size_t j = 0; j < cols.size(); ++j) {
    const Column& c = cols[j];
    for (size_t i = 0; i < n; ++i) {
      char* dst = buf.data() + i * row + offset[j];
      switch (c.type) {
        case ColumnType::String: std::memcpy(dst, c.strings[i].data(), c.strings[i].size()); break;
        case ColumnType::Int64: std::memcpy(dst, &c.int64s[i], 8); break;
        case ColumnType::UInt32: std::memcpy(dst, &c.uint32s[i], 4); break;
        case ColumnType::UInt64: std::memcpy(dst, &c.uint64s[i], 8); break;
        case ColumnType::Double: std::memcpy(dst, &c.doubles[i], 8); break;
      }
    }
  }

  Id d = create_dataset(id_.get(), name, ftype.get(), {static_cast<hsize_t>(n)}, row, f);
  if (n > 0 && H5Dwrite(d.get(), mtype.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data()) < 0)
    f("cannot write table");
}

Table Group::read_table(const std::string& name) const {
  const std::string obj = child_path(name);
  auto f = [&](const std::string& w) { fail(obj, w); };
  OpenDataset d = open_dataset(*this, name, f);
  if (H5Tget_class(d.type.get()) != H5T_COMPOUND) f("not a table (compound dataset)");
  if (d.dims.size() != 1) f("a table must be 1-D");
  const size_t n = static_cast<size_t>(d.dims[0]);
  const int nm = H5Tget_nmembers(d.type.get());
  if (nm <= 0) f("table has no columns");

  struct Member {
    std::string name;
    ColumnType type;
    size_t size, offset;
    bool nullterm = false;
  };
  std::vector<Member> members;
  std::vector<Id> str_types;
  size_t row = 0;
  for (int j = 0; j < nm; ++j) {
    char* cname = H5Tget_member_name(d.type.get(), static_cast<unsigned>(j));
    if (!cname) f("cannot read column name");
    Member m{cname, ColumnType::Double, 8, 0};
    H5free_memory(cname);
    Id mt(H5Tget_member_type(d.type.get(), static_cast<unsigned>(j)), H5Tclose);
    if (!mt.valid()) f("cannot read type of column '" + m.name + "'");
    switch (H5Tget_class(mt.get())) {
      case H5T_STRING:
        if (H5Tis_variable_str(mt.get()) > 0)
          f("column '" + m.name + "' is a variable-length string (unsupported)");
        m.type = ColumnType::String;
        m.size = H5Tget_size(mt.get());
        m.nullterm = H5Tget_strpad(mt.get()) == H5T_STR_NULLTERM;
        break;
      case H5T_INTEGER:
        if (H5Tget_sign(mt.get()) == H5T_SGN_NONE)
          m.type = H5Tget_size(mt.get()) <= 4 ? ColumnType::UInt32 : ColumnType::UInt64;
        else
          m.type = ColumnType::Int64;
        m.size = m.type == ColumnType::UInt32 ? 4 : 8;
        break;
      case H5T_FLOAT:
        m.type = ColumnType::Double;
        m.size = 8;
        break;
      default:
        f("column '" + m.name + "' has an unsupported type");
    }
    m.offset = row;
    row += m.size;
    members.push_back(std::move(m));
  }

  Id mtype(H5Tcreate(H5T_COMPOUND, row), H5Tclose);
  if (!mtype.valid()) f("cannot create compound type");
  for (const Member& m : members) {
    hid_t t = -1;
    switch (m.type) {
      case ColumnType::String: {
        Id st(H5Tcopy(H5T_C_S1), H5Tclose);
        if (!st.valid() || H5Tset_size(st.get(), m.size) < 0 ||
            H5Tset_strpad(st.get(), m.nullterm ? H5T_STR_NULLTERM : H5T_STR_NULLPAD) < 0 ||
            H5Tset_cset(st.get(), H5T_CSET_UTF8) < 0)
          f("cannot create string type");
        str_types.push_back(std::move(st));
        t = str_types.back().get();
        break;
      }
      case ColumnType::Int64: t = H5T_NATIVE_INT64; break;
      case ColumnType::UInt32: t = H5T_NATIVE_UINT32; break;
      case ColumnType::UInt64: t = H5T_NATIVE_UINT64; break;
      case ColumnType::Double: t = H5T_NATIVE_DOUBLE; break;
    }
    if (H5Tinsert(mtype.get(), m.name.c_str(), m.offset, t) < 0)
      f("cannot map column '" + m.name + "'");
  }

  std::vector<char> buf(n * row, '\0');
  if (n > 0 && H5Dread(d.dset.get(), mtype.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data()) < 0)
    f("cannot read table");

  Table t;
  t.source = file_ + ": " + obj;
  for (const Member& m : members) {
    auto at = [&](size_t i) { return buf.data() + i * row + m.offset; };
    switch (m.type) {
      case ColumnType::String: {
        std::vector<std::string> v(n);
        for (size_t i = 0; i < n; ++i) v[i] = unpad(at(i), m.size, m.nullterm);
        t.add_strings(m.name, std::move(v));
        break;
      }
      case ColumnType::Int64: {
        std::vector<int64_t> v(n);
        for (size_t i = 0; i < n; ++i) std::memcpy(&v[i], at(i), 8);
        t.add_int64(m.name, std::move(v));
        break;
      }
      case ColumnType::UInt32: {
        std::vector<uint32_t> v(n);
        for (size_t i = 0; i < n; ++i) std::memcpy(&v[i], at(i), 4);
        t.add_uint32(m.name, std::move(v));
        break;
      }
      case ColumnType::UInt64: {
        std::vector<uint64_t> v(n);
        for (size_t i = 0; i < n; ++i) std::memcpy(&v[i], at(i), 8);
        t.add_uint64(m.name, std::move(v));
        break;
      }
      case ColumnType::Double: {
        std::vector<double> v(n);
        for (size_t i = 0; i < n; ++i) std::memcpy(&v[i], at(i), 8);
        t.add_double(m.name, std::move(v));
        break;
      }
    }
  }
  return t;
}

void Group::write_matrix(const std::string& name, const MatrixD& m) const {
  const std::string obj = child_path(name);
  auto f = [&](const std::string& w) { fail(obj, w); };
  std::vector<hsize_t> dims{static_cast<hsize_t>(m.rows()), static_cast<hsize_t>(m.cols())};
  Id d = create_dataset(id_.get(), name, H5T_IEEE_F64LE, dims,
                        sizeof(double) * static_cast<size_t>(m.cols()), f);
  if (m.size() > 0 &&
      H5Dwrite(d.get(), H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, m.data()) < 0)
    f("cannot write matrix");
}

MatrixD Group::read_matrix(const std::string& name) const {
  const std::string obj = child_path(name);
  auto f = [&](const std::string& w) { fail(obj, w); };
  OpenDataset d = open_dataset(*this, name, f);
  const H5T_class_t cls = H5Tget_class(d.type.get());
  if (cls != H5T_FLOAT && cls != H5T_INTEGER) f("not a numeric dataset");
  if (d.dims.size() != 2) f("expected a 2-D dataset, found rank " + std::to_string(d.dims.size()));
  MatrixD m(static_cast<Index>(d.dims[0]), static_cast<Index>(d.dims[1]));
  if (m.size() > 0 &&
      H5Dread(d.dset.get(), H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, m.data()) < 0)
    f("cannot read matrix");
  return m;
}

void Group::write_strings(const std::string& name, const std::vector<std::string>& values) const {
  const std::string obj = child_path(name);
  auto f = [&](const std::string& w) { fail(obj, w); };
  const size_t len = max_length(values);
  Id t = string_type(len, f);
  std::vector<char> buf(values.size() * len, '\0');
  for (size_t i = 0; i < values.size(); ++i)
    std::memcpy(buf.data() + i * len, values[i].data(), values[i].size());
  Id d = create_dataset(id_.get(), name, t.get(), {static_cast<hsize_t>(values.size())}, len, f);
  if (!values.empty() && H5Dwrite(d.get(), t.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data()) < 0)
    f("cannot write strings");
}

std::vector<std::string> Group::read_strings(const std::string& name) const {
  const std::string obj = child_path(name);
  auto f = [&](const std::string& w) { fail(obj, w); };
  OpenDataset d = open_dataset(*this, name, f);
  if (H5Tget_class(d.type.get()) != H5T_STRING) f("not a string dataset");
  if (d.dims.size() != 1) f("expected a 1-D string dataset");
  const size_t n = static_cast<size_t>(d.dims[0]);
  std::vector<std::string> out(n);
  if (n == 0) return out;
  if (H5Tis_variable_str(d.type.get()) > 0) {
    Id mt(H5Tcopy(H5T_C_S1), H5Tclose);
    if (!mt.valid() || H5Tset_size(mt.get(), H5T_VARIABLE) < 0) f("cannot create string type");
    std::vector<char*> ptrs(n, nullptr);
    if (H5Dread(d.dset.get(), mt.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, ptrs.data()) < 0)
      f("cannot read strings");
    for (size_t i = 0; i < n; ++i) out[i] = ptrs[i] ? std::string(ptrs[i]) : std::string();
    H5Dvlen_reclaim(mt.get(), d.space.get(), H5P_DEFAULT, ptrs.data());
    return out;
  }
  const size_t len = H5Tget_size(d.type.get());
  const bool nullterm = H5Tget_strpad(d.type.get()) == H5T_STR_NULLTERM;
  std::vector<char> buf(n * len, '\0');
  if (H5Dread(d.dset.get(), d.type.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data()) < 0)
    f("cannot read strings");
  for (size_t i = 0; i < n; ++i) out[i] = unpad(buf.data() + i * len, len, nullterm);
  return out;
}

// ---------------------------------------------------------------------------------------------
// File

File File::create(const std::string& path) {
  silence_hdf5();
  Id fapl = make_fapl(path);
  Id id(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()), H5Fclose);
  if (!id.valid()) fail_file(path, "cannot create HDF5 file");
  return File(path, std::move(id));
}

File File::open(const std::string& path, Access access) {
  silence_hdf5();
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) throw IoError(path + ": no such file");
  Id fapl = make_fapl(path);
  const unsigned flags = access == Access::ReadWrite ? H5F_ACC_RDWR : H5F_ACC_RDONLY;
  Id id(H5Fopen(path.c_str(), flags, fapl.get()), H5Fclose);
  if (!id.valid()) fail_file(path, "cannot open as an HDF5 file");
  return File(path, std::move(id));
}

bool File::is_hdf5(const std::string& path) {
  silence_hdf5();
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) return false;
  htri_t r = H5Fis_hdf5(path.c_str());
  H5Eclear2(H5E_DEFAULT);
  return r > 0;
}

Group File::root() const {
  if (!id_.valid()) throw IoError(path_ + ": file is closed");
  Id g(H5Gopen2(id_.get(), "/", H5P_DEFAULT), H5Gclose);
  if (!g.valid()) fail_file(path_, "cannot open root group");
  return Group(path_, "/", std::move(g));
}

void File::close() {
  if (!id_.valid()) return;
  if (id_.reset() < 0) fail_file(path_, "cannot close file (data may not be complete)");
}

}  // namespace ql::h5
