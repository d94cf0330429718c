// Top-k selection with deterministic tie-breaking.
//
// "Helpful" keeps the k largest scores, "harmful" the k smallest; equal scores are ordered by the smaller
// global index first, so a result never depends on shard count or thread timing. NaN scores are never kept.
// Not thread-safe: one selector per (query, shard); merge with MergeParts / MergeTopK.
#ifndef RAPIDIN_KERNELS_TOPK_H_
#define RAPIDIN_KERNELS_TOPK_H_

#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

namespace rapidin::kernels {

struct Candidate {
  float score;
  int64_t index;
};

// The one ranking rule, for shards, the merge stage and the router alike: the higher score first (largest; the
// lower for harmful), then the smaller source (the router's shard-server order; 0 inside one store), then the
// smaller row index. Results are deterministic for equal scores.
inline bool RanksBefore(bool largest, float score_a, int64_t source_a, int64_t index_a, float score_b,
                        int64_t source_b, int64_t index_b) {
  if (score_a != score_b) return largest ? score_a > score_b : score_a < score_b;
  if (source_a != source_b) return source_a < source_b;
  return index_a < index_b;
}

class TopK {
 public:
  // largest=true keeps the highest scores (helpful), false the lowest (harmful). k may be 0.
  TopK(int k, bool largest);

  // True when (a) ranks before (b) in this selector's order.
  bool Before(const Candidate& a, const Candidate& b) const {
    return RanksBefore(largest_, a.score, 0, a.index, b.score, 0, b.index);
  }

  void Push(float score, int64_t index) {
    if (k_ == 0 || score != score) return;
    if (static_cast<int>(heap_.size()) < k_) {
      PushHeap({score, index});
    } else if (Before({score, index}, heap_.front())) {
      ReplaceTop({score, index});
    }
  }

  // A score that ranks after this one can never be kept: the worst kept score once k are kept, else the end of
  // the order (-inf for helpful, +inf for harmful). A caller may skip Push for scores strictly past it (below it
  // for helpful, above it for harmful); an equal score may still enter by its index.
  float Threshold() const {
    if (k_ == 0) return largest_ ? std::numeric_limits<float>::infinity() : -std::numeric_limits<float>::infinity();
    if (static_cast<int>(heap_.size()) < k_) {
      return largest_ ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity();
    }
    return heap_.front().score;
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

// A merged candidate and where it came from: parts[part][position].
struct MergedCandidate {
  Candidate c;
  int part = 0;
  int position = 0;
};

// The one merge stage, for the query engine (shards, GPUs and cold chunks of one store) and the router (shard
// servers) alike: the global top-k of several partial lists (each in any order), best first by RanksBefore, where a
// candidate's source is source_of_part[part] (empty: 0 for every part, as inside one store, whose indices are
// global). NaN scores are dropped. source_of_part, when given, has one entry per part.
std::vector<MergedCandidate> MergeParts(const std::vector<std::vector<Candidate>>& parts, int k, bool largest,
                                        const std::vector<int64_t>& source_of_part = {});

// MergeParts inside one store: the candidates only.
std::vector<Candidate> MergeTopK(const std::vector<std::vector<Candidate>>& parts, int k, bool largest);

}  // namespace rapidin::kernels

#endif  // RAPIDIN_KERNELS_TOPK_H_
