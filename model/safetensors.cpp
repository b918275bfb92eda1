#include "model/safetensors.h"

#include <fmt/format.h>

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "common/atomic_file.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors.cpp assumes a little-endian host"
#endif

namespace attnpilot::model {

using json = nlohmann::json;
namespace fs = std::filesystem;

const char* dtype_name(Dtype d) {
  switch (d) {
    case Dtype::kF32:
      return "F32";
    case Dtype::kF16:
      return "F16";
    case Dtype::kBF16:
      return "BF16";
  }
  return "?";
}

int64_t dtype_size(Dtype d) { return d == Dtype::kF32 ? 4 : 2; }

torch::ScalarType to_scalar_type(Dtype d) {
  switch (d) {
    case Dtype::kF32:
      return torch::kFloat32;
    case Dtype::kF16:
      return torch::kFloat16;
    case Dtype::kBF16:
      return torch::kBFloat16;
  }
  return torch::kFloat32;
}

const char* rule_name(SafetensorsRule r) {
  switch (r) {
    case SafetensorsRule::kTruncated:
      return "truncated";
    case SafetensorsRule::kHeaderTooLarge:
      return "header_too_large";
    case SafetensorsRule::kHeaderPastEnd:
      return "header_past_end";
    case SafetensorsRule::kHeaderNotUtf8:
      return "header_not_utf8";
    case SafetensorsRule::kHeaderNotJson:
      return "header_not_json";
    case SafetensorsRule::kHeaderNotObject:
      return "header_not_object";
    case SafetensorsRule::kDuplicateName:
      return "duplicate_name";
    case SafetensorsRule::kBadEntry:
      return "bad_entry";
    case SafetensorsRule::kUnsupportedDtype:
      return "unsupported_dtype";
    case SafetensorsRule::kNegativeDim:
      return "negative_dim";
    case SafetensorsRule::kSizeOverflow:
      return "size_overflow";
    case SafetensorsRule::kSpanMismatch:
      return "span_mismatch";
    case SafetensorsRule::kOffsetsPastEnd:
      return "offsets_past_end";
    case SafetensorsRule::kOverlap:
      return "overlap";
    case SafetensorsRule::kGap:
      return "gap";
    case SafetensorsRule::kBadMetadata:
      return "bad_metadata";
    case SafetensorsRule::kMissingTensor:
      return "missing_tensor";
    case SafetensorsRule::kWrongShape:
      return "wrong_shape";
    case SafetensorsRule::kUnexpectedTensor:
      return "unexpected_tensor";
  }
  return "?";
}

namespace {

std::string describe(SafetensorsRule rule, const std::string& file, const std::string& tensor,
                     const std::string& detail) {
  if (tensor.empty()) return fmt::format("{}: [{}] {}", file, rule_name(rule), detail);
  return fmt::format("{}: tensor '{}': [{}] {}", file, tensor, rule_name(rule), detail);
}

}  // namespace

SafetensorsError::SafetensorsError(SafetensorsRule rule, std::string file, std::string tensor,
                                   const std::string& detail)
    : FormatError(describe(rule, file, tensor, detail)),
      rule_(rule),
      file_(std::move(file)),
      tensor_(std::move(tensor)) {}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

const TensorInfo* SafetensorsHeader::find(const std::string& name) const {
  for (const auto& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}

bool is_valid_utf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
      cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;  // continuation byte, overlong lead (C0, C1) or F5..FF
    }
    if (i + len > n) return false;
    for (size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000)) return false;  // overlong
    if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += len;
  }
  return true;
}

namespace {

/// Reads the little-endian u64 at the start of `bytes` (which holds at least 8).
uint64_t read_u64(const std::string& bytes) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(bytes[i]);
  return v;
}

bool parse_dtype(const std::string& s, Dtype* out) {
  if (s == "F32")
    *out = Dtype::kF32;
  else if (s == "F16")
    *out = Dtype::kF16;
  else if (s == "BF16")
    *out = Dtype::kBF16;
  else
    return false;
  return true;
}

/// Validates one entry of the header object.
TensorInfo parse_entry(const std::string& name, const json& e, const std::string& origin) {
  auto fail = [&](SafetensorsRule rule, const std::string& detail) -> void {
    throw SafetensorsError(rule, origin, name, detail);
  };
  if (!e.is_object())
    fail(SafetensorsRule::kHeaderNotObject,
         fmt::format("entry must be an object with dtype, shape, data_offsets; got {}",
                     e.type_name()));
  for (auto it = e.begin(); it != e.end(); ++it)
    if (it.key() != "dtype" && it.key() != "shape" && it.key() != "data_offsets")
      fail(SafetensorsRule::kBadEntry, fmt::format("unknown field '{}'", it.key()));
  for (const char* field : {"dtype", "shape", "data_offsets"})
    if (!e.contains(field)) fail(SafetensorsRule::kBadEntry, fmt::format("missing '{}'", field));

  TensorInfo t;
  t.name = name;
  const json& d = e["dtype"];
  if (!d.is_string())
    fail(SafetensorsRule::kBadEntry, fmt::format("dtype must be a string, got {}", d.dump()));
  if (!parse_dtype(d.get<std::string>(), &t.dtype))
    fail(SafetensorsRule::kUnsupportedDtype,
         fmt::format("dtype {} is not supported (expected F32, F16 or BF16)", d.dump()));

  const json& shape = e["shape"];
  if (!shape.is_array())
    fail(SafetensorsRule::kBadEntry, fmt::format("shape must be an array, got {}", shape.dump()));
  uint64_t numel = 1;
  for (const auto& dim : shape) {
    if (dim.is_number_integer() && !dim.is_number_unsigned() && dim.get<int64_t>() < 0)
      fail(SafetensorsRule::kNegativeDim,
           fmt::format("shape {} has a negative dimension", shape.dump()));
    if (!dim.is_number_unsigned())
      fail(SafetensorsRule::kBadEntry,
           fmt::format("shape {} must hold non-negative integers", shape.dump()));
    const uint64_t v = dim.get<uint64_t>();
    if (v > static_cast<uint64_t>(INT64_MAX) || __builtin_mul_overflow(numel, v, &numel) ||
        numel > static_cast<uint64_t>(INT64_MAX))
      fail(SafetensorsRule::kSizeOverflow,
           fmt::format("shape {} has more elements than 64 bits can count", shape.dump()));
    t.shape.push_back(static_cast<int64_t>(v));
  }
  uint64_t nbytes = 0;
  if (__builtin_mul_overflow(numel, static_cast<uint64_t>(dtype_size(t.dtype)), &nbytes))
    fail(SafetensorsRule::kSizeOverflow,
         fmt::format("shape {} x {} bytes overflows 64 bits", shape.dump(), dtype_size(t.dtype)));

  const json& off = e["data_offsets"];
  if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
      !off[1].is_number_unsigned())
    fail(SafetensorsRule::kBadEntry,
         fmt::format("data_offsets must be two non-negative integers [begin, end], got {}",
                     off.dump()));
  t.begin = off[0].get<uint64_t>();
  t.end = off[1].get<uint64_t>();
  if (t.end < t.begin)
    fail(SafetensorsRule::kSpanMismatch,
         fmt::format("data_offsets [{}, {}] end before begin", t.begin, t.end));
  if (t.end - t.begin != nbytes)
    fail(SafetensorsRule::kSpanMismatch,
         fmt::format("data_offsets [{}, {}] span {} bytes but shape {} x {} needs {}", t.begin,
                     t.end, t.end - t.begin, shape.dump(), dtype_name(t.dtype), nbytes));
  return t;
}

}  // namespace

SafetensorsHeader parse_header(const std::string& prefix, uint64_t file_size,
                               const std::string& origin) {
  using R = SafetensorsRule;
  if (file_size < 8)
    throw SafetensorsError(
        R::kTruncated, origin, "",
        fmt::format("file has {} bytes, fewer than the 8-byte header length", file_size));
  ATTNPILOT_CHECK_ARG(prefix.size() >= 8, "parse_header: prefix of {} bytes, need 8",
                      prefix.size());
  const uint64_t n = read_u64(prefix);
  if (n > kMaxHeaderBytes)
    throw SafetensorsError(
        R::kHeaderTooLarge, origin, "",
        fmt::format("header length {} exceeds the limit of {} bytes", n, kMaxHeaderBytes));
  if (n > file_size - 8)
    throw SafetensorsError(R::kHeaderPastEnd, origin, "",
                           fmt::format("header length {} runs past the end of the file ({} "
                                       "bytes after the length field)",
                                       n, file_size - 8));
  ATTNPILOT_CHECK_ARG(prefix.size() >= 8 + n, "parse_header: prefix of {} bytes, need {}",
                      prefix.size(), 8 + n);
  const std::string text = prefix.substr(8, n);
  if (!is_valid_utf8(text))
    throw SafetensorsError(R::kHeaderNotUtf8, origin, "", "header is not valid UTF-8");

  // Parse, refusing duplicate keys (nlohmann would silently keep the last one).
  std::set<std::string> names;
  std::set<std::string> fields;
  std::string current;
  json::parser_callback_t cb = [&](int depth, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::key && depth == 1) {
      current = parsed.get<std::string>();
      if (!names.insert(current).second)
        throw SafetensorsError(R::kDuplicateName, origin, current,
                               "the name appears more than once in the header");
      fields.clear();
    } else if (event == json::parse_event_t::key && depth == 2) {
      const std::string f = parsed.get<std::string>();
      if (!fields.insert(f).second)
        throw SafetensorsError(current == "__metadata__" ? R::kBadMetadata : R::kBadEntry, origin,
                               current == "__metadata__" ? "" : current,
                               fmt::format("field '{}' appears more than once", f));
    }
    return true;
  };
  json j;
  try {
    j = json::parse(text, cb);
  } catch (const json::exception& e) {
    throw SafetensorsError(R::kHeaderNotJson, origin, "",
                           fmt::format("header is not valid JSON: {}", e.what()));
  }
  if (!j.is_object())
    throw SafetensorsError(R::kHeaderNotObject, origin, "",
                           fmt::format("header must be a JSON object, got {}", j.type_name()));

  SafetensorsHeader h;
  h.data_start = 8 + n;
  h.data_size = file_size - h.data_start;
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it.value().is_object())
        throw SafetensorsError(R::kBadMetadata, origin, "", "__metadata__ must be an object");
      for (auto m = it.value().begin(); m != it.value().end(); ++m) {
        if (!m.value().is_string())
          throw SafetensorsError(R::kBadMetadata, origin, "",
                                 fmt::format("__metadata__ value of '{}' must be a string, got {}",
                                             m.key(), m.value().dump()));
        h.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (it.key().empty())
      throw SafetensorsError(R::kBadEntry, origin, "", "a tensor has an empty name");
    h.tensors.push_back(parse_entry(it.key(), it.value(), origin));
  }

  for (const auto& t : h.tensors)
    if (t.end > h.data_size)
      throw SafetensorsError(R::kOffsetsPastEnd, origin, t.name,
                             fmt::format("data_offsets [{}, {}] exceed the data area of {} bytes",
                                         t.begin, t.end, h.data_size));
  std::sort(h.tensors.begin(), h.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t cursor = 0;
  std::string previous;
  for (const auto& t : h.tensors) {
    if (t.begin < cursor)
      throw SafetensorsError(R::kOverlap, origin, t.name,
                             fmt::format("bytes [{}, {}) overlap tensor '{}' (ends at {})", t.begin,
                                         t.end, previous, cursor));
    if (t.begin > cursor)
      throw SafetensorsError(
          R::kGap, origin, t.name,
          fmt::format("starts at {} but the previous tensor{} ends at {}: {} unused bytes", t.begin,
                      previous.empty() ? "" : " '" + previous + "'", cursor, t.begin - cursor));
    cursor = t.end;
    previous = t.name;
  }
  if (cursor != h.data_size)
    throw SafetensorsError(R::kGap, origin, "",
                           fmt::format("tensors cover {} bytes of a {}-byte data area: {} "
                                       "trailing bytes belong to no tensor",
                                       cursor, h.data_size, h.data_size - cursor));
  return h;
}

namespace {

void read_exact(std::ifstream& in, char* dst, uint64_t n, uint64_t at, const fs::path& path) {
  in.seekg(static_cast<std::streamoff>(at));
  in.read(dst, static_cast<std::streamsize>(n));
  if (!in || static_cast<uint64_t>(in.gcount()) != n)
    throw IoError(fmt::format("{}: reading {} bytes at offset {} failed", path.string(), n, at));
}

SafetensorsHeader read_header_from(std::ifstream& in, const fs::path& path, uint64_t size) {
  std::string prefix(std::min<uint64_t>(size, 8), '\0');
  if (!prefix.empty()) read_exact(in, prefix.data(), prefix.size(), 0, path);
  if (size >= 8) {
    const uint64_t n = read_u64(prefix);
    if (n <= kMaxHeaderBytes && n <= size - 8) {
      prefix.resize(8 + n);
      if (n > 0) read_exact(in, prefix.data() + 8, n, 8, path);
    }
  }
  return parse_header(prefix, size, path.string());
}

std::ifstream open_file(const fs::path& path, uint64_t* size) {
  std::error_code ec;
  const auto s = fs::file_size(path, ec);
  if (ec) throw IoError(fmt::format("{}: cannot read: {}", path.string(), ec.message()));
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError(fmt::format("{}: cannot open for reading", path.string()));
  *size = s;
  return in;
}

}  // namespace

SafetensorsHeader read_header(const fs::path& path) {
  uint64_t size = 0;
  std::ifstream in = open_file(path, &size);
  return read_header_from(in, path, size);
}

SafetensorsFile read_safetensors(const fs::path& path) {
  uint64_t size = 0;
  std::ifstream in = open_file(path, &size);
  SafetensorsFile f;
  f.header = read_header_from(in, path, size);
  for (const auto& t : f.header.tensors) {
    auto tensor = torch::empty(t.shape, torch::TensorOptions().dtype(to_scalar_type(t.dtype)));
    if (t.end > t.begin)
      read_exact(in, static_cast<char*>(tensor.data_ptr()), t.end - t.begin,
                 f.header.data_start + t.begin, path);
    f.tensors.emplace(t.name, std::move(tensor));
  }
  return f;
}

std::string serialize_safetensors(const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                                  const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  std::vector<torch::Tensor> data;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    ATTNPILOT_CHECK_ARG(!name.empty() && name != "__metadata__",
                        "safetensors: tensor name '{}' is empty or reserved", name);
    ATTNPILOT_CHECK_ARG(!header.contains(name), "safetensors: tensor name '{}' given twice", name);
    ATTNPILOT_CHECK_ARG(tensor.defined(), "safetensors: tensor '{}' is undefined", name);
    const char* dtype = nullptr;
    switch (tensor.scalar_type()) {
      case torch::kFloat32:
        dtype = "F32";
        break;
      case torch::kFloat16:
        dtype = "F16";
        break;
      case torch::kBFloat16:
        dtype = "BF16";
        break;
      default:
        throw InvalidArgument(fmt::format(
            "safetensors: tensor '{}' has dtype {}; only float32, float16 and bfloat16 are "
            "written",
            name, c10::toString(tensor.scalar_type())));
    }
    auto t = tensor.detach().to(torch::kCPU).contiguous();
    const uint64_t nbytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    header[name] = {
        {"dtype", dtype}, {"shape", t.sizes().vec()}, {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    data.push_back(std::move(t));
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string out;
  out.reserve(8 + text.size() + offset);
  uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xFF));
  out += text;
  for (const auto& t : data)
    if (t.numel() > 0)
      out.append(static_cast<const char*>(t.data_ptr()),
                 static_cast<size_t>(t.numel()) * t.element_size());
  return out;
}

void write_safetensors(const fs::path& path,
                       const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  write_file_atomic(path, serialize_safetensors(tensors, metadata));
}

}  // namespace attnpilot::model
