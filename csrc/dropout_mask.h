// The counter-based dropout mask of fastpeft/mask.py, bit for bit.
//
//   mix32(v):  v ^= v >> 16; v *= 0x7FEB352D; v ^= v >> 15; v *= 0x846CA68B; v ^= v >> 16
//   h    = mix32(mix32(off_lo ^ key_lo) ^ (off_hi * 0x9E3779B9 + key_hi))
//   keep = h >= floor(p * 2^32)
//
// offset = m * K + k in x viewed as [M, K], so the backward regenerates exactly the forward's mask.
// Everything is plain uint32 arithmetic, which the compiler vectorises inside the loops below.
#pragma once

#include <cstdint>

namespace fastpeft {

inline uint32_t mix32(uint32_t v) {
  v ^= v >> 16;
  v *= 0x7FEB352Du;
  v ^= v >> 15;
  v *= 0x846CA68Bu;
  v ^= v >> 16;
  return v;
}

struct DropoutKey {
  uint32_t key_lo, key_hi, threshold;

  DropoutKey(int64_t seed, double p)
      : key_lo(static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xFFFFFFFFull)),
        key_hi(static_cast<uint32_t>((static_cast<uint64_t>(seed) >> 32) & 0xFFFFFFFFull)),
        // Same double arithmetic as Python's int(float(p) * 4294967296.0); p < 1 fits 32 bits.
        threshold(static_cast<uint32_t>(static_cast<uint64_t>(p * 4294967296.0))) {}

  inline bool keep(uint64_t offset) const {
    uint32_t h = mix32(static_cast<uint32_t>(offset) ^ key_lo);
    h = mix32(h ^ (static_cast<uint32_t>(offset >> 32) * 0x9E3779B9u + key_hi));
    return h >= threshold;
  }
};

}  // namespace fastpeft
