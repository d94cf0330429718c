// LibTorch baseline for the scan benchmark, behind a plain header so only one TU includes ATen.
#ifndef RAPIDIN_BENCH_TORCH_BASELINE_H_
#define RAPIDIN_BENCH_TORCH_BASELINE_H_

#include <cstdint>
#include <vector>

namespace rapidin::bench {

// store: n x k fp32 (not copied), queries: nq x k. Runs at::matmul + at::topk (both ends) `reps` times and
// returns each run's seconds. top1 receives the index of the best row for query 0 (a correctness cross-check).
std::vector<double> TorchMatmulTopK(const float* store, int64_t n, int64_t k, const float* queries, int nq,
                                    int top_k, int reps, int threads, int64_t* top1);

}  // namespace rapidin::bench

#endif  // RAPIDIN_BENCH_TORCH_BASELINE_H_
