#pragma once
/// Wire format of every attnpilot ZeroMQ message, independent of LibTorch (the fuzz target
/// builds this file alone).
///
///   offset  size  field
///   0       4     magic "APZ1" (bytes 0x41 0x50 0x5A 0x31)
///   4       2     protocol version (little-endian u16, kProtocolVersion)
///   6       2     message type (MsgType, u16)
///   8       8     sequence number (u64)
///   16      8     payload length in bytes (u64), must equal frame size - 24
///   24      ...   payload:
///                   u32 meta length, meta bytes (UTF-8 JSON text, may be empty)
///                   u32 tensor count, then per tensor:
///                     u16 name length, name bytes
///                     u8 dtype (DType), u8 ndim, ndim x i64 dims
///                     u64 data length, data bytes (row-major, little-endian)
///
/// Decoding is strict: every length is bounded by `Limits` and by the bytes that remain,
/// products of dims are overflow-checked, dims x element size must equal the data
/// length, unknown types/dtypes/versions and trailing bytes are refused. Errors are
/// `DecodeError` (a FormatError) carrying a `DecodeErrorKind`; `DecodeCounters` counts
/// them so a server can log and carry on.
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/error.h"

namespace attnpilot::transport {

inline constexpr uint32_t kMagic = 0x315A5041u;  // "APZ1" little-endian
inline constexpr uint16_t kProtocolVersion = 1;
inline constexpr size_t kHeaderBytes = 24;

/// Every message type of the protocol. Values are part of the wire format.
enum class MsgType : uint16_t {
  kHello = 1,        ///< actor -> learner: actor id, next sequence number it will use
  kWelcome = 2,      ///< learner -> actor: accepted, next expected sequence number
  kTrajectory = 3,   ///< actor -> learner: one rollout chunk tagged with policy version
  kAck = 4,          ///< learner -> actor: trajectory seq accepted / duplicate / stale
  kWeights = 5,      ///< learner -> actor: policy parameters with a version
  kSpecRequest = 6,  ///< client -> env-server
  kSpecReply = 7,
  kResetRequest = 8,
  kResetReply = 9,
  kStepRequest = 10,
  kStepReply = 11,
  kError = 12,     ///< any direction: a typed error with a message in meta
  kShutdown = 13,  ///< learner -> actor: training finished, stop
  kPing = 14,      ///< benchmark / liveness echo
};

/// True for the values listed in MsgType.
bool is_known_type(uint16_t t);
/// Lower-case name of a type ("trajectory"), or "unknown(N)".
std::string type_name(MsgType t);

/// Element types of tensor payloads. Values are part of the wire format.
enum class DType : uint8_t {
  kFloat32 = 1,
  kFloat64 = 2,
  kInt32 = 3,
  kInt64 = 4,
  kUInt8 = 5,
  kBool = 6,
  kFloat16 = 7,
  kBFloat16 = 8,
};

/// Bytes per element; throws DecodeError(kUnknownDType) for values not in DType.
size_t dtype_size(DType d);
bool is_known_dtype(uint8_t d);

/// One named tensor: dtype, shape and its row-major bytes.
struct TensorBlob {
  std::string name;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  std::string data;
  /// Product of shape (1 for a scalar).
  int64_t numel() const;
};

/// A decoded message.
struct Message {
  MsgType type = MsgType::kPing;
  uint64_t seq = 0;
  std::string meta;  ///< JSON text (possibly empty)
  std::vector<TensorBlob> tensors;

  /// The tensor called `name`; throws FormatError naming it when absent.
  const TensorBlob& tensor(std::string_view name) const;
  bool has_tensor(std::string_view name) const;
};

/// Bounds applied by decode. The defaults admit a 10 M parameter fp32 policy plus slack.
struct Limits {
  uint64_t max_message_bytes = 256ull << 20;  ///< whole frame, also ZMQ_MAXMSGSIZE
  uint32_t max_meta_bytes = 1u << 20;
  uint32_t max_tensors = 4096;
  uint16_t max_name_bytes = 256;
  uint8_t max_ndim = 8;
};

/// What was wrong with a frame.
enum class DecodeErrorKind : int {
  kTruncated = 0,       ///< fewer bytes than a field needs
  kBadMagic,            ///< not an attnpilot frame
  kBadVersion,          ///< protocol version we do not speak
  kUnknownType,         ///< message type not in MsgType
  kLengthMismatch,      ///< header payload length differs from the frame
  kTooLarge,            ///< a length above Limits
  kUnknownDType,        ///< dtype not in DType
  kBadShape,            ///< negative dim, too many dims, or dims overflow
  kShapeBytesMismatch,  ///< dims x element size differs from data length
  kTrailingBytes,       ///< bytes left after the last tensor
  kBadMeta,             ///< meta is not the JSON the message type needs
  kCount
};
const char* decode_error_kind_name(DecodeErrorKind k);

/// A frame that does not follow the wire format.
class DecodeError : public FormatError {
 public:
  DecodeError(DecodeErrorKind kind, const std::string& what) : FormatError(what), kind_(kind) {}
  DecodeErrorKind kind() const { return kind_; }

 private:
  DecodeErrorKind kind_;
};

/// Thread-safe counters of refused frames, one per DecodeErrorKind.
class DecodeCounters {
 public:
  void add(DecodeErrorKind k) { counts_[static_cast<int>(k)].fetch_add(1); }
  uint64_t count(DecodeErrorKind k) const { return counts_[static_cast<int>(k)].load(); }
  uint64_t total() const;
  /// "truncated=2 bad_magic=1" (non-zero kinds only).
  std::string summary() const;

 private:
  std::array<std::atomic<uint64_t>, static_cast<int>(DecodeErrorKind::kCount)> counts_{};
};

/// Serialises a message. Throws InvalidArgument if a tensor's bytes do not match its shape
/// or a field exceeds the wire format (names > 65535 bytes, ndim > 255).
std::string encode(const Message& m);
/// Size `encode(m)` will produce.
size_t encoded_size(const Message& m);
/// Writes the encoding into `out` (which must hold encoded_size(m) bytes).
void encode_into(const Message& m, char* out);

/// Parses and validates one frame. Throws DecodeError.
Message decode(const void* data, size_t size, const Limits& limits = {});

}  // namespace attnpilot::transport
