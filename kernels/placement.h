// Where each host shard goes among several GPUs (kernels/cuda/scanner.cc), as plain C++ so that it is tested
// without a device: shards are taken largest first (ties by index); a shard is hot on the device with the most
// hot-tier budget left when it fits there (a tie goes to the lower device), else warm (streamed from host memory)
// on the device with the fewest warm bytes so far. A pure function: thread-safe.
#ifndef RAPIDIN_KERNELS_PLACEMENT_H_
#define RAPIDIN_KERNELS_PLACEMENT_H_

#include <cstdint>
#include <vector>

namespace rapidin::kernels {

struct ShardPlace {
  int device = 0;
  bool hot = false;
};

// hot_left[d]: bytes of device d's hot tier still free. Returns one place per shard, in shard order.
// No devices: every shard is warm on device 0.
std::vector<ShardPlace> PlaceShards(const std::vector<uint64_t>& shard_bytes, std::vector<uint64_t> hot_left);

}  // namespace rapidin::kernels

#endif  // RAPIDIN_KERNELS_PLACEMENT_H_
