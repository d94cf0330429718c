#include "bench/torch_baseline.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <chrono>

namespace rapidin::bench {

std::vector<double> TorchMatmulTopK(const float* store, int64_t n, int64_t k, const float* queries, int nq,
                                    int top_k, int reps, int threads, int64_t* top1) {
  at::set_num_threads(threads);
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor s = at::from_blob(const_cast<float*>(store), {n, k}, opts);
  at::Tensor q = at::from_blob(const_cast<float*>(queries), {nq, k}, opts);
  std::vector<double> times;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    at::Tensor scores = at::matmul(s, q.t());  // n x nq
    auto best = at::topk(scores, top_k, /*dim=*/0, /*largest=*/true);
    auto worst = at::topk(scores, top_k, /*dim=*/0, /*largest=*/false);
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    *top1 = std::get<1>(best)[0][0].item<int64_t>();
    (void)worst;
  }
  return times;
}

}  // namespace rapidin::bench
