#include "attention/kv_cache.h"

#include <algorithm>

#include "common/error.h"
#include "common/tensor_str.h"

namespace attnpilot::attention {
namespace {

/// Writes x [B, H, T, e] at positions [len, len+T) of buf, growing capacity by doubling.
void put(torch::Tensor& buf, int64_t len, const torch::Tensor& x) {
  const int64_t need = len + x.size(2);
  if (!buf.defined() || buf.size(2) < need) {
    const int64_t cap = std::max<int64_t>(need, buf.defined() ? 2 * buf.size(2) : need);
    auto grown = torch::empty({x.size(0), x.size(1), cap, x.size(3)}, x.options());
    if (len > 0) grown.narrow(2, 0, len).copy_(buf.narrow(2, 0, len));
    buf = grown;
  }
  buf.narrow(2, len, x.size(2)).copy_(x);
}

}  // namespace

KVCache::KVCache(int64_t num_layers) {
  ATTNPILOT_CHECK_ARG(num_layers >= 1, "KVCache: num_layers {} must be >= 1", num_layers);
  layers_.resize(static_cast<size_t>(num_layers));
}

const KVCache::Slot& KVCache::slot(int64_t layer) const {
  ATTNPILOT_CHECK_ARG(layer >= 0 && layer < num_layers(), "KVCache: layer {} outside [0, {})",
                      layer, num_layers());
  return layers_[static_cast<size_t>(layer)];
}

KVCache::Slot& KVCache::slot(int64_t layer) {
  return const_cast<Slot&>(static_cast<const KVCache*>(this)->slot(layer));
}

void KVCache::append(int64_t layer, const torch::Tensor& k_new, const torch::Tensor& v_new) {
  Slot& s = slot(layer);
  ATTNPILOT_CHECK_ARG(k_new.dim() == 4 && v_new.dim() == 4 && k_new.size(0) == v_new.size(0) &&
                          k_new.size(1) == v_new.size(1) && k_new.size(2) == v_new.size(2),
                      "KVCache: layer {}: k_new {} and v_new {} must be [B, Hkv, T, ·] alike",
                      layer, shape_str(k_new), shape_str(v_new));
  if (s.v.defined())
    ATTNPILOT_CHECK_ARG(v_new.size(0) == s.v.size(0) && v_new.size(1) == s.v.size(1) &&
                            v_new.size(3) == s.v.size(3),
                        "KVCache: layer {}: appended values {} do not match cached [{}, {}, ·, {}]",
                        layer, shape_str(v_new), s.v.size(0), s.v.size(1), s.v.size(3));
  if (s.kp.defined()) {
    const int64_t hq = s.a_k.size(1);
    ATTNPILOT_CHECK_ARG(k_new.size(3) == s.a_k.size(2),
                        "KVCache: layer {}: key dim {} != projection dim {}", layer, k_new.size(3),
                        s.a_k.size(2));
    const auto k_exp = k_new.repeat_interleave(hq / k_new.size(1), 1);
    put(s.kp, s.len, torch::matmul(k_exp, s.a_k));
  } else {
    if (s.k.defined())
      ATTNPILOT_CHECK_ARG(k_new.size(3) == s.k.size(3), "KVCache: layer {}: key dim {} != {}",
                          layer, k_new.size(3), s.k.size(3));
    put(s.k, s.len, k_new);
  }
  put(s.v, s.len, v_new);
  s.len += k_new.size(2);
}

void KVCache::compress_keys(int64_t layer, const torch::Tensor& a_q, const torch::Tensor& a_k) {
  Slot& s = slot(layer);
  ATTNPILOT_CHECK_ARG(!s.kp.defined(), "KVCache: layer {} is already low-rank", layer);
  ATTNPILOT_CHECK_ARG(a_q.dim() == 4 && a_q.sizes() == a_k.sizes(),
                      "KVCache: a_q {} and a_k {} must both be [B, Hq, d, r]", shape_str(a_q),
                      shape_str(a_k));
  if (s.k.defined())
    ATTNPILOT_CHECK_ARG(
        a_q.size(0) == s.k.size(0) && a_q.size(1) % s.k.size(1) == 0 && a_q.size(2) == s.k.size(3),
        "KVCache: layer {}: projections {} do not fit keys [{}, {}, ·, {}]", layer, shape_str(a_q),
        s.k.size(0), s.k.size(1), s.k.size(3));
  s.a_q = a_q;
  s.a_k = a_k;
  if (s.len > 0) {
    const auto k = s.k.narrow(2, 0, s.len);
    const auto k_exp = k.repeat_interleave(a_k.size(1) / k.size(1), 1);
    s.kp = torch::Tensor();
    put(s.kp, 0, torch::matmul(k_exp, a_k));
  } else {
    // Empty: the first append creates the buffer; mark low-rank mode with an empty one.
    s.kp = torch::empty({a_k.size(0), a_k.size(1), 0, a_k.size(3)}, a_k.options());
  }
  s.k = torch::Tensor();
}

AttentionInputs KVCache::inputs(int64_t layer, const torch::Tensor& q) const {
  const Slot& s = slot(layer);
  ATTNPILOT_CHECK_ARG(s.len >= 1, "KVCache: layer {} is empty", layer);
  ATTNPILOT_CHECK_ARG(q.dim() == 4 && q.size(2) <= s.len,
                      "KVCache: layer {}: {} queries but {} cached positions", layer,
                      q.dim() == 4 ? q.size(2) : -1, s.len);
  AttentionInputs in;
  in.q = q;
  in.v = values(layer);
  in.causal = true;
  in.q_offset = s.len - q.size(2);
  in.layer = layer;
  if (s.kp.defined()) {
    in.k_proj = key_proj(layer);
    in.a_q = s.a_q;
  } else {
    in.k = keys(layer);
  }
  return in;
}

int64_t KVCache::length(int64_t layer) const { return slot(layer).len; }
bool KVCache::lowrank(int64_t layer) const { return slot(layer).kp.defined(); }

torch::Tensor KVCache::keys(int64_t layer) const {
  const Slot& s = slot(layer);
  return s.k.defined() ? s.k.narrow(2, 0, s.len) : torch::Tensor();
}
torch::Tensor KVCache::values(int64_t layer) const {
  const Slot& s = slot(layer);
  return s.v.defined() ? s.v.narrow(2, 0, s.len) : torch::Tensor();
}
torch::Tensor KVCache::key_proj(int64_t layer) const {
  const Slot& s = slot(layer);
  return s.kp.defined() ? s.kp.narrow(2, 0, s.len) : torch::Tensor();
}

double KVCache::key_bytes(int64_t layer) const {
  const Slot& s = slot(layer);
  const auto& t = s.kp.defined() ? s.kp : s.k;
  if (!t.defined() || s.len == 0) return 0;
  return static_cast<double>(t.element_size()) * t.size(0) * t.size(1) * s.len * t.size(3);
}
double KVCache::value_bytes(int64_t layer) const {
  const Slot& s = slot(layer);
  if (!s.v.defined() || s.len == 0) return 0;
  return static_cast<double>(s.v.element_size()) * s.v.size(0) * s.v.size(1) * s.len * s.v.size(3);
}

void KVCache::clear() {
  for (auto& s : layers_) s = Slot{};
}

}  // namespace attnpilot::attention
