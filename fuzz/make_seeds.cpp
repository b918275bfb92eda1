// Writes a few valid frames into the fuzz seed corpus folder given as argv[1].
#include <fstream>
#include <iostream>
#include <string>

#include "transport/codec.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: make_seeds DIR\n";
    return 2;
  }
  using namespace attnpilot::transport;
  for (int i = 0; i < 4; ++i) {
    Message m;
    m.type = static_cast<MsgType>(1 + i * 3);
    m.seq = static_cast<uint64_t>(i) * 1000 + 7;
    m.meta = i % 2 ? R"({"actor":1,"version":2})" : "";
    for (int t = 0; t < i; ++t) {
      TensorBlob b;
      b.name = "t" + std::to_string(t);
      b.dtype = static_cast<DType>(1 + t);
      b.shape = {2, t + 1};
      b.data.assign(static_cast<size_t>(b.numel()) * dtype_size(b.dtype), static_cast<char>(t));
      m.tensors.push_back(b);
    }
    std::ofstream(std::string(argv[1]) + "/seed" + std::to_string(i), std::ios::binary)
        << encode(m);
  }
  return 0;
}
