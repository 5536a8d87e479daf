// 64-bit FNV-1a: a stable, platform-independent hash of bytes (offset basis
// 0xcbf29ce484222325, prime 0x100000001b3). Not cryptographic; used to key random streams by
// name and to derive run ids from canonical config text.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace ql {

inline uint64_t fnv1a64(std::string_view bytes) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return h;
}

}  // namespace ql
