// Top-k selection with deterministic tie-breaking.
//
// "Helpful" keeps the k largest scores, "harmful" the k smallest; equal scores are ordered by the smaller
// global index first, so a result never depends on shard count or thread timing. NaN scores are never kept.
// Not thread-safe: one selector per (query, shard); merge with MergeTopK.
#ifndef RAPIDIN_KERNELS_TOPK_H_
#define RAPIDIN_KERNELS_TOPK_H_

#include <cstddef>
#include <cstdint>
#include <vector>

namespace rapidin::kernels {

struct Candidate {
  float score;
  int64_t index;
};

class TopK {
 public:
  // largest=true keeps the highest scores (helpful), false the lowest (harmful). k may be 0.
  TopK(int k, bool largest);

  // True when (a) ranks before (b) in this selector's order.
  bool Before(const Candidate& a, const Candidate& b) const {
    if (a.score != b.score) return largest_ ? a.score > b.score : a.score < b.score;
    return a.index < b.index;
  }

  void Push(float score, int64_t index) {
    if (k_ == 0 || score != score) return;
    if (static_cast<int>(heap_.size()) < k_) {
      PushHeap({score, index});
    } else if (Before({score, index}, heap_.front())) {
      ReplaceTop({score, index});
    }
  }

  int k() const { return k_; }
  bool largest() const { return largest_; }
  size_t size() const { return heap_.size(); }
  // The kept candidates, best first.
  std::vector<Candidate> Sorted() const;

 private:
  void PushHeap(Candidate c);
  void ReplaceTop(Candidate c);

  int k_;
  bool largest_;
  std::vector<Candidate> heap_;  // heap_.front() is the worst kept candidate
};

// Global top-k of several partial lists (each any order), best first.
std::vector<Candidate> MergeTopK(const std::vector<std::vector<Candidate>>& parts, int k, bool largest);

}  // namespace rapidin::kernels

#endif  // RAPIDIN_KERNELS_TOPK_H_
