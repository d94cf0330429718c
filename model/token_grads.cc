// Per-token gradients (token-wise attribution): the reference loop, batched copies, and the shared-forward
// method with a hand-written backward pass.
//
// Why the shared method is cheaper: the single-token losses l_s of one sequence share one forward pass, so it runs
// once; their backward passes differ only in the cotangent, so `chunk` of them run as one batched backward pass
// over the positions [0, s) they need, and each linear layer's per-token weight gradient is formed from its
// recorded input and the batched output gradient (dl_s/dW = sum_p dy_{s,p}^T x_p). Above the last attention layer
// a loss's cotangent lives at one position only, so that part runs on one position per token; attention runs in
// causal row blocks. Measured against the loop in bench/results/tokens.md.
#include <algorithm>
#include <atomic>
#include <mutex>
#include <functional>
#include <cmath>
#include <set>
#include <thread>

#include "absl/strings/match.h"
#include "base/mutex.h"
#include "base/thread_pool.h"
#include "model/internal/engine_impl.h"

namespace rapidin::model {
namespace {

// A linear layer's input (and, under LoRA, u = x A^T), recorded by the forward pass.
struct LinRec {
  torch::Tensor x, u;
};

// One decoder layer's activations over positions [0, P), batch 1, from Impl::Forward (Captures::Layer), with the
// attention's tensors taken out of their batch dimension.
struct LayerRec {
  torch::Tensor x_in, r1;      // [1, P, dim]: residual stream in; rsqrt of its mean square
  torch::Tensor q, k, v;       // [1, H, P, hd]: after RoPE, with the KV heads repeated to H
  torch::Tensor att;           // [H, P, P]: softmax probabilities
  torch::Tensor o_heads;       // [H, P, hd]: probabilities x v
  torch::Tensor x_mid, r2;     // residual stream after attention; rsqrt
  torch::Tensor a1, a3, s1;    // w1 and w3 outputs, silu(a1)
};

class SharedTokenBackprop {
 public:
  SharedTokenBackprop(const EngineAccess::Impl& d, const std::vector<int32_t>& ids) : d_(d) {
    for (size_t i = 0; i < d.infos.size(); ++i) index_[d.infos[i].name] = static_cast<int>(i);
    std::vector<int64_t> v(ids.begin(), ids.end());
    ids_ = torch::tensor(v, torch::kLong).to(d.device);
    Forward();
  }

  // Per-token gradients of the losses on tokens [s0, s1): per[p] is [s1 - s0, ...] for selected parameter p
  // (undefined when it receives no gradient).
  std::vector<torch::Tensor> Backward(int s0, int s1) const {
    torch::NoGradGuard no_grad;
    Chunk c{std::vector<torch::Tensor>(d_.infos.size()), s1 - s0, s1 - 1};
    const auto& cfg = d_.cfg;
    const auto lopts = torch::TensorOptions().dtype(torch::kLong).device(d_.device);
    auto pos = torch::arange(s0 - 1, s1 - 1, lopts);  // the logit of token s sits at position s - 1
    // Output head and final norm at each loss's own position.
    const std::string head = cfg.tied_output ? "tok_embeddings.weight" : "output.weight";
    const LinRec hrec = At(lin_.at(head), pos);
    auto logits = torch::matmul(hrec.x, d_.w.at(head).t());
    auto lr = d_.lora.find(head);
    if (lr != d_.lora.end()) logits = logits + torch::matmul(hrec.u, d_.w.at(lr->second.second).t()) * d_.lora_scale;
    auto gl = torch::softmax(logits, -1);  // d(-log p_target)/dlogits = p - onehot(target)
    auto target = ids_.slice(0, s0, s1);
    gl.select(1, 0).scatter_add_(1, target.unsqueeze(1),
                                 torch::full({c.b, 1}, -1.0, gl.options()));
    auto gx = LinBack(&c, gl, head, hrec);
    gx = NormBack(&c, gx, At(x_final_, pos), At(r_final_, pos), "norm.weight");
    // Last layer's feed-forward block and attention output projection: still one position per loss.
    const int L = cfg.n_layers;
    const LayerRec& top = layers_[L - 1];
    const std::string pt = absl::StrCat("layers.", L - 1, ".");
    gx = gx + FfnBack(&c, gx, top, pt, &pos);
    auto go = LinBack(&c, gx, pt + "attention.wo.weight", At(lin_.at(pt + "attention.wo.weight"), pos));
    // From here on the cotangents spread over every earlier position: dense [B, P, *].
    auto dense = [&](const torch::Tensor& g) {
      auto z = torch::zeros({c.b, c.p, g.size(2)}, g.options());
      z.index_put_({torch::arange(c.b, lopts), pos}, g.select(1, 0));
      return z;
    };
    gx = dense(gx);
    gx = gx + AttnBack(&c, dense(go), top, pt);
    for (int l = L - 2; l >= 0; --l) {
      const std::string p = absl::StrCat("layers.", l, ".");
      const LayerRec& r = layers_[l];
      gx = gx + FfnBack(&c, gx, r, p, nullptr);
      gx = gx + AttnBack(&c, LinBack(&c, gx, p + "attention.wo.weight", Cut(lin_.at(p + "attention.wo.weight"), c.p)),
                         r, p);
    }
    auto e = index_.find("tok_embeddings.weight");
    if (e != index_.end()) {
      auto g = torch::zeros({c.b, cfg.vocab_size, cfg.dim}, gx.options());
      g.index_add_(1, ids_.slice(0, 0, c.p), gx);
      Accum(&c, "tok_embeddings.weight", g);
    }
    return c.per;
  }

 private:
  struct Chunk {
    std::vector<torch::Tensor> per;
    int64_t b;  // losses in the chunk
    int64_t p;  // positions they need: [0, p)
  };

  static torch::Tensor Cut(const torch::Tensor& t, int64_t p) { return t.narrow(1, 0, p); }
  static LinRec Cut(const LinRec& r, int64_t p) {
    return {Cut(r.x, p), r.u.defined() ? Cut(r.u, p) : torch::Tensor()};
  }
  // Rows at pos of a [1, P, *] activation, as [B, 1, *].
  static torch::Tensor At(const torch::Tensor& t, const torch::Tensor& pos) {
    return t.select(0, 0).index_select(0, pos).unsqueeze(1);
  }
  static LinRec At(const LinRec& r, const torch::Tensor& pos) {
    return {At(r.x, pos), r.u.defined() ? At(r.u, pos) : torch::Tensor()};
  }

  void Accum(Chunk* c, const std::string& name, const torch::Tensor& g) const {
    auto it = index_.find(name);
    if (it == index_.end()) return;
    auto& acc = c->per[it->second];
    acc = acc.defined() ? acc + g : g;
  }
  bool Selected(const std::string& name) const { return index_.count(name) > 0; }

  // One batch-1 forward pass (Impl::Forward, recording what the backward needs) over positions [0, T - 1): the
  // last token is only ever a target.
  void Forward() {
    torch::NoGradGuard no_grad;
    Captures cap;
    cap.layers_wanted = true;
    d_.Forward(ids_.slice(0, 0, ids_.size(0) - 1).unsqueeze(0), &cap);
    for (const auto& l : cap.layers) {
      layers_.push_back({l.x_in, l.r1, l.q, l.k, l.v, l.att.select(0, 0), l.o_heads.select(0, 0), l.x_mid, l.r2,
                         l.a1, l.a3, l.s1});
    }
    x_final_ = cap.x_final;
    r_final_ = cap.r_final;
    // Linear inputs by weight name. Under LoRA, Impl::Lin records the base weight, then A (its output is u), then B.
    std::map<std::string, std::string> base_of_a;
    std::set<std::string> b_names;
    for (const auto& [base, ab] : d_.lora) {
      base_of_a[ab.first] = base;
      b_names.insert(ab.second);
    }
    for (const auto& e : cap.linears) {
      auto it = base_of_a.find(e.weight);
      if (it != base_of_a.end()) {
        lin_[it->second].u = e.y;
      } else if (!b_names.count(e.weight)) {
        lin_[e.weight].x = e.x;
      }
    }
  }

  // Per-loss weight gradients dy_b^T x_b, [B, out, in]. A shared x ([1, n, in]) makes it one matrix product.
  static torch::Tensor PerSample(const torch::Tensor& gy, const torch::Tensor& x) {
    const int64_t B = gy.size(0), n = gy.size(1), out = gy.size(2);
    if (x.size(0) == 1 && B > 1) {
      return torch::mm(gy.transpose(1, 2).reshape({B * out, n}), x.select(0, 0)).view({B, out, x.size(2)});
    }
    return torch::matmul(gy.transpose(1, 2), x);
  }

  // y = x W^T (+ s (x A^T) B^T): records per-token dW, dA, dB; returns dx. gy [B, n, out], r.x [1 or B, n, in].
  torch::Tensor LinBack(Chunk* c, const torch::Tensor& gy, const std::string& name, const LinRec& r) const {
    if (Selected(name)) Accum(c, name, PerSample(gy, r.x));
    auto gx = torch::matmul(gy, d_.w.at(name));
    auto it = d_.lora.find(name);
    if (it != d_.lora.end()) {
      const std::string& a = it->second.first;
      const std::string& b = it->second.second;
      if (Selected(b)) Accum(c, b, PerSample(gy, r.u) * d_.lora_scale);
      auto gu = torch::matmul(gy, d_.w.at(b)) * d_.lora_scale;
      if (Selected(a)) Accum(c, a, PerSample(gu, r.x));
      gx = gx + torch::matmul(gu, d_.w.at(a));
    }
    return gx;
  }

  // y = x r g with r = rsqrt(mean(x^2) + eps): dx = r z - x r^3 mean(z x), z = dy g.
  torch::Tensor NormBack(Chunk* c, const torch::Tensor& gy, const torch::Tensor& x, const torch::Tensor& r,
                         const std::string& g) const {
    if (Selected(g)) Accum(c, g, (gy * (x * r)).sum(1));
    auto z = gy * d_.w.at(g);
    return r * z - x * r.pow(3) * (z * x).mean(-1, true);
  }

  // Feed-forward block (norm, SwiGLU): the cotangent it adds to the residual stream below it. pos: the sparse
  // top part (one position per loss); null: dense over [0, P).
  torch::Tensor FfnBack(Chunk* c, const torch::Tensor& gx, const LayerRec& r, const std::string& p,
                        const torch::Tensor* pos) const {
    auto sel = [&](const torch::Tensor& t) { return pos ? At(t, *pos) : Cut(t, c->p); };
    auto rec = [&](const std::string& n) { return pos ? At(lin_.at(n), *pos) : Cut(lin_.at(n), c->p); };
    auto ga = LinBack(c, gx, p + "feed_forward.w2.weight", rec(p + "feed_forward.w2.weight"));
    auto a1 = sel(r.a1), s1 = sel(r.s1);
    auto sig = torch::sigmoid(a1);
    auto ga3 = ga * s1;
    auto ga1 = ga * sel(r.a3) * sig * (1 + a1 * (1 - sig));
    auto gh = LinBack(c, ga1, p + "feed_forward.w1.weight", rec(p + "feed_forward.w1.weight")) +
              LinBack(c, ga3, p + "feed_forward.w3.weight", rec(p + "feed_forward.w3.weight"));
    return NormBack(c, gh, sel(r.x_mid), sel(r.r2), p + "ffn_norm.weight");
  }

  // Attention block below its output projection: go = dL/d(attention output) [B, P, dim]; returns the cotangent
  // added to the residual stream. The chunk's losses ride along the rows of per-head matrix products ([H, P, B, *]
  // layout), so the shared probabilities and q, k, v are never copied per loss.
  torch::Tensor AttnBack(Chunk* c, const torch::Tensor& go, const LayerRec& r, const std::string& p) const {
    const auto& cfg = d_.cfg;
    const int64_t B = c->b, P = c->p;
    const int H = cfg.n_heads, KV = cfg.n_kv_heads, hd = cfg.dim / cfg.n_heads;
    auto att = r.att.narrow(1, 0, P).narrow(2, 0, P);  // [H, Pi, Pj]
    // S = q k^T / sqrt(hd): the scale goes on q and k (small) instead of on dS (H x P x B x P).
    const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
    auto q = r.q.select(0, 0).narrow(1, 0, P) * scale;  // [H, P, hd]
    auto k = r.k.select(0, 0).narrow(1, 0, P) * scale;
    auto v = r.v.select(0, 0).narrow(1, 0, P);
    auto gO = go.view({B, P, H, hd}).permute({2, 1, 0, 3}).contiguous();  // [H, Pi, B, hd]
    // Softmax backward: dS = A (dA - D) with D_i = sum_j dA_ij A_ij = dO_i . O_i (so no extra pass
    // over the P x P tensor). Row 0 is a softmax over one key, whose Jacobian is zero: it is set to exactly zero,
    // because rounding noise there would survive as a unit-norm block after layer-wise normalisation.
    auto D = (gO * r.o_heads.narrow(1, 0, P).unsqueeze(2)).sum(-1, true);  // [H, Pi, B, 1]
    auto gQ = torch::empty({H, P, B, hd}, gO.options());
    auto gK = torch::zeros({H, hd, B, P}, gO.options());
    auto gV = torch::zeros({H, P, B, hd}, gO.options());
    // Causal: rows [i0, i1) only see keys [0, i1), so blocks of rows skip most of the zero upper triangle.
    constexpr int64_t kRows = 64;
    for (int64_t i0 = 0; i0 < P; i0 += kRows) {
      const int64_t i1 = std::min(P, i0 + kRows), n = i1 - i0;
      auto gOb = gO.narrow(1, i0, n).reshape({H, n * B, hd});
      auto kb = k.narrow(1, 0, i1), vb = v.narrow(1, 0, i1);
      // dV_j += sum_i A_ij dO_i
      gV.narrow(1, 0, i1).add_(
          torch::bmm(att.narrow(1, i0, n).narrow(2, 0, i1).transpose(1, 2), gOb.view({H, n, B * hd}))
              .view({H, i1, B, hd}));
      auto gS = torch::bmm(gOb, vb.transpose(1, 2)).view({H, n, B, i1});  // dA: [H, rows, B, keys]
      gS.sub_(D.narrow(1, i0, n)).mul_(att.narrow(1, i0, n).narrow(2, 0, i1).unsqueeze(2));
      if (i0 == 0) gS.select(1, 0).zero_();
      gQ.narrow(1, i0, n).copy_(torch::bmm(gS.view({H, n * B, i1}), kb).view({H, n, B, hd}));
      // dK_h^T += q_h^T dS_h with dS_h as a [rows, B * keys] matrix: no transposed copy of dS.
      gK.narrow(3, 0, i1).add_(
          torch::bmm(q.narrow(1, i0, n).transpose(1, 2), gS.view({H, n, B * i1})).view({H, hd, B, i1}));
    }
    gQ = gQ.permute({2, 1, 0, 3});  // [B, P, H, hd]
    gK = gK.permute({2, 3, 0, 1});
    gV = gV.permute({2, 1, 0, 3});
    if (KV != H) {  // repeat_interleave: head h reads KV head h / (H / KV)
      gK = gK.reshape({B, P, KV, H / KV, hd}).sum(3);
      gV = gV.reshape({B, P, KV, H / KV, hd}).sum(3);
    }
    gQ = d_.Rope(gQ.contiguous(), /*inverse=*/true);
    gK = d_.Rope(gK.contiguous(), /*inverse=*/true);
    auto rec = [&](const std::string& n) { return Cut(lin_.at(n), P); };
    auto gh = LinBack(c, gQ.reshape({B, P, H * hd}), p + "attention.wq.weight", rec(p + "attention.wq.weight")) +
              LinBack(c, gK.reshape({B, P, KV * hd}), p + "attention.wk.weight", rec(p + "attention.wk.weight")) +
              LinBack(c, gV.reshape({B, P, KV * hd}), p + "attention.wv.weight", rec(p + "attention.wv.weight"));
    return NormBack(c, gh, Cut(r.x_in, P), Cut(r.r1, P), p + "attention_norm.weight");
  }

  const EngineAccess::Impl& d_;
  std::map<std::string, int> index_;  // selected parameter name -> position in d_.infos
  torch::Tensor ids_;                 // [T]
  std::vector<LayerRec> layers_;
  torch::Tensor x_final_, r_final_;
  std::map<std::string, LinRec> lin_;  // linear layer inputs by weight name
};

}  // namespace

namespace {

// One chunk of consecutive tokens [s0, s1): the shared method's per-sample tensors (per), or the other methods'
// host vectors (host).
using ChunkSink = std::function<absl::Status(int s0, int s1, const std::vector<torch::Tensor>* per,
                                             std::vector<std::vector<double>>* host)>;

// The hand-written backward covers the Llama layer, and Qwen2's q/k/v biases as long as no bias is a selected
// parameter (a bias only shifts the recorded activations; the weight and input gradients do not change).
bool SharedBackpropCovers(const EngineAccess::Impl& d) {
  auto arch = d.arch;
  if (arch.qkv_bias) {
    for (const auto& info : d.infos) {
      if (absl::EndsWith(info.name, ".bias")) return false;
    }
    arch.qkv_bias = false;
  }
  return arch.Plain();
}

// Validates, then runs the chunks of [from, ids.size()) over options.threads threads, handing each to `sink`.
// With `visit`, the direct pass hands each parameter's blocks over as soon as they are final (visit(s0, s1, p,
// per[p]), in cache) instead of the whole chunk to the sink; the other methods still use the sink.
using BlockVisitor = std::function<void(int s0, int s1, size_t p, const torch::Tensor& blocks)>;

// The chunks' workers beyond the caller. They live as long as the process, so each keeps its scratch and gradient
// blocks (thread_local) from call to call: fresh threads per call faulted in every page of those again for each
// record (4-6% of a query's attribution time). A task never waits on another task, so tasks queued behind busy
// workers (concurrent queries) only start later while the caller works through the chunks.
ThreadPool& ChunkPool() {
  static ThreadPool* const pool =
      new ThreadPool(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())), 1 << 30);
  return *pool;
}

// Scores against u through the direct pass: each token's blocks reduced inside the pass, never written (out[s -
// from] += the token's score).
struct DirectScores {
  const double* u = nullptr;
  bool normalize = true;
  double* out = nullptr;
  int from = 0;
};

absl::Status ForEachTokenChunk(const GradientEngine& e, const EngineAccess::Impl& d, const std::vector<int32_t>& ids,
                               int from, const TokenGradOptions& options, const ChunkSink& sink,
                               const BlockVisitor& visit = nullptr, const DirectScores* scores = nullptr) {
  const int T = static_cast<int>(ids.size());
  const int chunk = options.method == TokenGradMethod::kLoop ? 1 : options.chunk;
  // The hand-written backward covers the Llama layer only; other architectures take the batched autograd copies.
  const TokenGradMethod method =
      options.method == TokenGradMethod::kShared &&
              (!SharedBackpropCovers(d) || d.cfg.HeadDim() * d.cfg.n_heads != d.cfg.dim)
          ? TokenGradMethod::kCopies
          : options.method;
  const int threads = options.threads;
  if (from < 1 || from >= T) {
    return absl::InvalidArgumentError(absl::StrCat("token range [", from, ", ", T, ") is empty"));
  }
  if (chunk < 1 || threads < 1) return absl::InvalidArgumentError("chunk and threads must be >= 1");
  if (T > d.cfg.seq_len) {
    return absl::InvalidArgumentError(absl::StrCat(T, " tokens exceed the model's context of ", d.cfg.seq_len));
  }
  if (absl::Status st = CheckIds(ids, d.cfg.vocab_size); !st.ok()) return st;
  // The hand-written CPU pass (grad_path "direct") where it applies: one forward pass, then each chunk's token
  // losses through one batched backward (model/internal/llama_grad.h).
  std::function<void(int, int, std::vector<torch::Tensor>*)> direct;
  if (options.method == TokenGradMethod::kShared && d.DirectApplies()) {
    auto make = [&](auto tag) {
      using F = decltype(tag);
      auto pass = std::make_shared<internal::LlamaTokenPass<F>>(d.DirectShape(), d.template DirectWeights<F>(),
                                                                ids.data(), T);
      if (scores) {
        direct = [&d, pass, scores](int s0, int s1, std::vector<torch::Tensor>*) {
          const int c = s1 - s0;
          const size_t np = d.infos.size();
          thread_local std::vector<double> red;  // per parameter: c dots, then c squared norms
          red.assign(2 * static_cast<size_t>(c) * np, 0.0);
          pass->Backward(s0, s1, d.DirectTargets(scores->u, c, red.data()));
          double* out = scores->out + (s0 - scores->from);
          for (size_t p = 0; p < np; ++p) {
            const double* r = red.data() + 2 * static_cast<size_t>(c) * p;
            for (int b = 0; b < c; ++b) EngineAccess::Impl::AddScore(r[b], r[c + b], scores->normalize, out + b);
          }
        };
        return;
      }
      direct = [&d, pass, &visit](int s0, int s1, std::vector<torch::Tensor>* per) {
        // A thread reuses its blocks from chunk to chunk (the sink is done with them when it returns) while they
        // are small: fresh multi-megabyte buffers cost a page fault per 4 KiB every chunk, and a server has many
        // threads while a large model's blocks are large.
        const bool keep = int64_t{8} * d.dim * static_cast<int64_t>(sizeof(F)) <= (int64_t{64} << 20);
        thread_local std::vector<torch::Tensor> kept;
        std::vector<torch::Tensor> fresh;
        std::vector<torch::Tensor>& blocks = keep ? kept : fresh;
        blocks.resize(d.infos.size());
        for (size_t i = 0; i < d.infos.size(); ++i) {
          if (!blocks[i].defined() || blocks[i].size(0) < s1 - s0 || blocks[i].size(1) != d.infos[i].numel ||
              blocks[i].scalar_type() != d.dtype) {
            blocks[i] = torch::empty({std::max(s1 - s0, 8), d.infos[i].numel}, d.Opts());
          }
          (*per)[i] = blocks[i].narrow(0, 0, s1 - s0);
        }
        typename internal::LlamaTokenPass<F>::BlockDone done;
        if (visit) {
          done = [&](const F* buffer) {
            for (size_t i = 0; i < per->size(); ++i) {
              if ((*per)[i].template data_ptr<F>() == buffer) return visit(s0, s1, i, (*per)[i]);
            }
          };
        }
        pass->Backward(s0, s1, d.template DirectGrads<F>(per, 0), done);
      };
    };
    if (d.dtype == torch::kDouble) {
      make(double{});
    } else {
      make(float{});
    }
  }
  std::unique_ptr<SharedTokenBackprop> shared;
  if (method == TokenGradMethod::kShared && !direct) shared = std::make_unique<SharedTokenBackprop>(d, ids);
  // Work items are chunks of consecutive tokens; threads take them in turn (autograd::grad is thread-safe, and the
  // shared forward pass is only read).
  // The last chunks cost the most (each token's backward covers its prefix): they go first, so that the threads
  // finish together.
  const int chunks = (T - from + chunk - 1) / chunk;
  std::atomic<int> next{0};
  std::vector<absl::Status> status(threads);
  auto work = [&](int w) {
    for (int k; (k = next.fetch_add(1)) < chunks;) {
      const int s0 = from + (chunks - 1 - k) * chunk;
      const int s1 = std::min(T, s0 + chunk);
      // A throw on a worker thread would end the process: convert it here.
      absl::Status st = Guarded([&]() -> absl::Status {
        if (direct) {
          std::vector<torch::Tensor> per(d.infos.size());
          direct(s0, s1, &per);
          return visit || scores ? absl::OkStatus() : sink(s0, s1, &per, nullptr);
        }
        if (shared) {
          const std::vector<torch::Tensor> per = shared->Backward(s0, s1);
          return sink(s0, s1, &per, nullptr);
        }
        std::vector<std::vector<double>> g(s1 - s0);
        std::vector<TokenizedExample> copies;
        for (int s = s0; s < s1; ++s) {
          TokenizedExample t;
          t.ids.assign(ids.begin(), ids.begin() + s + 1);  // the prefix and token s: loss on token s alone
          t.response_begin = s;
          copies.push_back(std::move(t));
        }
        if (copies.size() == 1) {
          auto info = e.GradientIds(copies[0], options.normalize, &g[0]);
          if (!info.ok()) return info.status();
        } else {
          std::vector<GradInfo> infos;
          absl::Status bst = e.GradientIdsBatch(copies, options.normalize, &g, &infos);
          if (!bst.ok()) return bst;
        }
        return sink(s0, s1, nullptr, &g);
      });
      if (!st.ok()) {
        status[w] = st;
        return;
      }
    }
  };
  if (threads == 1) {
    work(0);
  } else {  // the caller is worker 0
    BlockingCounter left(threads - 1);
    for (int w = 1; w < threads; ++w) {
      ChunkPool().Schedule([&, w] {
        work(w);
        left.DecrementCount();
      });
    }
    work(0);
    left.Wait();
  }
  for (const auto& st : status) {
    if (!st.ok()) return st;
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status GradientEngine::TokenGradientsIds(const std::vector<int32_t>& ids, int from,
                                               const TokenGradOptions& options,
                                               std::vector<std::vector<double>>* out) const {
  return Guarded([&]() -> absl::Status {
    const Impl& d = *impl_;
    if (from >= 1 && from < static_cast<int>(ids.size())) out->assign(ids.size() - from, {});
    return ForEachTokenChunk(*this, d, ids, from, options,
                             [&](int s0, int s1, const std::vector<torch::Tensor>* per,
                                 std::vector<std::vector<double>>* host) {
                               if (per) {
                                 d.Assemble(*per, s1 - s0, options.normalize, out, s0 - from);
                               } else {
                                 for (int s = s0; s < s1; ++s) (*out)[s - from] = std::move((*host)[s - s0]);
                               }
                               return absl::OkStatus();
                             });
  });
}

absl::Status GradientEngine::TokenGradientRows(const std::vector<int32_t>& ids, int from,
                                               const TokenGradOptions& options,
                                               const TokenRowsConsumer& consume) const {
  return Guarded([&]() -> absl::Status {
    const Impl& d = *impl_;
    return ForEachTokenChunk(*this, d, ids, from, options,
                             [&](int s0, int s1, const std::vector<torch::Tensor>* per,
                                 std::vector<std::vector<double>>* host) {
                               const int n = s1 - s0;
                               torch::Tensor rows;
                               if (per && d.device.is_cpu() && d.dtype == torch::kFloat) {
                                 thread_local std::vector<float> buf;  // a thread's rows, chunk after chunk
                                 buf.resize(static_cast<size_t>(n) * d.dim);
                                 d.RowsHostF32(*per, n, options.normalize, buf.data());
                                 const absl::Status st = consume(buf.data(), s0 - from, n);
                                 if (buf.capacity() * sizeof(float) > (size_t{64} << 20)) std::vector<float>().swap(buf);
                                 return st;
                               }
                               if (per) {
                                 rows = d.Rows(*per, n, options.normalize);
                               } else {  // the reference methods: their host vectors, to the device
                                 rows = torch::empty({n, d.dim}, torch::kFloat);
                                 for (int i = 0; i < n; ++i) {
                                   std::copy((*host)[i].begin(), (*host)[i].end(), rows[i].data_ptr<float>());
                                 }
                                 rows = rows.to(d.device);
                               }
                               d.SyncDevice();
                               return consume(rows.data_ptr<float>(), s0 - from, n);
                             });
  });
}

absl::Status GradientEngine::TokenScores(const std::vector<int32_t>& ids, int from, const TokenGradOptions& options,
                                        const std::vector<double>& u, std::vector<double>* scores) const {
  return Guarded([&]() -> absl::Status {
    const Impl& d = *impl_;
    if (static_cast<int64_t>(u.size()) != d.dim) {
      return absl::InvalidArgumentError(absl::StrCat("TokenScores: u has ", u.size(), " values, the gradient ", d.dim));
    }
    if (from >= 1 && from < static_cast<int>(ids.size())) scores->assign(ids.size() - from, 0.0);
    torch::Tensor ut;  // u on the engine's device, for blocks that are not float32 host memory
    std::once_flag ut_once;
    // float32 blocks in host memory: each parameter's blocks reduced as the direct pass finishes them (in cache);
    // a chunk's tokens belong to one thread, so their scores are added without a lock.
    const bool host_f32 = d.device.is_cpu() && d.dtype == torch::kFloat;
    // The direct pass reduces each token's blocks itself (in registers where it can); the visitor and the sink
    // serve the other methods.
    DirectScores direct_scores;
    direct_scores.u = u.data();
    direct_scores.normalize = options.normalize;
    direct_scores.out = scores->data();
    direct_scores.from = from;
    auto visit = [&](int s0, int s1, size_t p, const torch::Tensor& blocks) {
      d.BlockScoresHostF32(p, blocks, s1 - s0, options.normalize, u.data(), scores->data() + (s0 - from));
    };
    return ForEachTokenChunk(*this, d, ids, from, options,
                             [&](int s0, int s1, const std::vector<torch::Tensor>* per,
                                 std::vector<std::vector<double>>* host) {
                               const int n = s1 - s0;
                               double* out = scores->data() + (s0 - from);
                               if (!per) {  // the reference methods: normalised host vectors
                                 for (int i = 0; i < n; ++i) {
                                   double acc = 0;
                                   for (int64_t j = 0; j < d.dim; ++j) acc += (*host)[i][j] * u[j];
                                   out[i] = acc;
                                 }
                                 return absl::OkStatus();
                               }
                               if (host_f32) {  // LibTorch's shared method (an adapter, say)
                                 for (size_t p = 0; p < d.infos.size(); ++p) {
                                   if ((*per)[p].defined()) {
                                     d.BlockScoresHostF32(p, (*per)[p], n, options.normalize, u.data(), out);
                                   }
                                 }
                                 return absl::OkStatus();
                               }
                               std::call_once(ut_once, [&] { ut = torch::tensor(u, torch::kDouble).to(d.device); });
                               auto acc = torch::zeros({n}, torch::TensorOptions().dtype(torch::kDouble).device(d.device));
                               for (size_t p = 0; p < d.infos.size(); ++p) {
                                 if (!(*per)[p].defined()) continue;
                                 acc += d.Block((*per)[p], n, options.normalize, p)
                                            .matmul(ut.narrow(0, d.infos[p].offset, d.infos[p].numel));
                               }
                               acc = acc.to(torch::kCPU).contiguous();
                               std::copy(acc.data_ptr<double>(), acc.data_ptr<double>() + n, out);
                               return absl::OkStatus();
                             },
                             host_f32 ? BlockVisitor(visit) : BlockVisitor(), &direct_scores);
  });
}

}  // namespace rapidin::model
