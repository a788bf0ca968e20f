// Numbering group ids by first appearance: an open-addressing hash table shared by the integer-id op
// (ops/group_advantages.cpp) and the Python-object path (module.cpp).
#pragma once

#include <cstdint>
#include <vector>

namespace spear_kernels {

// Open-addressing table from a key to its group number (first appearance order). Keys are
// hashed once; equal hashes are confirmed with `equal`.
template <typename Key, typename Hash, typename Equal>
int64_t assign_groups(int64_t n, Key (*key_at)(const void*, int64_t), const void* src, Hash hash, Equal equal,
                      int64_t* out) {
  struct Slot {
    Key key;
    uint64_t hash;
    int64_t group;  // -1: empty
  };
  int64_t capacity = 16;
  while (capacity < 2 * n) capacity <<= 1;
  std::vector<Slot> table(capacity, Slot{Key{}, 0, -1});
  const uint64_t mask = static_cast<uint64_t>(capacity - 1);
  int64_t groups = 0;
  for (int64_t i = 0; i < n; ++i) {
    const Key key = key_at(src, i);
    const uint64_t h = hash(key);
    uint64_t slot = (h * 0x9E3779B97F4A7C15ull) >> 7 & mask;
    while (true) {
      Slot& e = table[slot];
      if (e.group < 0) {
        e = Slot{key, h, groups++};
        out[i] = e.group;
        break;
      }
      if (e.hash == h && equal(e.key, key)) {
        out[i] = e.group;
        break;
      }
      slot = (slot + 1) & mask;
    }
  }
  return groups;
}

}  // namespace spear_kernels
