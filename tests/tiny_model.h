// A tiny Llama configuration for the float64 reference tests of model/ (random weights via
// GradientEngine::Random): small enough for finite differences over every parameter, with grouped KV heads.
#ifndef RAPIDIN_TESTS_TINY_MODEL_H_
#define RAPIDIN_TESTS_TINY_MODEL_H_

#include "model/engine.h"

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

}  // namespace rapidin::testing

#endif  // RAPIDIN_TESTS_TINY_MODEL_H_
