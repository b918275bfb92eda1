#include "transport/codec.h"

#include <cstring>
#include <limits>
#include <type_traits>

namespace attnpilot::transport {
namespace {

static_assert(sizeof(int64_t) == 8 && sizeof(uint64_t) == 8, "64-bit integers expected");

bool host_is_little_endian() {
  const uint16_t one = 1;
  unsigned char b;
  std::memcpy(&b, &one, 1);
  return b == 1;
}

// Little-endian integer writers/readers (byte by byte: correct on any host).
template <typename T>
void put(char*& p, T v) {
  using U = std::make_unsigned_t<T>;
  U u = static_cast<U>(v);
  for (size_t i = 0; i < sizeof(T); ++i) {
    *p++ = static_cast<char>(static_cast<unsigned char>(u & 0xFF));
    u = static_cast<U>(u >> 8);
  }
}

class Reader {
 public:
  Reader(const unsigned char* p, size_t n) : p_(p), n_(n) {}
  size_t remaining() const { return n_ - off_; }

  template <typename T>
  T get(const char* field) {
    need(sizeof(T), field);
    using U = std::make_unsigned_t<T>;
    U u = 0;
    for (size_t i = 0; i < sizeof(T); ++i)
      u |= static_cast<U>(static_cast<U>(p_[off_ + i]) << (8 * i));
    off_ += sizeof(T);
    return static_cast<T>(u);
  }
  std::string bytes(uint64_t len, const char* field) {
    need(len, field);
    std::string s(reinterpret_cast<const char*>(p_ + off_), static_cast<size_t>(len));
    off_ += static_cast<size_t>(len);
    return s;
  }
  void need(uint64_t len, const char* field) const {
    if (len > remaining()) {
      throw DecodeError(DecodeErrorKind::kTruncated,
                        fmt::format("truncated frame: field '{}' needs {} bytes at offset {}, "
                                    "only {} remain",
                                    field, len, off_, remaining()));
    }
  }

 private:
  const unsigned char* p_;
  size_t n_;
  size_t off_ = 0;
};

}  // namespace

bool is_known_type(uint16_t t) { return t >= 1 && t <= static_cast<uint16_t>(MsgType::kPing); }

std::string type_name(MsgType t) {
  switch (t) {
    case MsgType::kHello:
      return "hello";
    case MsgType::kWelcome:
      return "welcome";
    case MsgType::kTrajectory:
      return "trajectory";
    case MsgType::kAck:
      return "ack";
    case MsgType::kWeights:
      return "weights";
    case MsgType::kSpecRequest:
      return "spec_request";
    case MsgType::kSpecReply:
      return "spec_reply";
    case MsgType::kResetRequest:
      return "reset_request";
    case MsgType::kResetReply:
      return "reset_reply";
    case MsgType::kStepRequest:
      return "step_request";
    case MsgType::kStepReply:
      return "step_reply";
    case MsgType::kError:
      return "error";
    case MsgType::kShutdown:
      return "shutdown";
    case MsgType::kPing:
      return "ping";
  }
  return fmt::format("unknown({})", static_cast<unsigned>(t));
}

bool is_known_dtype(uint8_t d) { return d >= 1 && d <= static_cast<uint8_t>(DType::kBFloat16); }

size_t dtype_size(DType d) {
  switch (d) {
    case DType::kFloat32:
      return 4;
    case DType::kFloat64:
      return 8;
    case DType::kInt32:
      return 4;
    case DType::kInt64:
      return 8;
    case DType::kUInt8:
      return 1;
    case DType::kBool:
      return 1;
    case DType::kFloat16:
      return 2;
    case DType::kBFloat16:
      return 2;
  }
  throw DecodeError(DecodeErrorKind::kUnknownDType,
                    fmt::format("unknown dtype code {}", static_cast<unsigned>(d)));
}

int64_t TensorBlob::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

const TensorBlob& Message::tensor(std::string_view name) const {
  for (const auto& t : tensors)
    if (t.name == name) return t;
  throw FormatError(fmt::format("{} message (seq {}) has no tensor '{}'", type_name(type), seq,
                                std::string(name)));
}

bool Message::has_tensor(std::string_view name) const {
  for (const auto& t : tensors)
    if (t.name == name) return true;
  return false;
}

const char* decode_error_kind_name(DecodeErrorKind k) {
  switch (k) {
    case DecodeErrorKind::kTruncated:
      return "truncated";
    case DecodeErrorKind::kBadMagic:
      return "bad_magic";
    case DecodeErrorKind::kBadVersion:
      return "bad_version";
    case DecodeErrorKind::kUnknownType:
      return "unknown_type";
    case DecodeErrorKind::kLengthMismatch:
      return "length_mismatch";
    case DecodeErrorKind::kTooLarge:
      return "too_large";
    case DecodeErrorKind::kUnknownDType:
      return "unknown_dtype";
    case DecodeErrorKind::kBadShape:
      return "bad_shape";
    case DecodeErrorKind::kShapeBytesMismatch:
      return "shape_bytes_mismatch";
    case DecodeErrorKind::kTrailingBytes:
      return "trailing_bytes";
    case DecodeErrorKind::kBadMeta:
      return "bad_meta";
    case DecodeErrorKind::kCount:
      break;
  }
  return "invalid_kind";
}

uint64_t DecodeCounters::total() const {
  uint64_t t = 0;
  for (const auto& c : counts_) t += c.load();
  return t;
}

std::string DecodeCounters::summary() const {
  std::string s;
  for (int k = 0; k < static_cast<int>(DecodeErrorKind::kCount); ++k) {
    const uint64_t c = counts_[k].load();
    if (c == 0) continue;
    if (!s.empty()) s += ' ';
    s += fmt::format("{}={}", decode_error_kind_name(static_cast<DecodeErrorKind>(k)), c);
  }
  return s.empty() ? "none" : s;
}

size_t encoded_size(const Message& m) {
  size_t n = kHeaderBytes + 4 + m.meta.size() + 4;
  for (const auto& t : m.tensors)
    n += 2 + t.name.size() + 1 + 1 + 8 * t.shape.size() + 8 + t.data.size();
  return n;
}

void encode_into(const Message& m, char* out) {
  ATTNPILOT_CHECK_ARG(m.meta.size() <= std::numeric_limits<uint32_t>::max(),
                      "meta of {} bytes exceeds the u32 wire field", m.meta.size());
  ATTNPILOT_CHECK_ARG(m.tensors.size() <= std::numeric_limits<uint32_t>::max(),
                      "{} tensors exceed the u32 wire field", m.tensors.size());
  char* p = out;
  const size_t total = encoded_size(m);
  put<uint32_t>(p, kMagic);
  put<uint16_t>(p, kProtocolVersion);
  put<uint16_t>(p, static_cast<uint16_t>(m.type));
  put<uint64_t>(p, m.seq);
  put<uint64_t>(p, static_cast<uint64_t>(total - kHeaderBytes));
  put<uint32_t>(p, static_cast<uint32_t>(m.meta.size()));
  std::memcpy(p, m.meta.data(), m.meta.size());
  p += m.meta.size();
  put<uint32_t>(p, static_cast<uint32_t>(m.tensors.size()));
  for (const auto& t : m.tensors) {
    ATTNPILOT_CHECK_ARG(t.name.size() <= 0xFFFF, "tensor name of {} bytes exceeds 65535",
                        t.name.size());
    ATTNPILOT_CHECK_ARG(t.shape.size() <= 0xFF, "tensor '{}' has {} dims, at most 255 fit", t.name,
                        t.shape.size());
    ATTNPILOT_CHECK_ARG(is_known_dtype(static_cast<uint8_t>(t.dtype)),
                        "tensor '{}' has unknown dtype code {}", t.name,
                        static_cast<unsigned>(t.dtype));
    for (int64_t d : t.shape)
      ATTNPILOT_CHECK_ARG(d >= 0, "tensor '{}' has negative dim {}", t.name, d);
    const uint64_t want = static_cast<uint64_t>(t.numel()) * dtype_size(t.dtype);
    ATTNPILOT_CHECK_ARG(want == t.data.size(), "tensor '{}': shape needs {} bytes, data holds {}",
                        t.name, want, t.data.size());
    put<uint16_t>(p, static_cast<uint16_t>(t.name.size()));
    std::memcpy(p, t.name.data(), t.name.size());
    p += t.name.size();
    put<uint8_t>(p, static_cast<uint8_t>(t.dtype));
    put<uint8_t>(p, static_cast<uint8_t>(t.shape.size()));
    for (int64_t d : t.shape) put<int64_t>(p, d);
    put<uint64_t>(p, static_cast<uint64_t>(t.data.size()));
    if (!t.data.empty()) std::memcpy(p, t.data.data(), t.data.size());
    p += t.data.size();
  }
  if (static_cast<size_t>(p - out) != total) {
    throw InvalidArgument(fmt::format("encoder wrote {} bytes, expected {}", p - out, total));
  }
}

std::string encode(const Message& m) {
  std::string out(encoded_size(m), '\0');
  encode_into(m, out.data());
  return out;
}

Message decode(const void* data, size_t size, const Limits& limits) {
  if (!host_is_little_endian()) {
    throw Unavailable("the tensor payload codec assumes a little-endian host");
  }
  if (size > limits.max_message_bytes) {
    throw DecodeError(DecodeErrorKind::kTooLarge,
                      fmt::format("frame of {} bytes exceeds the limit of {} bytes", size,
                                  limits.max_message_bytes));
  }
  if (data == nullptr && size != 0) {
    throw DecodeError(DecodeErrorKind::kTruncated, "null frame");
  }
  Reader r(static_cast<const unsigned char*>(data), size);
  const uint32_t magic = r.get<uint32_t>("magic");
  if (magic != kMagic) {
    throw DecodeError(
        DecodeErrorKind::kBadMagic,
        fmt::format("bad magic 0x{:08x}, expected 0x{:08x} (\"APZ1\")", magic, kMagic));
  }
  const uint16_t version = r.get<uint16_t>("version");
  if (version != kProtocolVersion) {
    throw DecodeError(DecodeErrorKind::kBadVersion,
                      fmt::format("protocol version {} not supported, this build speaks {}",
                                  version, kProtocolVersion));
  }
  const uint16_t type = r.get<uint16_t>("type");
  if (!is_known_type(type)) {
    throw DecodeError(DecodeErrorKind::kUnknownType, fmt::format("unknown message type {}", type));
  }
  Message m;
  m.type = static_cast<MsgType>(type);
  m.seq = r.get<uint64_t>("seq");
  const uint64_t payload_len = r.get<uint64_t>("payload_length");
  if (payload_len != r.remaining()) {
    throw DecodeError(DecodeErrorKind::kLengthMismatch,
                      fmt::format("header says payload of {} bytes, frame carries {}", payload_len,
                                  r.remaining()));
  }
  const uint32_t meta_len = r.get<uint32_t>("meta_length");
  if (meta_len > limits.max_meta_bytes) {
    throw DecodeError(
        DecodeErrorKind::kTooLarge,
        fmt::format("meta of {} bytes exceeds the limit of {}", meta_len, limits.max_meta_bytes));
  }
  m.meta = r.bytes(meta_len, "meta");
  const uint32_t n_tensors = r.get<uint32_t>("tensor_count");
  if (n_tensors > limits.max_tensors) {
    throw DecodeError(DecodeErrorKind::kTooLarge, fmt::format("{} tensors exceed the limit of {}",
                                                              n_tensors, limits.max_tensors));
  }
  // Each tensor needs at least 2+1+1+8 bytes: refuse counts the frame cannot hold before
  // reserving memory for them.
  if (static_cast<uint64_t>(n_tensors) * 12 > r.remaining()) {
    throw DecodeError(
        DecodeErrorKind::kTruncated,
        fmt::format("{} tensors cannot fit in the {} remaining bytes", n_tensors, r.remaining()));
  }
  m.tensors.reserve(n_tensors);
  for (uint32_t i = 0; i < n_tensors; ++i) {
    TensorBlob t;
    const uint16_t name_len = r.get<uint16_t>("name_length");
    if (name_len > limits.max_name_bytes) {
      throw DecodeError(DecodeErrorKind::kTooLarge,
                        fmt::format("tensor {} name of {} bytes exceeds the limit of {}", i,
                                    name_len, limits.max_name_bytes));
    }
    t.name = r.bytes(name_len, "name");
    const uint8_t dtype = r.get<uint8_t>("dtype");
    if (!is_known_dtype(dtype)) {
      throw DecodeError(DecodeErrorKind::kUnknownDType,
                        fmt::format("tensor '{}' has unknown dtype code {}", t.name, dtype));
    }
    t.dtype = static_cast<DType>(dtype);
    const uint8_t ndim = r.get<uint8_t>("ndim");
    if (ndim > limits.max_ndim) {
      throw DecodeError(
          DecodeErrorKind::kBadShape,
          fmt::format("tensor '{}' has {} dims, the limit is {}", t.name, ndim, limits.max_ndim));
    }
    uint64_t numel = 1;
    t.shape.resize(ndim);
    for (uint8_t d = 0; d < ndim; ++d) {
      const int64_t dim = r.get<int64_t>("dim");
      if (dim < 0) {
        throw DecodeError(DecodeErrorKind::kBadShape,
                          fmt::format("tensor '{}' dim {} is negative ({})", t.name, d, dim));
      }
      const uint64_t ud = static_cast<uint64_t>(dim);
      if (ud != 0 && numel > limits.max_message_bytes / ud) {
        throw DecodeError(DecodeErrorKind::kBadShape,
                          fmt::format("tensor '{}' dims overflow the message size limit "
                                      "(dim {} = {})",
                                      t.name, d, dim));
      }
      numel *= ud;
      t.shape[d] = dim;
    }
    if (numel > limits.max_message_bytes / dtype_size(t.dtype)) {
      throw DecodeError(
          DecodeErrorKind::kTooLarge,
          fmt::format("tensor '{}' of {} elements exceeds the message size limit", t.name, numel));
    }
    const uint64_t want = numel * dtype_size(t.dtype);
    const uint64_t data_len = r.get<uint64_t>("data_length");
    if (data_len != want) {
      throw DecodeError(DecodeErrorKind::kShapeBytesMismatch,
                        fmt::format("tensor '{}' shape needs {} bytes, data length says {}", t.name,
                                    want, data_len));
    }
    t.data = r.bytes(data_len, "data");
    m.tensors.push_back(std::move(t));
  }
  if (r.remaining() != 0) {
    throw DecodeError(DecodeErrorKind::kTrailingBytes,
                      fmt::format("{} bytes after the last tensor", r.remaining()));
  }
  return m;
}

}  // namespace attnpilot::transport
