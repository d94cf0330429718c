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

}  // namespace rapidin::testing

#endif  // RAPIDIN_TESTS_TINY_MODEL_H_
