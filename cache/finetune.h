// `rapidin finetune` and `rapidin eval`: fine-tuning with AdamW (full or LoRA) and per-record loss / greedy
// generation, on the instruction data format of `rapidin cache`. Thread-safety: each call owns its engine; calls
// on different outputs may run concurrently.
#ifndef RAPIDIN_CACHE_FINETUNE_H_
#define RAPIDIN_CACHE_FINETUNE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cache/cache.h"
#include "model/engine.h"
#include "model/training.h"

namespace rapidin::cache {

struct FinetuneOptions {
  model::EngineOptions engine;      // base model (+ tokenizer); param_pattern selects what full fine-tuning trains
  std::string data_path;
  std::string out_path;             // LoRA: adapter directory; full: llama2.c checkpoint file
  // The Adam second moments at the end (GradientEngine::SaveOptimizerState: the preconditioner of
  // `rapidin cache --preconditioner`). Empty: <out>/optimizer.safetensors for LoRA, <out>.optimizer.safetensors
  // for full fine-tuning.
  std::string optimizer_out;
  std::string mode = "lora";        // "lora" | "full"
  model::LoraConfig lora;
  model::AdamWOptions adam;
  int epochs = 1;
  // "constant", or "linear": step t of T uses adam.lr * (1 - t / T), decaying to 0 (a long run at a constant
  // 4e-3 diverged on the backdoor benchmark). A checkpoint's TracIn-CP weight is then the mean rate of the epoch
  // before it (of the first epoch for checkpoint 0).
  std::string lr_schedule = "constant";
  // Also save the model and its optimizer state after every N-th epoch (0: only at the end), for TracIn-CP
  // (`rapidin cache --checkpoint`): full: <out>.epoch-<e> (+ .optimizer.safetensors); LoRA: directory
  // <out>.epoch-<e>. The final model is always at out_path.
  int checkpoint_every = 0;
  // Also save after each of these epochs (with checkpoint_every or alone). TracIn-CP gains most from early
  // checkpoints, where a behaviour is still being learned and its gradients are large: e.g. {0, 1, 2, 3}.
  // Epoch 0 (full mode only) is the model before any step: <out>.epoch-0, with the second moments of the first
  // epoch as its optimizer state (the interval it opens; Adam has none before a step).
  std::vector<int> checkpoint_epochs;
  int batch_size = 8;
  uint64_t seed = 0;                // record order (and the LoRA initialisation)
  int threads = 2;                  // LibTorch intra-op threads
  bool progress = true;             // progress lines on stderr
};

struct FinetuneCheckpoint {
  int epoch = 0;
  std::string path, optimizer_path;
  double lr = 0;                    // the mean learning rate of the epoch before it (TracIn-CP's weight)
};

struct FinetuneSummary {
  int64_t records = 0, bad = 0, truncated = 0, steps = 0;
  std::vector<double> epoch_loss;   // mean training loss of each epoch (before each step's update)
  double seconds = 0;
  int64_t trained_parameters = 0;
  std::string out_path;
  std::string optimizer_path;
  std::vector<FinetuneCheckpoint> checkpoints;  // intermediate ones, then the final model
  std::vector<BadRecord> bad_records;
};

// Errors: those of the model loader and the data reader; INVALID_ARGUMENT for bad settings.
absl::StatusOr<FinetuneSummary> RunFinetune(const FinetuneOptions& options);

struct EvalRecord {
  std::string id;
  double loss = 0;                  // mean response loss (nats/token) of the record's output
  int response_tokens = 0;
  std::string generation;           // greedy continuation of the prompt (when asked for)
};

// Per record of the data file: the response loss, and with max_new > 0 a greedy generation.
absl::StatusOr<std::vector<EvalRecord>> RunEval(const model::EngineOptions& engine, const std::string& data_path,
                                                int max_new, std::vector<BadRecord>* bad);

// One JSON line {id, loss, response_tokens[, generation]} (no newline). A greedy generation can end inside a
// multi-byte character (byte-fallback tokens), so its invalid UTF-8 bytes become U+FFFD instead of failing.
std::string EvalJsonLine(const EvalRecord& e, bool with_generation);

}  // namespace rapidin::cache

#endif  // RAPIDIN_CACHE_FINETUNE_H_
