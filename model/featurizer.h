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

struct FeaturizerOptions {
  EngineOptions engine;
  int64_t k = 4096;
  int lambda = 4;
  uint64_t seed = 0;
  // Scale every compressed record/query vector to unit L2 norm, so that the inner product is a cosine (on top of
  // the layer-wise normalisation). Per-token sketches are left as they are.
  bool unit_norm = false;
  // Per-token gradients for token attributions (all exact; kLoop is the slow reference).
  TokenGradMethod token_method = TokenGradMethod::kShared;
};

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

  // out receives k floats. Timing breakdown (seconds) is added to *timing when non-null.
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

  // The training-side token view of record t for a compressed query q (k values of this featurizer):
  // I = <N(grad L(t)), C^T q> = <C(N(grad L(t))), q>, the store's score of t (before unit normalisation, which
  // only rescales it), and per token of t.ids its gradient-times-input (GradientEngine::InfluenceTokens).
  // Errors: INVALID_ARGUMENT for a q of the wrong size; those of InfluenceTokens.
  absl::StatusOr<double> RecordTokenInfluence(const TokenizedExample& t, const std::vector<float>& q,
                                              std::vector<double>* scores) const;

  const GradientEngine& engine() const { return *engine_; }
  const kernels::RapidGrad& sketch() const { return *sketch_; }
  // "rapidgrad/v1 d=.. k=.. lambda=.. seed=..\nmodel=<hash> max_length=.. tensors=..\n", then, when either
  // differs from the default, "score=<dot|cosine> precondition=<none|adam-v/<hash>,eps=..>\n".
  const std::string& projection_state() const { return state_; }

 private:
  Featurizer() = default;
  struct Device;  // the device sketch (featurizer.cc)
  std::unique_ptr<Device> device_;
  std::unique_ptr<GradientEngine> engine_;
  std::unique_ptr<kernels::RapidGrad> sketch_;
  std::string state_;
  TokenGradMethod token_method_ = TokenGradMethod::kShared;
  bool unit_norm_ = false;
};

// The sketch parameters, max_length and score (dot or cosine) recorded in a projection state, on top of `engine`
// (model paths). Errors: FAILED_PRECONDITION when the state is not a rapidgrad/v1 state, or when it was made
// with a preconditioner and engine.preconditioner_path is empty (say which file is needed).
absl::StatusOr<FeaturizerOptions> OptionsFromState(const std::string& state, const EngineOptions& engine);

// "" when the two projection states are equal, otherwise which fields differ, in words.
std::string DescribeStateDifference(const std::string& store_state, const std::string& model_state);

}  // namespace rapidin::model

#endif  // RAPIDIN_MODEL_FEATURIZER_H_
