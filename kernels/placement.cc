#include "kernels/placement.h"

#include <algorithm>

namespace rapidin::kernels {

std::vector<ShardPlace> PlaceShards(const std::vector<uint64_t>& shard_bytes, std::vector<uint64_t> hot_left) {
  std::vector<ShardPlace> out(shard_bytes.size());
  if (hot_left.empty()) return out;
  std::vector<uint64_t> warm(hot_left.size(), 0);
  std::vector<int> order(shard_bytes.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int>(i);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return shard_bytes[a] > shard_bytes[b]; });
  for (int s : order) {
    const int best = static_cast<int>(std::max_element(hot_left.begin(), hot_left.end()) - hot_left.begin());
    if (shard_bytes[s] <= hot_left[best]) {
      out[s] = {best, true};
      hot_left[best] -= shard_bytes[s];
    } else {
      const int least = static_cast<int>(std::min_element(warm.begin(), warm.end()) - warm.begin());
      out[s] = {least, false};
      warm[least] += shard_bytes[s];
    }
  }
  return out;
}

}  // namespace rapidin::kernels
