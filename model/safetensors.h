#pragma once
/// Our own safetensors reader and writer (https://github.com/huggingface/safetensors).
///
///   ┌──────────┬──────────────────────────────┬───────────────────────────────┐
///   │ u64 LE N │ N bytes UTF-8 JSON object     │ data area: tensors back to back│
///   └──────────┴──────────────────────────────┴───────────────────────────────┘
///   header: {"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [b, e]}, ...,
///            "__metadata__": {"k": "v"}}      (offsets relative to the data area)
///
/// The reader checks every rule below before reading any tensor data and refuses a
/// violation with SafetensorsError naming the file, the tensor and the rule.
#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "common/error.h"

namespace attnpilot::model {

/// Tensor element types we read and write. Anything else (I64, F64, BOOL, ...) is refused.
enum class Dtype { kF32, kF16, kBF16 };

/// "F32" | "F16" | "BF16".
const char* dtype_name(Dtype d);
/// Bytes per element.
int64_t dtype_size(Dtype d);
torch::ScalarType to_scalar_type(Dtype d);

/// Which rule a file or checkpoint broke.
enum class SafetensorsRule {
  kTruncated,         ///< shorter than the 8-byte header length
  kHeaderTooLarge,    ///< header length above kMaxHeaderBytes
  kHeaderPastEnd,     ///< header length runs past the end of the file
  kHeaderNotUtf8,     ///< header bytes are not valid UTF-8
  kHeaderNotJson,     ///< header is not parseable JSON
  kHeaderNotObject,   ///< header JSON is not an object, or an entry is not an object
  kDuplicateName,     ///< a tensor name appears twice
  kBadEntry,          ///< an entry lacks dtype/shape/data_offsets or has mistyped fields
  kUnsupportedDtype,  ///< dtype other than F32, F16, BF16
  kNegativeDim,       ///< a shape entry below zero
  kSizeOverflow,      ///< numel × element size does not fit in 64 bits
  kSpanMismatch,      ///< end − begin differs from numel × element size
  kOffsetsPastEnd,    ///< a tensor's bytes lie beyond the data area
  kOverlap,           ///< two tensors share bytes
  kGap,               ///< unused bytes between tensors or at the end of the data area
  kBadMetadata,       ///< __metadata__ is not an object of strings
  kMissingTensor,     ///< a tensor the model config requires is absent
  kWrongShape,        ///< a tensor's shape differs from what the config requires
  kUnexpectedTensor,  ///< a tensor the model does not have
};

/// Short name of a rule ("overlap", "span_mismatch", ...).
const char* rule_name(SafetensorsRule r);

/// A safetensors file (or a checkpoint's tensor set) that breaks a rule.
class SafetensorsError : public FormatError {
 public:
  SafetensorsError(SafetensorsRule rule, std::string file, std::string tensor,
                   const std::string& detail);
  SafetensorsRule rule() const { return rule_; }
  const std::string& file() const { return file_; }
  /// The tensor concerned; empty for whole-file rules.
  const std::string& tensor() const { return tensor_; }

 private:
  SafetensorsRule rule_;
  std::string file_, tensor_;
};

/// Largest header accepted (100 MB, as the reference implementation).
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

/// One header entry.
struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  ///< byte offsets in the data area
  int64_t numel() const;
};

/// A validated header: entries sorted by begin offset, metadata, where data starts.
struct SafetensorsHeader {
  std::vector<TensorInfo> tensors;
  std::map<std::string, std::string> metadata;
  uint64_t data_start = 0;  ///< 8 + header length
  uint64_t data_size = 0;   ///< file size − data_start
  /// The entry called `name`, or nullptr.
  const TensorInfo* find(const std::string& name) const;
};

/// Validates the first bytes of a file (`file_size` is the whole file's size; `prefix`
/// must hold at least min(file_size, 8 + header length) bytes). `origin` names the file
/// in messages. Throws SafetensorsError.
SafetensorsHeader parse_header(const std::string& prefix, uint64_t file_size,
                               const std::string& origin);

/// Reads and validates only the header of a file. Throws IoError / SafetensorsError.
SafetensorsHeader read_header(const std::filesystem::path& path);

/// A whole file: tensors (CPU, the file's dtype) in header order by offset.
struct SafetensorsFile {
  SafetensorsHeader header;
  std::map<std::string, torch::Tensor> tensors;
};

/// Reads and validates a file. Throws IoError / SafetensorsError.
SafetensorsFile read_safetensors(const std::filesystem::path& path);

/// Serialises tensors (any device; F32, F16 or BF16; written contiguous, little-endian)
/// to safetensors bytes, entries laid out in the given order, header padded with spaces
/// to a multiple of 8. Throws InvalidArgument for another dtype, an empty or duplicate
/// name, or the reserved name "__metadata__".
std::string serialize_safetensors(const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                                  const std::map<std::string, std::string>& metadata = {});

/// serialize_safetensors written atomically (common/atomic_file.h).
void write_safetensors(const std::filesystem::path& path,
                       const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

/// True when every byte is part of a well-formed UTF-8 sequence (no overlongs, no
/// surrogates, nothing above U+10FFFF).
bool is_valid_utf8(const std::string& s);

}  // namespace attnpilot::model
