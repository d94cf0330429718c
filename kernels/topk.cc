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

std::vector<MergedCandidate> MergeParts(const std::vector<std::vector<Candidate>>& parts, int k, bool largest,
                                        const std::vector<int64_t>& source_of_part) {
  auto source = [&](const MergedCandidate& m) -> int64_t {
    return source_of_part.empty() ? 0 : source_of_part[m.part];
  };
  // The heap's front is the kept candidate that ranks last, as in TopK.
  auto before = [&](const MergedCandidate& a, const MergedCandidate& b) {
    return RanksBefore(largest, a.c.score, source(a), a.c.index, b.c.score, source(b), b.c.index);
  };
  std::vector<MergedCandidate> heap;
  if (k <= 0) return heap;
  heap.reserve(k);
  for (size_t p = 0; p < parts.size(); ++p) {
    for (size_t i = 0; i < parts[p].size(); ++i) {
      const MergedCandidate m{parts[p][i], static_cast<int>(p), static_cast<int>(i)};
      if (m.c.score != m.c.score) continue;
      if (static_cast<int>(heap.size()) < k) {
        heap.push_back(m);
        std::push_heap(heap.begin(), heap.end(), before);
      } else if (before(m, heap.front())) {
        std::pop_heap(heap.begin(), heap.end(), before);
        heap.back() = m;
        std::push_heap(heap.begin(), heap.end(), before);
      }
    }
  }
  std::sort(heap.begin(), heap.end(), before);
  return heap;
}

std::vector<Candidate> MergeTopK(const std::vector<std::vector<Candidate>>& parts, int k, bool largest) {
  std::vector<Candidate> out;
  for (const MergedCandidate& m : MergeParts(parts, k, largest)) out.push_back(m.c);
  return out;
}

}  // namespace rapidin::kernels
