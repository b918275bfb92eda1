// libFuzzer target for the transport decoder: any input must either decode into a message
// whose re-encoding is byte-identical (the format is canonical), or be refused with a
// DecodeError. Any other exception, crash, leak or sanitizer report is a bug.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "transport/codec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace attnpilot::transport;
  Limits lim;
  lim.max_message_bytes = 1 << 20;  // keep allocations small while fuzzing
  try {
    const Message m = decode(data, size, lim);
    const std::string again = encode(m);
    if (again.size() != size ||
        again.compare(0, size, reinterpret_cast<const char*>(data), size) != 0)
      std::abort();
  } catch (const DecodeError&) {
  }
  return 0;
}
