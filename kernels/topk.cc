#include "kernels/topk.h"

#include <algorithm>

namespace rapidin::kernels {

TopK::TopK(int k, bool largest) : k_(k < 0 ? 0 : k), largest_(largest) { heap_.reserve(k_); }

// Heap ordered so that front() is the candidate that ranks last ("worst").
void TopK::PushHeap(Candidate c) {
  heap_.push_back(c);
  std::push_heap(heap_.begin(), heap_.end(),
                 [this](const Candidate& a, const Candidate& b) { return Before(a, b); });
}

void TopK::ReplaceTop(Candidate c) {
  auto cmp = [this](const Candidate& a, const Candidate& b) { return Before(a, b); };
  std::pop_heap(heap_.begin(), heap_.end(), cmp);
  heap_.back() = c;
  std::push_heap(heap_.begin(), heap_.end(), cmp);
}

std::vector<Candidate> TopK::Sorted() const {
  std::vector<Candidate> out = heap_;
  std::sort(out.begin(), out.end(), [this](const Candidate& a, const Candidate& b) { return Before(a, b); });
  return out;
}

std::vector<Candidate> MergeTopK(const std::vector<std::vector<Candidate>>& parts, int k, bool largest) {
  TopK sel(k, largest);
  for (const auto& part : parts) {
    for (const Candidate& c : part) sel.Push(c.score, c.index);
  }
  return sel.Sorted();
}

}  // namespace rapidin::kernels
