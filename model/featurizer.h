// Featurizer: a record or a generation -> its compressed gradient C(N(grad L)), K floats.
//
// Owns a GradientEngine and a RapidGrad sketch sized to the engine's gradient. Its projection state is the text
// blob that a store's manifest records: the sketch parameters and the model hash (weights, parameter selection,
// prompt template, max length). A store is only ever scored with vectors made from an identical state.
// Thread-safety: Compress may run concurrently.
#ifndef RAPIDIN_MODEL_FEATURIZER_H_
#define RAPIDIN_MODEL_FEATURIZER_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/rapidgrad.h"
#include "model/engine.h"

namespace rapidin::model {
namespace internal {
class DeviceSketch;  // model/internal/device_sketch.h
}  // namespace internal

// An earlier checkpoint of the fine-tuning run, for TracIn-CP (Pruthi et al. 2020).
struct CheckpointOptions {
  std::string model_path;           // llama2.c checkpoint or Hugging Face directory (the base model under LoRA)
  std::string adapter_path;         // PEFT adapter of that checkpoint, or empty
  std::string preconditioner_path;  // its Adam second moments, or empty (no preconditioning)
  double weight = 1;                // its learning rate
};

struct FeaturizerOptions {
  EngineOptions engine;
  int64_t k = 4096;
  int lambda = 4;
  uint64_t seed = 0;
  // Scale every compressed record/query vector to unit L2 norm, so that the inner product is a cosine (on top of
  // the layer-wise normalisation). Per-token sketches are left as they are.
  bool unit_norm = false;
  // false: no layer-wise normalisation (plain TracIn's inner product, after any preconditioning), so a record's
  // gradient norm counts. The projection state says "normalize=none". Measured in bench/results/lds.md.
  bool layer_norm = true;
  // Per-token gradients for token attributions (all exact; kLoop is the slow reference).
  TokenGradMethod token_method = TokenGradMethod::kShared;
  // TracIn-CP: earlier checkpoints (same architecture and parameter selection, same tokenizer as `engine`, which
  // is the last checkpoint). A vector is then the concatenation over the checkpoints, earliest first and
  // `engine` last, of sqrt(weight_c) * C(N(grad L at checkpoint c)): its inner product with another is
  // sum_c weight_c <C N g_c(z), C N g_c(q)>, TracIn-CP's sum, and dim() = k * (checkpoints.size() + 1).
  // Under `unit_norm` the whole concatenation is normalised. The training-side influence view sums over the
  // checkpoints too; the token-loss and generation-side views use `engine` alone.
  std::vector<CheckpointOptions> checkpoints;
  double weight = 1;  // `engine`'s weight (its learning rate) when checkpoints is not empty
};

// Reads the checkpoint list of a `rapidin finetune --json` summary (its "checkpoints": epoch, path,
// optimizer_state, lr; the last is the final model) into fo->checkpoints and fo->weight. The last checkpoint must
// be the model (full fine-tuning) or the adapter (LoRA) that fo->engine names. With `precondition`, each
// checkpoint uses its own optimizer state. Errors: NOT_FOUND / DATA_LOSS for a missing or malformed file;
// INVALID_ARGUMENT when the last checkpoint is not fo->engine's model, or when there is only one checkpoint.
absl::Status ReadFinetuneCheckpoints(const std::string& summary_path, bool precondition, FeaturizerOptions* fo);

// Fills eo->tokenizer_path when empty: tokenizer.bin or tok512.bin next to a llama2.c checkpoint, tokenizer.model
// in a Hugging Face directory. INVALID_ARGUMENT when a llama2.c checkpoint has none beside it.
absl::Status ResolveTokenizer(EngineOptions* eo);

// With the engine on a CUDA device (and the CUDA layer built), Compress and CompressBatch sketch each gradient on
// that device (gpu::GpuSketch, bitwise equal to the CPU sketch) from the engine's device buffer, so only K floats
// per record come back to the host. A compressed gradient that is not finite (the model overflows on the example)
// is FAILED_PRECONDITION, per record in CompressBatch.
class Featurizer {
 public:
  // Errors: those of GradientEngine::Load; INVALID_ARGUMENT when no tokenizer is given or found (ResolveTokenizer).
  static absl::StatusOr<std::unique_ptr<Featurizer>> Create(const FeaturizerOptions& options);
  ~Featurizer();

  // out receives dim() floats. Timing breakdown (seconds) is added to *timing when non-null.
  struct Timing {
    double grad = 0, normalize = 0, sketch = 0;
  };
  absl::StatusOr<GradInfo> Compress(const Example& ex, std::vector<float>* out, Timing* timing = nullptr) const;

  // Several records through one padded forward/backward (GradientEngine::GradientIdsBatch). A record that
  // cannot be tokenised gets its error in (*infos)[i] and is left out of the batch.
  void CompressBatch(const std::vector<Example>& exs, std::vector<std::vector<float>>* out,
                     std::vector<absl::StatusOr<GradInfo>>* infos, Timing* timing = nullptr) const;

  // C(N(grad l_s)) for every token s in [from, ids.size()) (token-wise attribution), one K-vector each.
  absl::Status TokenSketches(const std::vector<int32_t>& ids, int from, std::vector<std::vector<float>>* out) const;

  // The same tokens' scores against a compressed query q (dim() values; its final checkpoint's part):
  // (*out)[s - from] = <C(N(grad l_s)), q>, computed as <N(grad l_s), C^T q> (GradientEngine::TokenScores), so no
  // token's gradient is sketched or kept. Errors: INVALID_ARGUMENT for a q of the wrong size; as TokenSketches.
  absl::Status TokenScores(const std::vector<int32_t>& ids, int from, const std::vector<float>& q,
                           std::vector<double>* out) const;

  // The training-side token view of record t for a compressed query q (dim() values of this featurizer):
  // I = <N(grad L(t)), C^T q> = <C(N(grad L(t))), q>, the store's score of t (before unit normalisation, which
  // only rescales it), and per token of t.ids its gradient-times-input (GradientEngine::InfluenceTokens). Under
  // TracIn-CP both are sums over the checkpoints (one double backward each), so that I is the store's score.
  // Errors: INVALID_ARGUMENT for a q of the wrong size; those of InfluenceTokens.
  absl::StatusOr<double> RecordTokenInfluence(const TokenizedExample& t, const std::vector<float>& q,
                                              std::vector<double>* scores) const;

  // Values per vector: k, or k * checkpoints under TracIn-CP.
  int64_t dim() const { return sketch_->params().k * static_cast<int64_t>(earlier_.size() + 1); }
  // Where the final checkpoint's k values start in a vector (0 without TracIn-CP): token sketches, which are
  // k values from engine(), are scored against that part.
  int64_t final_offset() const { return sketch_->params().k * static_cast<int64_t>(earlier_.size()); }
  const GradientEngine& engine() const { return *engine_; }
  const kernels::RapidGrad& sketch() const { return *sketch_; }
  // "rapidgrad/v1 d=.. k=.. lambda=.. seed=..\nmodel=<hash> max_length=.. tensors=..\n", then, when either
  // differs from the default, "score=<dot|cosine> precondition=<none|adam-v/<hash>,eps=..>[ normalize=none]\n",
  // then under
  // TracIn-CP "tracincp=<checkpoints> weights=<w,..> earlier=<model hash,..>\n".
  const std::string& projection_state() const { return state_; }

 private:
  Featurizer() = default;
  // Per-token options for n tokens: the method, normalisation, threads and chunk size.
  TokenGradOptions TokenOptions(int n) const;
  // The compressed gradients of one engine (no unit normalisation), for the records of `batch`.
  absl::Status CompressWith(const GradientEngine& e, const std::vector<TokenizedExample>& batch,
                            std::vector<std::vector<float>>* out, std::vector<GradInfo>* gi, Timing* timing) const;
  // The sketch on the engine's GPU; null when the gradients come to the host (CPU engine, or no CUDA layer).
  std::unique_ptr<internal::DeviceSketch> device_sketch_;
  std::unique_ptr<GradientEngine> engine_;
  std::vector<std::unique_ptr<GradientEngine>> earlier_;  // TracIn-CP's earlier checkpoints
  std::vector<double> scale_;                             // sqrt(weight) per checkpoint, engine_ last
  std::unique_ptr<kernels::RapidGrad> sketch_;
  std::string state_;
  TokenGradMethod token_method_ = TokenGradMethod::kShared;
  bool unit_norm_ = false;
  bool layer_norm_ = true;
};

// The sketch parameters, max_length and score (dot or cosine) recorded in a projection state, on top of `engine`
// (model paths) and `checkpoints_summary` (TracIn-CP: a `rapidin finetune --json` summary, or empty). Errors:
// FAILED_PRECONDITION when the state is not a rapidgrad/v1 state, when it was made with a preconditioner and
// engine.preconditioner_path is empty, or when it was made with TracIn-CP and no summary is given (each says
// which file is needed); those of ReadFinetuneCheckpoints.
absl::StatusOr<FeaturizerOptions> OptionsFromState(const std::string& state, const EngineOptions& engine,
                                                   const std::string& checkpoints_summary = "");

// "" when the two projection states are equal, otherwise which fields differ, in words.
std::string DescribeStateDifference(const std::string& store_state, const std::string& model_state);

}  // namespace rapidin::model

#endif  // RAPIDIN_MODEL_FEATURIZER_H_
