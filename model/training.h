// Fine-tuning a GradientEngine, writing what it learned, and generating with it.
//
// Training changes the engine's selected parameters in place. Not thread-safe: train from one thread, and compute
// no gradients with the engine meanwhile. The savers and Generate only read the engine and may run concurrently
// with gradient computations.
#ifndef RAPIDIN_MODEL_TRAINING_H_
#define RAPIDIN_MODEL_TRAINING_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/engine.h"

namespace rapidin::model {

// A fresh LoRA adapter for fine-tuning (PEFT's initialisation: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0).
struct LoraConfig {
  int rank = 8;
  double alpha = 16;
  // PEFT module names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj.
  std::vector<std::string> target_modules = {"q_proj", "k_proj", "v_proj", "o_proj",
                                             "gate_proj", "up_proj", "down_proj"};
  uint64_t seed = 0;
};

struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double weight_decay = 0.0;  // decoupled (AdamW)
};

// Attaches a fresh adapter; its matrices become the selected (trained, attributed) parameters.
// Errors: FAILED_PRECONDITION when an adapter is already attached, INVALID_ARGUMENT for bad settings.
absl::Status AddLora(GradientEngine* engine, const LoraConfig& config);

// One AdamW step on the selected parameters with the mean (over records) of each record's mean response loss,
// from one padded forward and backward pass. Returns that loss, measured before the update.
absl::StatusOr<double> TrainStep(GradientEngine* engine, const std::vector<TokenizedExample>& batch,
                                 const AdamWOptions& options);

// The attached adapter in PEFT format (adapter_config.json + adapter_model.safetensors, module names of
// LlamaForCausalLM; for a llama2.c base the q/k rows keep llama2.c's order). FAILED_PRECONDITION without one.
absl::Status SaveAdapter(const GradientEngine& engine, const std::string& dir, const std::string& base_model);

// The Adam second moments of the selected parameters (v / (1 - beta2^step)), one tensor per parameter named as
// in params(), plus "__metadata__" {step, beta2, eps}: the preconditioner EngineOptions::preconditioner_path
// reads. FAILED_PRECONDITION before the first TrainStep.
absl::Status SaveOptimizerState(const GradientEngine& engine, const std::string& path, const AdamWOptions& options);

// Every weight as a Hugging Face LlamaForCausalLM directory (config.json + model.safetensors, float32; an attached
// adapter merged in; llama2.c's interleaved RoPE pairs permuted to Hugging Face's rotate-half order), so that
// transformers and the peers of bench/peers load the same function. GradientEngine::Load reads it back with equal
// logits.
absl::Status SaveHf(const GradientEngine& engine, const std::string& dir);

// Every weight as a llama2.c v0 checkpoint (llama2.c bases only; an attached adapter is merged in).
absl::Status SaveLlama2c(const GradientEngine& engine, const std::string& path);

// Greedy decoding after the Alpaca prompt, until EOS or max_new tokens; returns the decoded text.
absl::StatusOr<std::string> Generate(const GradientEngine& engine, const std::string& instruction,
                                     const std::string& input, int max_new);
// Greedy generation for a chat: the conversation (its trailing assistant turn, if any, left out) rendered with the
// chat template's generation prompt; stops at EOS or the template's end-of-turn token.
absl::StatusOr<std::string> GenerateChat(const GradientEngine& engine, std::vector<Message> messages, int max_new);

}  // namespace rapidin::model

#endif  // RAPIDIN_MODEL_TRAINING_H_
