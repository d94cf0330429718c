// Private to model/: a hand-written forward and backward pass of a plain Llama decoder on the CPU, for the
// response-loss gradient of one record (the caching stage's hot path). No LibTorch here: raw row-major buffers
// and BLAS (the OpenBLAS that LibTorch and FAISS already link), preallocated per thread, the attention and the
// element-wise steps fused into loops. The autograd path in engine.cc stays the reference it is tested against
// (tests/model_test.cc, float64 and float32) and is what EngineOptions::grad_path = "autograd" selects.
#ifndef RAPIDIN_MODEL_INTERNAL_LLAMA_GRAD_H_
#define RAPIDIN_MODEL_INTERNAL_LLAMA_GRAD_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

namespace rapidin::model::internal {

struct LlamaShape {
  int dim = 0, hidden = 0, layers = 0, heads = 0, kv_heads = 0, head_dim = 0, vocab = 0;
  double norm_eps = 1e-5;
  bool rope_half = false;  // rotate (i, i + hd/2) pairs (Hugging Face) instead of (2i, 2i+1) (llama2.c)
};

// Row-major weights as the engine holds them (W: [out, in]); cos/sin: [seq_len, head_dim / 2].
template <class F>
struct LlamaWeights {
  const F* emb = nullptr;         // [vocab, dim]
  const F* head = nullptr;        // [vocab, dim]: emb when the output is tied
  const F* final_norm = nullptr;  // [dim]
  struct Layer {
    const F *wq, *wk, *wv, *wo, *w1, *w2, *w3, *attn_norm, *ffn_norm;
  };
  std::vector<Layer> layers;
  const F* cos = nullptr;
  const F* sin = nullptr;
};

// Where the weight gradients go (same shapes as the weights); nullptr: not wanted. Every wanted buffer is
// overwritten. head == emb (tied output) accumulates both uses into one buffer.
template <class F>
struct LlamaGrads {
  F* emb = nullptr;
  F* head = nullptr;
  struct Layer {
    F *wq = nullptr, *wk = nullptr, *wv = nullptr, *wo = nullptr, *w1 = nullptr, *w2 = nullptr, *w3 = nullptr;
  };
  std::vector<Layer> layers;
};

// The loss sum_i w_i * -log p(ids[i] | ids[<i]) over i in [response_begin, n), w the loss weights scaled to
// sum 1 (loss_weights: n - response_begin values, or nullptr for uniform), and its gradient with respect to
// every weight matrix wanted in *grads. Returns the loss. Requires 1 <= response_begin < n <= seq_len and ids in
// [0, vocab) (the engine's CheckRecord). Thread-safe: each thread uses its own scratch memory.
template <class F>
double LlamaLossGradient(const LlamaShape& s, const LlamaWeights<F>& w, const int32_t* ids, int n,
                         int response_begin, const double* loss_weights, const LlamaGrads<F>& grads);

// The influence view's pass (forward-over-reverse): gx (n x D) receives the loss's gradient (the loss of
// LlamaLossGradient) with respect to the input embeddings (row t: the embedding of ids[t]; the last row zero), and
// gxt its derivative when the weights move along dw: every matrix of w along the same field of dw (null: fixed;
// norms, cos and sin unused), each input embedding along dw.emb's row of its id, a tied head with dw.emb (dw.head
// == dw.emb). Returns the loss. Requirements as LlamaLossGradient; memory O(layers x n x dim), no n x n storage.
template <class F>
double LlamaInputGradTangent(const LlamaShape& s, const LlamaWeights<F>& w, const LlamaWeights<F>& dw,
                             const int32_t* ids, int n, int response_begin, const double* loss_weights, F* gx,
                             F* gxt);

// *dot = sum_j P_j g_j u_j and *ss = sum_j (P_j g_j)^2 over n values (P: the preconditioner, or null for 1; u
// null: *dot = 0), in double in 8 partial sums (the float one vectorised).
void BlockDotNorm(const float* g, const double* pre, const double* u, int64_t n, double* dot, double* ss);
void BlockDotNorm(const double* g, const double* pre, const double* u, int64_t n, double* dot, double* ss);

// What LlamaTokenPass::Backward reduces a token's gradient block of one matrix to, instead of writing it: dot and
// ss as BlockDotNorm gives them on the block, for the chunk's c tokens (c values each, overwritten). u and pre have
// the matrix's shape; u null: the matrix is not wanted.
struct LlamaTarget {
  const double* u = nullptr;
  const double* pre = nullptr;
  double* dot = nullptr;
  double* ss = nullptr;
};
struct LlamaTargets {
  LlamaTarget emb, head;  // a tied output: head.u == emb.u, both uses reduced as one block into emb's outputs
  struct Layer {
    LlamaTarget wq, wk, wv, wo, w1, w2, w3;
  };
  std::vector<Layer> layers;
};

// Per-token gradients (token-wise attribution): one forward pass over the sequence, then for any range of tokens
// the gradient of each single-token loss l_s = -log p(ids[s] | ids[<s]) with respect to the wanted matrices. A
// range's losses share one backward pass with their rows interleaved (position-major), so each linear layer's input
// gradient is one matrix product for all of them and their per-token weight gradients another.
template <class F>
class LlamaTokenPass {
 public:
  // Runs the forward pass over ids[0, n). Requires 2 <= n <= seq_len and ids in [0, vocab).
  LlamaTokenPass(const LlamaShape& s, const LlamaWeights<F>& w, const int32_t* ids, int n);
  ~LlamaTokenPass();
  // Gradients of l_s for s in [s0, s1), 1 <= s0 < s1 <= n: each wanted matrix's buffer receives s1 - s0 blocks of
  // its size, token by token (overwritten; head == emb for a tied output sums both uses in one block). `done`,
  // when set, is called with each wanted buffer as soon as its blocks are final (once per buffer, while they are
  // still in cache). Thread-safe: concurrent calls share the forward pass read-only.
  using BlockDone = std::function<void(const F* buffer)>;
  void Backward(int s0, int s1, const LlamaGrads<F>& grads, const BlockDone& done = nullptr) const;
  // The same gradients reduced against targets (LlamaTarget) without being written: each token's weight gradient is
  // formed tile by tile in registers and reduced there (AVX-512, float), or through a per-token block otherwise.
  // A token's block covers only the positions its loss reaches. Thread-safe as Backward.
  void Backward(int s0, int s1, const LlamaTargets& targets) const;

 private:
  struct State;
  struct Kept;  // states kept for the next passes (their buffers' capacity)
  static size_t StateBytes(const State& st);
  void Run(int s0, int s1, const LlamaGrads<F>* grads, const LlamaTargets* targets, const BlockDone& done) const;
  std::unique_ptr<State> st_;
};

// Tests only: false makes the float attention take its portable kernels (what a CPU without AVX-512 runs) on any
// CPU; true restores the choice by CPU. Not for use while passes run.
void SetAvx512ForTesting(bool enabled);

}  // namespace rapidin::model::internal

#endif  // RAPIDIN_MODEL_INTERNAL_LLAMA_GRAD_H_
