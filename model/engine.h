// The gradient engine: start here for model/.
//
// Loads a Llama-architecture causal LM (llama2.c checkpoint + tokenizer) and computes, per record, the gradient
// of the LM loss on the response tokens with respect to the selected parameters, layer-wise L2-normalised and
// concatenated (the `N(grad L(z))` of ARCHITECTURE.md). LibTorch stays behind this header.
//
// Records become tokens with the Alpaca prompt template RapidIn uses:
//   [BOS] encode(prompt) encode(output) [EOS]; the loss is the mean next-token cross-entropy over the output
//   tokens and EOS (the logit at position t predicts token t+1; prompt positions are masked).
// Records longer than max_length are truncated at the end (counted in GradInfo::truncated).
//
// Thread-safety: Gradient, Loss, Tokenize, MeanNll and TokenGradientsIds may run concurrently (autograd::grad,
// no shared .grad; the hand-written passes only read the weights and keep their scratch per thread).
#ifndef RAPIDIN_MODEL_ENGINE_H_
#define RAPIDIN_MODEL_ENGINE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/chat.h"
#include "model/prompt.h"
#include "model/tokenizer.h"

namespace rapidin::model {

struct ModelConfig {
  int dim = 0, hidden_dim = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, vocab_size = 0, seq_len = 0;
  bool tied_output = true;
  float norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
  int head_dim = 0;  // 0: dim / n_heads (Gemma and Mistral configurations may set another)
  int HeadDim() const { return head_dim > 0 ? head_dim : dim / n_heads; }
};

struct EngineOptions {
  // A llama2.c checkpoint (.bin), or a Hugging Face model directory (config.json + model.safetensors or
  // model.safetensors.index.json with its shards) of LlamaForCausalLM (rope_scaling linear or llama3 included),
  // MistralForCausalLM, Qwen2ForCausalLM, GemmaForCausalLM, Gemma2ForCausalLM or Phi3ForCausalLM. Another
  // architecture, or a config field that changes the function and is not implemented, is refused by name.
  std::string model_path;
  // llama2.c tokenizer.bin, SentencePiece tokenizer.model or Hugging Face tokenizer.json.
  std::string tokenizer_path;
  // Chat records: a template file (JSON, model/chat.h's TemplateSpec) or a built-in family name (chatml, llama3,
  // llama2, mistral, gemma). Empty: the chat_template of the tokenizer_config.json next to the tokenizer,
  // recognised by family; without one, chat records are refused (Alpaca and text records need none).
  std::string chat_template;
  // A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors); its A/B matrices become
  // the parameters whose gradients are taken (unless param_pattern says otherwise).
  std::string adapter_path;
  std::string param_pattern;    // ECMAScript regex over parameter names; empty: every weight matrix (2-D)
  int max_length = 512;         // tokens, BOS and EOS included
  bool use_double = false;      // compute in float64 (tests)
  // Optimizer-aware preconditioning (TrackStar, LESS): a safetensors file of Adam second moments v (bias-corrected,
  // one tensor per selected parameter, named as in params(); written by SaveOptimizerState). Each gradient
  // element is divided by sqrt(v) + eps before the layer-wise normalisation, for records and queries alike.
  // Empty: no preconditioning. The file's content enters model_hash(), so a store cached with one
  // preconditioner is never scored with gradients made under another.
  std::string preconditioner_path;
  // Where the weights live and gradients are computed: "cpu", "cuda" (= "cuda:0"), "cuda:N", or "auto" (cuda:0
  // when this LibTorch build has CUDA and a device is visible, else cpu). The *Ids methods bring gradients back
  // to host memory, the *Rows methods leave them on the device. The same inputs give the same gradients on every
  // device up to rounding (no TF32), so a store cached on one device can be queried with gradients from another.
  std::string device = "cpu";
  // How per-record gradients are computed on the CPU: "direct", a hand-written forward and backward pass
  // (model/internal/llama_grad.h) where it applies (plain Llama, every selected parameter a weight matrix, no
  // adapter, CPU), else LibTorch autograd; "autograd": LibTorch autograd always (the reference the direct pass
  // is tested against, and the benchmarks' before). Both give the same gradients up to rounding.
  std::string grad_path = "direct";
};

// What this process's LibTorch offers: its version, and how many CUDA devices it can use (0 for a CPU-only
// build such as Debian's, or when no GPU is visible).
struct TorchRuntime {
  std::string version;
  int cuda_devices = 0;
};
TorchRuntime GetTorchRuntime();

// How per-token gradients are computed.
enum class TokenGradMethod {
  kLoop,    // the reference: one forward and one autograd backward pass per token
  kCopies,  // copies of the sequence's prefixes, `chunk` per padded autograd pass
  kShared,  // one forward pass for all tokens, then a hand-written backward of `chunk` token losses at once
};

struct TokenGradOptions {
  TokenGradMethod method = TokenGradMethod::kShared;  // under grad_path "direct": the direct pass's token form
  int chunk = 16;         // tokens per backward pass (kCopies, kShared)
  int threads = 1;        // chunks are spread over this many threads
  bool normalize = true;  // layer-wise unit L2 norm, per token
};

// What a record is made of. Alpaca: instruction/input/output through the Alpaca prompt, the loss on the output.
// Chat: messages through the model's chat template, the loss on the assistant turns (their contents and
// end-of-turn markers). Text: plain text, the loss on every token (pretraining-style).
enum class RecordFormat { kAlpaca, kChat, kText };

struct Example {
  std::string instruction, input, output;
  // RapidIn's hotwords: when non-empty, the loss covers only the output tokens that overlap an occurrence of one
  // of these strings in `output` (query side; for a chat, in the last assistant message).
  std::vector<std::string> hotwords;
  RecordFormat format = RecordFormat::kAlpaca;
  std::vector<Message> messages;  // kChat
  std::string text;               // kText
  // kChat: the loss covers the last assistant turn only (a query: the generation being explained), not every one.
  bool last_turn_only = false;
};

// Where a token came from: a field of the record ("instruction", "input", "output", "text", "messages[i]" for
// message i's content) with byte offsets into it, or "template" with offsets into the formatted prompt or the
// rendered conversation (BOS: an empty span).
struct TokenPlace {
  std::string field;
  Span span;
};

// Sets LibTorch's intra-op thread count for this process (1 is best when records are spread over threads).
void SetComputeThreads(int threads);

struct ParamInfo {
  std::string name;
  int64_t numel = 0;
  int64_t offset = 0;  // in the concatenated gradient
};

struct TokenizedExample {
  std::vector<int32_t> ids;   // BOS, prompt, response, EOS (possibly truncated)
  int32_t response_begin = 0; // index of the first response token in ids
  bool truncated = false;
  std::vector<Span> response_spans;  // byte spans of the response tokens in Example::output (EOS: empty at end)
  std::vector<Span> prompt_spans;    // byte spans of the prompt tokens in AlpacaPrompt(instruction, input)
  std::vector<double> loss_weights;  // per response token; empty: uniform (the mean over response tokens)
  std::vector<TokenPlace> places;    // one per id (Tokenize fills it; records built from ids leave it empty)
};

struct GradInfo {
  int tokens = 0;
  int response_tokens = 0;
  bool truncated = false;
  double loss = 0;
};

class GradientEngine {
 public:
  // Errors: NOT_FOUND (missing file), DATA_LOSS (malformed file), INVALID_ARGUMENT (options, or a pattern that
  // selects no parameter), FAILED_PRECONDITION (a CUDA device asked for that this LibTorch cannot use).
  // Every method below returns LibTorch's failures (CUDA out of memory, say) as RESOURCE_EXHAUSTED or INTERNAL
  // instead of throwing.
  static absl::StatusOr<std::unique_ptr<GradientEngine>> Load(const EngineOptions& options);
  // A randomly initialised model (tests): no tokenizer; use the *Ids methods.
  static absl::StatusOr<std::unique_ptr<GradientEngine>> Random(const ModelConfig& config, uint64_t seed,
                                                                const EngineOptions& options);
  // A larger model of the same architecture that starts out computing base's function (for a model too small to
  // learn a task: fine-tune the grown one). base's weights fill the leading block of every tensor; the new
  // heads, kv heads, FFN units and layers read the residual stream through fresh N(0, init_std^2) weights and
  // write to it through zeros (wo, w2, the new embedding columns), so the new residual dimensions stay 0 until
  // training moves them; RMSNorm weights are scaled by sqrt(base dim / dim) to keep the normalised values. New
  // layers follow base's. Equal logits up to the RMSNorm epsilon's share (exactly with norm_eps = 0).
  // target must keep head_dim, the query-per-kv-head group, vocab_size, seq_len and tied_output, and not shrink.
  // An adapter on base is merged. The tokenizer and options come from `options` (model_path is ignored).
  // Errors: INVALID_ARGUMENT for a target that cannot hold base.
  static absl::StatusOr<std::unique_ptr<GradientEngine>> Grow(const GradientEngine& base, const ModelConfig& target,
                                                              uint64_t seed, double init_std,
                                                              const EngineOptions& options);
  ~GradientEngine();

  const ModelConfig& config() const;
  std::string device() const;  // resolved: "cpu" or "cuda:N"
  // The path per-record gradients take: "direct" or "autograd" (EngineOptions::grad_path, resolved).
  std::string grad_path() const;
  int cuda_device() const;     // N for "cuda:N", -1 on the CPU
  const std::vector<ParamInfo>& params() const;  // the selected parameters, in gradient order
  int64_t grad_dim() const;
  // Identifies weights (adapter included) + parameter selection + template + max_length (hex).
  std::string model_hash() const;
  // "none", or "adam-v/<hash of the preconditioner's values>,eps=<eps>".
  std::string preconditioner() const;
  // 1 / (sqrt(v) + eps) per gradient element (grad_dim() values, gradient order), or empty without a
  // preconditioner (benchmarks derive preconditioned and plain scores from one gradient pass).
  std::vector<double> PreconditionerValues() const;
  const Tokenizer* tokenizer() const;

  // Errors: INVALID_ARGUMENT when the prompt alone exceeds max_length, a hotword does not occur in the output, a
  // chat has no assistant turn or breaks its template's rules, or a text is empty; FAILED_PRECONDITION for a
  // chat when no chat template is known (the message says why).
  absl::StatusOr<TokenizedExample> Tokenize(const Example& ex) const;
  // The chat template chat records use ("" when none), and why there is none.
  std::string chat_template() const;
  // Mean NLL (nats/token) of [BOS] encode(text) predicting every token after BOS.
  absl::StatusOr<double> MeanNll(const std::string& text, int64_t* tokens) const;

  // Response-loss gradient. normalize: layer-wise unit L2 norm per parameter tensor (zero gradients stay zero).
  // out receives grad_dim() values.
  absl::StatusOr<GradInfo> Gradient(const Example& ex, bool normalize, std::vector<float>* out) const;
  absl::StatusOr<GradInfo> GradientIds(const TokenizedExample& t, bool normalize, std::vector<double>* out) const;
  // Per-record gradients of several records from one padded forward and one backward pass: each linear layer's
  // per-sample weight gradient is dy_b^T x_b from its recorded input and output gradient. Equal to GradientIds
  // per record up to rounding. When a selected parameter is not a weight matrix it falls back to the loop.
  absl::Status GradientIdsBatch(const std::vector<TokenizedExample>& batch, bool normalize,
                                std::vector<std::vector<double>>* out, std::vector<GradInfo>* infos) const;
  // GradientIdsBatch for a consumer on the engine's device (the GPU sketch): the gradients, rounded to float32,
  // as one row-major batch x grad_dim buffer in the engine's device memory (host memory on "cpu"), valid only
  // during `consume`, whose status is returned. On a CUDA device the engine waits for the device before
  // calling `consume`, so the values are there for any stream or CUDA runtime (rapidin's kernels link their own).
  // Saves the copy of every full gradient to the host. Errors: INVALID_ARGUMENT for an empty batch.
  using RowsConsumer = std::function<absl::Status(const float* rows, int64_t batch)>;
  absl::Status GradientRowsBatch(const std::vector<TokenizedExample>& batch, bool normalize,
                                 const RowsConsumer& consume, std::vector<GradInfo>* infos) const;
  // Per-token gradients: for every position s in [from, ids.size()), the gradient of the single-token loss
  // l_s = -log p(ids[s] | ids[<s]) (token-wise attribution); (*out)[s - from] receives grad_dim() values.
  // Every method gives the same values up to rounding (tests compare them in float64).
  // Errors: INVALID_ARGUMENT for an empty range, a token id out of range, or more tokens than the context.
  absl::Status TokenGradientsIds(const std::vector<int32_t>& ids, int from, const TokenGradOptions& options,
                                 std::vector<std::vector<double>>* out) const;
  // TokenGradientsIds for a consumer on the engine's device (the GPU sketch): each chunk of consecutive tokens
  // as one row-major n x grad_dim float32 buffer in the engine's device memory, valid during
  // consume(rows, first, n), where rows are the tokens from + first .. from + first + n - 1 (stream as for
  // GradientRowsBatch). Chunks arrive in any order and, with options.threads > 1, from several threads at once.
  using TokenRowsConsumer = std::function<absl::Status(const float* rows, int first, int n)>;
  absl::Status TokenGradientRows(const std::vector<int32_t>& ids, int from, const TokenGradOptions& options,
                                 const TokenRowsConsumer& consume) const;
  // The token view's scores without the per-token vectors: (*scores)[s - from] = <N(grad l_s), u> for s in
  // [from, ids.size()), N the layer-wise normalisation (options.normalize) after any preconditioning, u grad_dim()
  // values (a pulled-back compressed query C^T q, so that the score is <C(N(grad l_s)), q>). Each token's block is
  // reduced as it comes (a dot product and a norm per block), so no row of grad_dim() values is written or
  // sketched. Same methods, threads and errors as TokenGradientsIds; INVALID_ARGUMENT for a u of the wrong size.
  absl::Status TokenScores(const std::vector<int32_t>& ids, int from, const TokenGradOptions& options,
                           const std::vector<double>& u, std::vector<double>* scores) const;
  absl::StatusOr<double> LossIds(const TokenizedExample& t) const;
  // Training-side token attribution. For a record t and a direction u in gradient space (grad_dim() values; the
  // pulled-back compressed query C^T q, say), the influence I = <N(grad L(t)), u>, N the layer-wise
  // normalisation (after any preconditioning). Token s's input embedding is taken as m + alpha_s (e_s - m), m the
  // mean embedding row, so alpha_s = 1 is the record itself and alpha_s = 0 removes what is specific to token s.
  // Returns I and, in (*scores)[s] for every token s of t.ids, gradient x input: dI/d alpha_s at alpha = 1 (one
  // double backward pass; prompt tokens, a trigger among them, reach I through the response tokens' loss).
  // With token_scale (t.ids.size() values) only I at alpha = token_scale is computed and scores is left alone
  // (the finite-difference reference of the tests). Without `normalize`, N is the preconditioning alone (no
  // layer-wise norm), as GradientIds(normalize=false). Errors: INVALID_ARGUMENT for a u or token_scale of the
  // wrong size or a record CheckRecord refuses.
  absl::StatusOr<double> InfluenceTokens(const TokenizedExample& t, const std::vector<double>& u,
                                         std::vector<double>* scores,
                                         const std::vector<double>* token_scale = nullptr,
                                         bool normalize = true) const;
  // Logits of a token sequence, T x vocab, row-major (reference comparisons).
  absl::StatusOr<std::vector<float>> LogitsIds(const std::vector<int32_t>& ids) const;
  // Fine-tuning, saving and generation: model/training.h. Test hooks: model/testing.h.

 private:
  // Defined in model/internal/engine_impl.h; model/'s own translation units (training, testing hooks, per-token
  // gradients) reach it through EngineAccess.
  struct Impl;
  friend struct EngineAccess;
  explicit GradientEngine(std::unique_ptr<Impl> impl);
  static absl::StatusOr<std::unique_ptr<GradientEngine>> LoadHf(const EngineOptions& options);
  std::unique_ptr<Impl> impl_;
};

}  // namespace rapidin::model

#endif  // RAPIDIN_MODEL_ENGINE_H_
