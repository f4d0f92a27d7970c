// Internal: the 64-bit checksum ftcomm uses for transfers and blob files. Not
// cryptographic; it catches corrupted bytes. Four independent lanes keep the
// multiplies pipelined (~3x a single-lane loop).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace ftcomm::detail {

inline uint64_t mix64(uint64_t h) {
  h ^= h >> 33;
  h *= 0xFF51AFD7ED558CCDull;
  h ^= h >> 33;
  h *= 0xC4CEB9FE1A85EC53ull;
  return h ^ (h >> 33);
}

inline uint64_t checksum64(const void* data, size_t n, uint64_t seed = 0) {
  const auto* p = static_cast<const uint8_t*>(data);
  uint64_t lane[4] = {seed ^ 0x9E3779B97F4A7C15ull, seed + n, ~seed, seed ^ 0x632BE59BD9B4E019ull};
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int k = 0; k < 4; ++k) {
      uint64_t w;
      std::memcpy(&w, p + i + 8 * k, 8);
      lane[k] = (lane[k] ^ w) * 0x9FB21C651E98DF25ull;
      lane[k] ^= lane[k] >> 29;
    }
  }
  uint64_t h = mix64(lane[0]) ^ (mix64(lane[1]) * 3) ^ (mix64(lane[2]) * 5) ^ (mix64(lane[3]) * 7);
  for (; i < n; ++i) {
    h = (h ^ p[i]) * 0x100000001B3ull;
  }
  return mix64(h ^ n);
}

}  // namespace ftcomm::detail
