// Codec: round trips of every dtype and shape kind, and a corpus of malformed frames that
// must each be refused with the right DecodeErrorKind, counted, with the process running on.
#include "transport/codec.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstring>
#include <random>

#include "transport/socket.h"
#include "transport/tensor_codec.h"

namespace attnpilot::transport {
namespace {

TensorBlob random_blob(std::mt19937_64& rng, DType dt, std::vector<int64_t> shape,
                       const std::string& name) {
  TensorBlob b;
  b.name = name;
  b.dtype = dt;
  b.shape = std::move(shape);
  b.data.resize(static_cast<size_t>(b.numel()) * dtype_size(dt));
  for (auto& c : b.data) c = static_cast<char>(rng() & 0xFF);
  return b;
}

Message sample_message(std::mt19937_64& rng) {
  Message m;
  m.type = MsgType::kTrajectory;
  m.seq = rng();
  m.meta = R"({"actor":3,"version":17})";
  m.tensors.push_back(random_blob(rng, DType::kFloat32, {5, 4}, "obs"));
  m.tensors.push_back(random_blob(rng, DType::kInt64, {5}, "actions"));
  m.tensors.push_back(random_blob(rng, DType::kBool, {5}, "done"));
  return m;
}

void expect_equal(const Message& a, const Message& b) {
  EXPECT_EQ(a.type, b.type);
  EXPECT_EQ(a.seq, b.seq);
  EXPECT_EQ(a.meta, b.meta);
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (size_t i = 0; i < a.tensors.size(); ++i) {
    EXPECT_EQ(a.tensors[i].name, b.tensors[i].name);
    EXPECT_EQ(a.tensors[i].dtype, b.tensors[i].dtype);
    EXPECT_EQ(a.tensors[i].shape, b.tensors[i].shape);
    EXPECT_EQ(a.tensors[i].data, b.tensors[i].data);
  }
}

DecodeErrorKind kind_of(const std::string& frame, const Limits& lim = {}) {
  try {
    decode(frame.data(), frame.size(), lim);
  } catch (const DecodeError& e) {
    return e.kind();
  }
  ADD_FAILURE() << "frame of " << frame.size() << " bytes was accepted";
  return DecodeErrorKind::kCount;
}

// Little-endian field writers for hand-made malformed frames.
void put_u(std::string& s, size_t off, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) s[off + i] = static_cast<char>((v >> (8 * i)) & 0xFF);
}

TEST(Codec, RoundTripsEveryDtypeAndShapeKind) {
  std::mt19937_64 rng(1234);
  const DType all[] = {DType::kFloat32, DType::kFloat64, DType::kInt32,   DType::kInt64,
                       DType::kUInt8,   DType::kBool,    DType::kFloat16, DType::kBFloat16};
  for (int trial = 0; trial < 50; ++trial) {
    Message m;
    m.type = static_cast<MsgType>(1 + rng() % static_cast<uint16_t>(MsgType::kPing));
    m.seq = rng();
    m.meta = trial % 3 == 0 ? "" : fmt::format(R"({{"trial":{}}})", trial);
    const int nt = static_cast<int>(rng() % 5);
    for (int i = 0; i < nt; ++i) {
      const int ndim = static_cast<int>(rng() % 4);  // 0 = scalar
      std::vector<int64_t> shape;
      for (int d = 0; d < ndim; ++d) shape.push_back(static_cast<int64_t>(rng() % 6));  // 0 ok
      m.tensors.push_back(random_blob(rng, all[rng() % 8], shape, fmt::format("t{}", i)));
    }
    const std::string wire = encode(m);
    ASSERT_EQ(wire.size(), encoded_size(m));
    const Message back = decode(wire.data(), wire.size());
    expect_equal(m, back);
    EXPECT_EQ(encode(back), wire);
  }
}

TEST(Codec, TorchTensorsRoundTripExactly) {
  torch::manual_seed(7);
  std::vector<torch::Tensor> ts = {
      torch::randn({3, 4}),
      torch::randn({2, 3, 2}, torch::kFloat64),
      torch::randint(-1000, 1000, {7}, torch::kInt64),
      torch::randint(0, 255, {4, 4}, torch::kUInt8),
      torch::rand({5}) > 0.5,
      torch::randn({6}).to(torch::kBFloat16),
      torch::randn({6}).to(torch::kFloat16),
      torch::randn({4, 6}).t(),  // non-contiguous
      torch::tensor(3.5f),       // scalar
  };
  Message m;
  m.type = MsgType::kWeights;
  for (size_t i = 0; i < ts.size(); ++i) m.tensors.push_back(to_blob(fmt::format("p{}", i), ts[i]));
  const std::string wire = encode(m);
  const Message back = decode(wire.data(), wire.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    const torch::Tensor t = to_torch(back.tensors[i]);
    EXPECT_EQ(t.scalar_type(), ts[i].scalar_type());
    EXPECT_TRUE(torch::equal(t, ts[i].contiguous())) << "tensor " << i;
  }
  EXPECT_THROW(to_blob("c", torch::randn({2}, torch::kComplexFloat)), InvalidArgument);
}

TEST(Codec, EncodeRefusesInconsistentBlobs) {
  Message m;
  TensorBlob b;
  b.name = "x";
  b.shape = {3};
  b.data = std::string(8, '\0');  // float32 x3 needs 12
  m.tensors.push_back(b);
  EXPECT_THROW(encode(m), InvalidArgument);
  m.tensors[0].shape = {-1};
  EXPECT_THROW(encode(m), InvalidArgument);
}

TEST(Codec, MalformedFramesGetTheRightErrorKind) {
  std::mt19937_64 rng(99);
  const std::string good = encode(sample_message(rng));
  // Offsets in `good`: header 24, meta len 4 at 24, meta (24 bytes) at 28, count at 52,
  // first tensor at 56: name len(2) "obs"(3) dtype@61 ndim@62 dims@63..79 datalen@79.
  const size_t meta_len = sample_message(rng).meta.size();
  const size_t t0 = 24 + 4 + meta_len + 4;
  const size_t dtype_off = t0 + 2 + 3, ndim_off = dtype_off + 1, dim0_off = ndim_off + 1;
  const size_t datalen_off = dim0_off + 16;

  std::string s = good;
  s[0] = 'X';
  EXPECT_EQ(kind_of(s), DecodeErrorKind::kBadMagic);

  s = good;
  put_u(s, 4, 2, 2);
  EXPECT_EQ(kind_of(s), DecodeErrorKind::kBadVersion);
  put_u(s, 4, 0, 2);
  EXPECT_EQ(kind_of(s), DecodeErrorKind::kBadVersion);

  s = good;
  put_u(s, 6, 999, 2);
  EXPECT_EQ(kind_of(s), DecodeErrorKind::kUnknownType);
  put_u(s, 6, 0, 2);
  EXPECT_EQ(kind_of(s), DecodeErrorKind::kUnknownType);

  s = good;
  put_u(s, 16, ~0ull, 8);  // huge payload length
  EXPECT_EQ(kind_of(s), DecodeErrorKind::kLengthMismatch);

  s = good;
  put_u(s, 24, 0xFFFFFFFFull, 4);  // huge meta length
  EXPECT_EQ(kind_of(s), DecodeErrorKind::kTooLarge);
  put_u(s, 24, 1000, 4);  // within limits but beyond the frame
  EXPECT_EQ(kind_of(s), DecodeErrorKind::kTruncated);

  s = good;
  put_u(s, t0 - 4, 0xFFFFFFFFull, 4);  // huge tensor count
  EXPECT_EQ(kind_of(s), DecodeErrorKind::kTooLarge);
  put_u(s, t0 - 4, 4000, 4);  // allowed count, cannot fit
  EXPECT_EQ(kind_of(s), DecodeErrorKind::kTruncated);

  s = good;
  s[dtype_off] = static_cast<char>(77);
  EXPECT_EQ(kind_of(s), DecodeErrorKind::kUnknownDType);
  s[dtype_off] = 0;
  EXPECT_EQ(kind_of(s), DecodeErrorKind::kUnknownDType);

  s = good;
  s[ndim_off] = static_cast<char>(200);
  EXPECT_EQ(kind_of(s), DecodeErrorKind::kBadShape);

  s = good;
  put_u(s, dim0_off, static_cast<uint64_t>(-5), 8);  // negative dim
  EXPECT_EQ(kind_of(s), DecodeErrorKind::kBadShape);
  put_u(s, dim0_off, 1ull << 62, 8);  // dims whose product overflows
  put_u(s, dim0_off + 8, 1ull << 62, 8);
  EXPECT_EQ(kind_of(s), DecodeErrorKind::kBadShape);

  s = good;
  put_u(s, dim0_off, 6, 8);  // shape now 6x4 floats = 96 bytes, data says 80
  EXPECT_EQ(kind_of(s), DecodeErrorKind::kShapeBytesMismatch);
  s = good;
  put_u(s, datalen_off, ~0ull, 8);  // huge data length
  EXPECT_EQ(kind_of(s), DecodeErrorKind::kShapeBytesMismatch);

  s = good + "xyz";  // trailing bytes, header length fixed up to match
  put_u(s, 16, s.size() - 24, 8);
  EXPECT_EQ(kind_of(s), DecodeErrorKind::kTrailingBytes);

  Limits small;
  small.max_message_bytes = 64;
  EXPECT_EQ(kind_of(good, small), DecodeErrorKind::kTooLarge);
}

TEST(Codec, EveryTruncationIsRefused) {
  std::mt19937_64 rng(5);
  const std::string good = encode(sample_message(rng));
  for (size_t n = 0; n < good.size(); ++n) {
    std::string s = good.substr(0, n);
    const auto k = kind_of(s);
    EXPECT_TRUE(k == DecodeErrorKind::kTruncated || k == DecodeErrorKind::kLengthMismatch)
        << "length " << n << " gave " << decode_error_kind_name(k);
    // Also with the header's payload length patched to match the truncated frame.
    if (n >= kHeaderBytes) {
      put_u(s, 16, n - kHeaderBytes, 8);
      const auto k2 = kind_of(s);
      EXPECT_NE(k2, DecodeErrorKind::kCount) << "length " << n;
    }
  }
}

TEST(Codec, RandomBytesAndBitFlipsNeverCrash) {
  std::mt19937_64 rng(2026);
  const std::string good = encode(sample_message(rng));
  int refused = 0, accepted = 0;
  for (int i = 0; i < 3000; ++i) {
    std::string s;
    if (i % 2 == 0) {
      s.resize(rng() % 200);
      for (auto& c : s) c = static_cast<char>(rng() & 0xFF);
      if (i % 4 == 0 && s.size() >= 8) std::memcpy(s.data(), good.data(), 8);  // valid start
    } else {
      s = good;
      const int flips = 1 + static_cast<int>(rng() % 4);
      for (int f = 0; f < flips; ++f) s[rng() % s.size()] ^= static_cast<char>(1 << (rng() % 8));
    }
    try {
      const Message m = decode(s.data(), s.size());
      ++accepted;  // a flip inside data bytes, meta text or seq leaves a valid frame
      EXPECT_EQ(encode(m), s);
    } catch (const DecodeError&) {
      ++refused;
    }
  }
  EXPECT_GT(refused, 1500);
  EXPECT_EQ(refused + accepted, 3000);
}

TEST(Codec, MalformedFramesOnASocketAreCountedAndTheReceiverCarriesOn) {
  zmq::context_t ctx;
  SocketOptions opts;
  Socket server(ctx, zmq::socket_type::router, opts, "test-server");
  server.bind("inproc://codec-corpus");
  Socket client(ctx, zmq::socket_type::dealer, opts, "test-client");
  client.connect("inproc://codec-corpus");

  std::mt19937_64 rng(3);
  const std::string good = encode(sample_message(rng));
  std::vector<std::string> corpus;
  corpus.push_back("");                   // empty
  corpus.push_back("random bytes here");  // bad magic
  corpus.push_back(good.substr(0, 30));   // truncated
  std::string v = good;
  put_u(v, 4, 9, 2);
  corpus.push_back(v);  // wrong version
  v = good;
  put_u(v, 16, 1ull << 40, 8);
  corpus.push_back(v);  // huge length
  for (const auto& c : corpus) ASSERT_TRUE(client.send_raw(c, 1000));
  Message ok = sample_message(rng);
  ASSERT_TRUE(client.send(ok, 1000));

  int received = 0;
  for (int i = 0; i < 50 && received == 0; ++i) {
    auto r = server.recv(100);
    if (r) {
      expect_equal(r->msg, ok);
      ASSERT_EQ(r->envelope.size(), 1u);
      ++received;
    }
  }
  EXPECT_EQ(received, 1);
  EXPECT_EQ(server.counters().total(), corpus.size());
  EXPECT_EQ(server.counters().count(DecodeErrorKind::kBadMagic), 1u);
  EXPECT_EQ(server.counters().count(DecodeErrorKind::kBadVersion), 1u);
  // 30-byte prefix: the header survives and its payload length no longer matches.
  EXPECT_EQ(server.counters().count(DecodeErrorKind::kLengthMismatch), 2u);
  EXPECT_EQ(server.counters().count(DecodeErrorKind::kTruncated), 1u);  // empty frame
}

TEST(Codec, MetaHelpersRefuseBadJson) {
  Message m;
  m.type = MsgType::kHello;
  m.meta = "{not json";
  EXPECT_THROW(parse_meta(m), DecodeError);
  m.meta = "[1,2]";
  EXPECT_THROW(parse_meta(m), DecodeError);
  m.meta = R"({"actor":"three"})";
  const auto j = parse_meta(m);
  EXPECT_THROW(meta_get<int64_t>(j, "actor", m), DecodeError);
  EXPECT_THROW(meta_get<int64_t>(j, "absent", m), DecodeError);
}

}  // namespace
}  // namespace attnpilot::transport
