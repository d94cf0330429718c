// A tiny Llama configuration for the float64 reference tests of model/ (random weights via
// GradientEngine::Random): small enough for finite differences over every parameter, with grouped KV heads.
#ifndef RAPIDIN_TESTS_TINY_MODEL_H_
#define RAPIDIN_TESTS_TINY_MODEL_H_

#include <cstdint>
#include <memory>

#include "model/engine.h"
#include "model/internal/llama_grad.h"

namespace rapidin::testing {

inline model::ModelConfig TinyModel(bool tied) {
  model::ModelConfig c;
  c.dim = 8;
  c.hidden_dim = 12;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.vocab_size = 11;
  c.seq_len = 16;
  c.tied_output = tied;
  return c;
}

// Wider, with 4 query heads per KV head and head dimension 8 (the direct pass's AVX-512 attention), for
// records longer than a 16-key chunk.
inline model::ModelConfig GqaModel(int seq_len) {
  model::ModelConfig c;
  c.dim = 32;
  c.hidden_dim = 24;
  c.n_layers = 3;
  c.n_heads = 4;
  c.n_kv_heads = 1;
  c.vocab_size = 37;
  c.seq_len = seq_len;
  return c;
}

// The same random weights three ways, for the direct pass's tests: LibTorch autograd in float64 (the reference)
// and the hand-written pass (grad_path "direct") in float64 and in float32.
struct DirectEngines {
  std::unique_ptr<model::GradientEngine> ref, direct, direct32;
};
// Turns the direct pass's AVX-512 kernels on or off for a test and back on when it ends (an ASSERT's early return
// must not leave the portable kernels on for later tests).
class Avx512Switch {
 public:
  Avx512Switch() = default;
  Avx512Switch(const Avx512Switch&) = delete;
  Avx512Switch& operator=(const Avx512Switch&) = delete;
  ~Avx512Switch() { model::internal::SetAvx512ForTesting(true); }
  void Set(bool enabled) { model::internal::SetAvx512ForTesting(enabled); }
};

inline absl::StatusOr<DirectEngines> RandomDirectEngines(const model::ModelConfig& cfg, uint32_t seed) {
  model::EngineOptions o;
  o.use_double = true;
  o.grad_path = "autograd";
  auto ref = model::GradientEngine::Random(cfg, seed, o);
  if (!ref.ok()) return ref.status();
  o.grad_path = "direct";
  auto direct = model::GradientEngine::Random(cfg, seed, o);
  if (!direct.ok()) return direct.status();
  o.use_double = false;
  auto direct32 = model::GradientEngine::Random(cfg, seed, o);
  if (!direct32.ok()) return direct32.status();
  return DirectEngines{std::move(*ref), std::move(*direct), std::move(*direct32)};
}

}  // namespace rapidin::testing

#endif  // RAPIDIN_TESTS_TINY_MODEL_H_
