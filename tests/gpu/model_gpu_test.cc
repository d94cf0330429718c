// The gradient engine on a CUDA device against the same engine on the CPU: per-record gradients (one by one and
// batched), per-token gradients (every method, several threads), losses, logits and AdamW steps, in float64 (to
// 1e-10) and float32 (to 1e-4 of the largest value, no TF32); with stories260K (when the shared data is there),
// the same projection state and sketches on both devices, so that a store cached on one is queried from the other;
// the GPU featurizer's device sketch bitwise equal to the CPU sketch of the same gradient (per-token sketches to
// 1e-5); and a CUDA
// out-of-memory error returned as RESOURCE_EXHAUSTED, after which the engine still works.
// Needs a LibTorch built with CUDA (Debian's is CPU-only: `scripts/gpu-check.sh pack` builds against PyTorch's)
// and a visible GPU; skips otherwise.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "model/engine.h"
#include "model/featurizer.h"
#include "model/testing.h"
#include "model/training.h"
#include "tests/test_util.h"

namespace rapidin::model {
namespace {

using rapidin::testing::MaxAbs;

#define REQUIRE_CUDA_LIBTORCH()                                                                                \
  do {                                                                                                         \
    const TorchRuntime rt = GetTorchRuntime();                                                                 \
    if (rt.cuda_devices == 0) {                                                                                \
      GTEST_SKIP() << "LibTorch " << rt.version                                                                \
                   << " sees no CUDA device (a CPU-only build such as Debian's, or no GPU visible)";           \
    }                                                                                                          \
  } while (0)

ModelConfig Small(bool tied) {
  ModelConfig c;
  c.dim = 64;
  c.hidden_dim = 160;
  c.n_layers = 3;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.vocab_size = 97;
  c.seq_len = 200;
  c.tied_output = tied;
  return c;
}

// The same random model on the CPU and on cuda:0 (weights are drawn on the host, then moved).
std::pair<std::unique_ptr<GradientEngine>, std::unique_ptr<GradientEngine>> Pair(const ModelConfig& c, uint64_t seed,
                                                                                 bool use_double,
                                                                                 const std::string& pattern) {
  EngineOptions o;
  o.use_double = use_double;
  o.param_pattern = pattern;
  auto cpu = GradientEngine::Random(c, seed, o);
  o.device = "cuda";
  auto gpu = GradientEngine::Random(c, seed, o);
  EXPECT_TRUE(cpu.ok()) << cpu.status();
  EXPECT_TRUE(gpu.ok()) << gpu.status();
  if (!cpu.ok() || !gpu.ok()) return {};
  EXPECT_EQ((*gpu)->device(), "cuda:0");
  EXPECT_EQ((*gpu)->cuda_device(), 0);
  EXPECT_EQ((*cpu)->model_hash(), (*gpu)->model_hash());
  return {std::move(*cpu), std::move(*gpu)};
}

// max |a - b| <= rel * max(1e-300, max |a|), and not a comparison of zeros.
void ExpectClose(const std::vector<double>& a, const std::vector<double>& b, double rel, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  const double big = MaxAbs(a);
  ASSERT_GT(big, 1e-6) << what << ": the reference is zero";
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(a[i] - b[i]);
    if (d > worst) worst = d, at = i;
  }
  EXPECT_LE(worst, rel * big) << what << ": element " << at << ": " << a[at] << " against " << b[at];
}

std::vector<TokenizedExample> RandomRecords(std::mt19937& rng, int vocab) {
  std::vector<TokenizedExample> out;
  for (int len : {40, 77, 150}) {
    TokenizedExample t;
    for (int i = 0; i < len; ++i) t.ids.push_back(static_cast<int32_t>(rng() % vocab));
    if (t.ids[1] == t.ids[0]) t.ids[1] = (t.ids[0] + 1) % vocab;
    t.response_begin = 1 + static_cast<int>(rng() % (len / 2));
    out.push_back(t);
  }
  out[1].loss_weights.assign(out[1].ids.size() - out[1].response_begin, 0.0);  // hotword-style weights
  for (size_t i = 0; i < out[1].loss_weights.size(); i += 3) out[1].loss_weights[i] = 1.0;
  return out;
}

void CompareEverything(const GradientEngine& cpu, const GradientEngine& gpu, std::mt19937& rng, double rel) {
  const auto recs = RandomRecords(rng, cpu.config().vocab_size);
  for (size_t r = 0; r < recs.size(); ++r) {
    for (bool normalize : {false, true}) {
      std::vector<double> a, b;
      auto ia = cpu.GradientIds(recs[r], normalize, &a);
      auto ib = gpu.GradientIds(recs[r], normalize, &b);
      ASSERT_TRUE(ia.ok() && ib.ok()) << ia.status() << " / " << ib.status();
      ExpectClose(a, b, rel, absl::StrCat("GradientIds record ", r, " normalize ", normalize));
      EXPECT_NEAR(ia->loss, ib->loss, rel * std::max(1.0, std::fabs(ia->loss)));
    }
    auto la = cpu.LossIds(recs[r]);
    auto lb = gpu.LossIds(recs[r]);
    ASSERT_TRUE(la.ok() && lb.ok());
    EXPECT_NEAR(*la, *lb, rel * std::max(1.0, std::fabs(*la)));
  }
  std::vector<std::vector<double>> ga, gb;
  std::vector<GradInfo> ia, ib;
  ASSERT_TRUE(cpu.GradientIdsBatch(recs, true, &ga, &ia).ok());
  ASSERT_TRUE(gpu.GradientIdsBatch(recs, true, &gb, &ib).ok());
  for (size_t r = 0; r < recs.size(); ++r) ExpectClose(ga[r], gb[r], rel, absl::StrCat("GradientIdsBatch ", r));

  auto fa = cpu.LogitsIds(recs[0].ids);
  auto fb = gpu.LogitsIds(recs[0].ids);
  ASSERT_TRUE(fa.ok() && fb.ok());
  ExpectClose(std::vector<double>(fa->begin(), fa->end()), std::vector<double>(fb->begin(), fb->end()), rel, "logits");

  const auto& ids = recs[2].ids;  // 150 tokens: several 64-row causal blocks in the shared method
  for (const auto& [method, chunk, threads] : std::vector<std::tuple<TokenGradMethod, int, int>>{
           {TokenGradMethod::kShared, 8, 1}, {TokenGradMethod::kShared, 16, 2}, {TokenGradMethod::kCopies, 4, 1}}) {
    TokenGradOptions o;
    o.method = method;
    o.chunk = chunk;
    o.threads = threads;
    const int from = method == TokenGradMethod::kCopies ? 130 : 1;  // copies redo every prefix: keep it short
    std::vector<std::vector<double>> ta, tb;
    ASSERT_TRUE(cpu.TokenGradientsIds(ids, from, o, &ta).ok());
    const absl::Status st = gpu.TokenGradientsIds(ids, from, o, &tb);
    ASSERT_TRUE(st.ok()) << st;
    ASSERT_EQ(ta.size(), tb.size());
    for (size_t t = 0; t < ta.size(); t += 7) {
      ExpectClose(ta[t], tb[t], rel, absl::StrCat("token ", from + t, " method ", static_cast<int>(method)));
    }
  }
}

TEST(ModelGpu, GradientsEqualCpuInFloat64) {
  REQUIRE_CUDA_LIBTORCH();
  std::mt19937 rng(std::random_device{}());
  for (bool tied : {true, false}) {
    for (const std::string sel : {"matrices", "all", "lora"}) {
      SCOPED_TRACE(absl::StrCat("tied=", tied, " selection=", sel));
      auto [cpu, gpu] = Pair(Small(tied), rng(), true, sel == "all" ? ".*" : "");
      ASSERT_TRUE(cpu && gpu);
      if (sel == "lora") {
        LoraConfig lc;
        lc.rank = 4;
        lc.seed = rng();
        ASSERT_TRUE(model::AddLora(cpu.get(), lc).ok());
        ASSERT_TRUE(model::AddLora(gpu.get(), lc).ok());
        for (size_t p = 0; p < cpu->params().size(); ++p) {  // B starts at zero: give it values
          if (cpu->params()[p].name.find("lora_B") == std::string::npos) continue;
          for (int64_t i = 0; i < cpu->params()[p].numel; i += 3) {
            const double d = std::normal_distribution<double>(0, 0.3)(rng);
            ASSERT_TRUE(model::testing::Perturb(cpu.get(), static_cast<int>(p), i, d).ok());
            ASSERT_TRUE(model::testing::Perturb(gpu.get(), static_cast<int>(p), i, d).ok());
          }
        }
        ASSERT_EQ(cpu->model_hash(), gpu->model_hash());
      }
      CompareEverything(*cpu, *gpu, rng, 1e-10);
    }
  }
}

// Each float32 side against the CPU's float64 autograd reference first, so that a failure names the wrong side
// (the CPU's float32 pass is the hand-written one, which the GPU machine's host CPU runs with its own kernels).
TEST(ModelGpu, Float32AgreesWithCpuWithoutTf32) {
  REQUIRE_CUDA_LIBTORCH();
  std::mt19937 rng(std::random_device{}());
  const uint32_t seed = rng();
  auto [cpu, gpu] = Pair(Small(false), seed, false, "");
  ASSERT_TRUE(cpu && gpu);
  EngineOptions o;
  o.use_double = true;
  o.grad_path = "autograd";
  auto ref = GradientEngine::Random(Small(false), seed, o);
  ASSERT_TRUE(ref.ok()) << ref.status();
  {
    SCOPED_TRACE("CPU float32 against CPU float64");
    CompareEverything(**ref, *cpu, rng, 1e-4);
  }
  {
    SCOPED_TRACE("GPU float32 against CPU float64");
    CompareEverything(**ref, *gpu, rng, 1e-4);
  }
  SCOPED_TRACE("GPU float32 against CPU float32");
  CompareEverything(*cpu, *gpu, rng, 1e-4);
}

TEST(ModelGpu, AdamWStepsMatchCpu) {
  REQUIRE_CUDA_LIBTORCH();
  std::mt19937 rng(std::random_device{}());
  auto [cpu, gpu] = Pair(Small(true), rng(), true, "");
  ASSERT_TRUE(cpu && gpu);
  LoraConfig lc;
  lc.seed = rng();
  ASSERT_TRUE(model::AddLora(cpu.get(), lc).ok());
  ASSERT_TRUE(model::AddLora(gpu.get(), lc).ok());
  const auto recs = RandomRecords(rng, cpu->config().vocab_size);
  AdamWOptions o;
  o.lr = 1e-2;
  o.weight_decay = 0.01;
  for (int step = 0; step < 3; ++step) {
    auto a = model::TrainStep(cpu.get(), recs, o);
    auto b = model::TrainStep(gpu.get(), recs, o);
    ASSERT_TRUE(a.ok() && b.ok()) << a.status() << " / " << b.status();
    EXPECT_NEAR(*a, *b, 1e-10 * std::max(1.0, std::fabs(*a))) << "step " << step;
  }
  ExpectClose(model::testing::SelectedValues(*cpu), model::testing::SelectedValues(*gpu), 1e-9,
              "LoRA weights after 3 steps");
  // Every weight, not only the trained ones. Not the model hashes: they hash the weights rounded to float32, and
  // AdamW's first steps move each weight by about lr * sign(g), so a gradient that is zero up to rounding moves a
  // weight by a device-dependent 1e-12 and can flip a float32 rounding (the H200 run found different hashes).
  ExpectClose(model::testing::AllValues(*cpu), model::testing::AllValues(*gpu), 1e-9, "every weight after 3 steps");
}

TEST(ModelGpu, OutOfMemoryIsAStatusAndTheEngineRecovers) {
  REQUIRE_CUDA_LIBTORCH();
  ModelConfig c = Small(true);
  c.vocab_size = 1000000;  // per-token embedding gradients of 1000 tokens: 1000 x 1e6 x 64 floats, 256 GB
  c.seq_len = 1100;
  EngineOptions o;
  o.device = "cuda";
  o.param_pattern = ".*";
  auto e = GradientEngine::Random(c, 5, o);
  ASSERT_TRUE(e.ok()) << e.status();
  std::mt19937 rng(5);
  std::vector<int32_t> ids;
  for (int i = 0; i < 1001; ++i) ids.push_back(static_cast<int32_t>(rng() % c.vocab_size));
  TokenGradOptions to;
  to.chunk = 1000;
  std::vector<std::vector<double>> g;
  const absl::Status st = (*e)->TokenGradientsIds(ids, 1, to, &g);
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
  // Still usable, for a request that fits.
  to.chunk = 2;
  const std::vector<int32_t> few(ids.begin(), ids.begin() + 6);
  const absl::Status ok = (*e)->TokenGradientsIds(few, 4, to, &g);
  ASSERT_TRUE(ok.ok()) << ok;
  ASSERT_EQ(g.size(), 2u);
  EXPECT_GT(MaxAbs(g[1]), 0.0);
}

TEST(ModelGpu, StoriesSketchesMatchAcrossDevices) {
  REQUIRE_CUDA_LIBTORCH();
  const std::string data = rapidin::testing::SharedData();
  const std::string model = data + "/models/stories260K.bin", tok = data + "/models/tok512.bin";
  if (!std::ifstream(model).good() || !std::ifstream(tok).good()) {
    GTEST_SKIP() << "shared data not found at " << data << " (set RAPIDIN_SHARED_DATA)";
  }
  FeaturizerOptions fo;
  fo.engine.model_path = model;
  fo.engine.tokenizer_path = tok;
  fo.k = 4096;
  auto cpu = Featurizer::Create(fo);
  fo.engine.device = "cuda";
  auto gpu = Featurizer::Create(fo);
  ASSERT_TRUE(cpu.ok() && gpu.ok()) << cpu.status() << " / " << gpu.status();
  EXPECT_EQ((*cpu)->projection_state(), (*gpu)->projection_state());  // one store serves both
  const std::vector<Example> exs = {
      {"Tell me a story about a cat.", "", "Once upon a time, there was a cat named Tom. Tom liked to play.", {}},
      {"Write one sentence.", "about the sun", "The sun was big and warm, and Lily smiled at it.", {}}};
  std::vector<std::vector<float>> batched;
  std::vector<absl::StatusOr<GradInfo>> infos;
  (*gpu)->CompressBatch(exs, &batched, &infos);
  for (size_t i = 0; i < exs.size(); ++i) {
    std::vector<float> a, b;
    ASSERT_TRUE((*cpu)->Compress(exs[i], &a).ok());
    ASSERT_TRUE((*gpu)->Compress(exs[i], &b).ok());
    ExpectClose(std::vector<double>(a.begin(), a.end()), std::vector<double>(b.begin(), b.end()), 1e-4,
                absl::StrCat("sketch of example ", i));
    ASSERT_TRUE(infos[i].ok()) << infos[i].status();
    ExpectClose(std::vector<double>(b.begin(), b.end()), std::vector<double>(batched[i].begin(), batched[i].end()),
                1e-5, absl::StrCat("batched sketch of example ", i));
    // The GPU featurizer sketches the engine's device buffer on the device: bitwise the CPU sketch of the same
    // gradient brought to the host.
    auto t = (*gpu)->engine().Tokenize(exs[i]);
    ASSERT_TRUE(t.ok());
    std::vector<std::vector<double>> g;
    std::vector<GradInfo> gi;
    ASSERT_TRUE((*gpu)->engine().GradientIdsBatch({*t}, true, &g, &gi).ok());
    const std::vector<float> gf(g[0].begin(), g[0].end());
    std::vector<float> host(b.size());
    (*gpu)->sketch().Apply(gf.data(), host.data());
    EXPECT_EQ(host, b) << "example " << i;
    // Token sketches (attributions) on the device against the CPU sketch of the host per-token gradients.
    std::vector<std::vector<float>> tok;
    const int from = t->response_begin;
    ASSERT_TRUE((*gpu)->TokenSketches(t->ids, from, &tok).ok());
    std::vector<std::vector<double>> tg;
    ASSERT_TRUE((*gpu)->engine().TokenGradientsIds(t->ids, from, TokenGradOptions{}, &tg).ok());
    ASSERT_EQ(tok.size(), tg.size());
    for (size_t s = 0; s < tg.size(); s += 5) {
      const std::vector<float> f(tg[s].begin(), tg[s].end());
      std::vector<float> ref(b.size());
      (*gpu)->sketch().Apply(f.data(), ref.data());
      ExpectClose(std::vector<double>(ref.begin(), ref.end()), std::vector<double>(tok[s].begin(), tok[s].end()),
                  1e-5, absl::StrCat("token sketch ", s, " of example ", i));
    }
  }
}

// The Hugging Face architectures next to Llama (tests/fixtures/arch, each with its PEFT adapter) on the GPU
// against the CPU: logits and LoRA gradients of every fixture record in float32 (no TF32) to 1e-4, and the chat
// demo's Qwen2 on a chat record. Fixtures from $RAPIDIN_FIXTURES (gpu-check.sh sets it), else the source tree.
TEST(ModelGpu, HuggingFaceArchitecturesMatchCpu) {
  REQUIRE_CUDA_LIBTORCH();
  const char* env = std::getenv("RAPIDIN_FIXTURES");
  const std::string root = env ? env : RAPIDIN_SOURCE_DIR "/tests/fixtures";
  int checked = 0;
  for (const std::string name : {"qwen2", "qwen2_untied", "mistral", "llama3", "gemma", "gemma2", "phi3"}) {
    const std::string dir = root + "/arch/" + name;
    std::ifstream probe(dir + "/config.json");
    ASSERT_TRUE(probe.good()) << "fixture missing: " << dir;
    EngineOptions o;
    o.model_path = dir;
    o.adapter_path = dir + "/adapter";
    auto cpu = GradientEngine::Load(o);
    o.device = "cuda";
    auto gpu = GradientEngine::Load(o);
    ASSERT_TRUE(cpu.ok() && gpu.ok()) << name << ": " << cpu.status() << " / " << gpu.status();
    EXPECT_EQ((*cpu)->model_hash(), (*gpu)->model_hash()) << name;
    std::mt19937 rng(11);
    for (int len : {6, 14}) {
      TokenizedExample t;
      for (int i = 0; i < len; ++i) t.ids.push_back(3 + static_cast<int32_t>(rng() % 60));
      t.response_begin = len / 3;
      auto lc = (*cpu)->LogitsIds(t.ids), lg = (*gpu)->LogitsIds(t.ids);
      ASSERT_TRUE(lc.ok() && lg.ok()) << name;
      ExpectClose(std::vector<double>(lc->begin(), lc->end()), std::vector<double>(lg->begin(), lg->end()), 1e-4,
                  name + " logits");
      std::vector<double> gc, gg;
      ASSERT_TRUE((*cpu)->GradientIds(t, false, &gc).ok());
      ASSERT_TRUE((*gpu)->GradientIds(t, false, &gg).ok()) << name;
      ExpectClose(gc, gg, 1e-4, name + " LoRA gradients");
      ++checked;
    }
  }
  EXPECT_EQ(checked, 14);
  // The chat demo's model on a chat record.
  EngineOptions o;
  o.model_path = root + "/qwen2_chat";
  o.tokenizer_path = root + "/qwen2_chat/tokenizer.json";
  auto cpu = GradientEngine::Load(o);
  o.device = "cuda";
  auto gpu = GradientEngine::Load(o);
  ASSERT_TRUE(cpu.ok() && gpu.ok()) << cpu.status() << " / " << gpu.status();
  Example ex;
  ex.format = RecordFormat::kChat;
  ex.messages = {{"user", "What does the router do?"}, {"assistant", "It merges the shard servers' answers."}};
  std::vector<float> gc, gg;
  ASSERT_TRUE((*cpu)->Gradient(ex, true, &gc).ok());
  ASSERT_TRUE((*gpu)->Gradient(ex, true, &gg).ok());
  ExpectClose(std::vector<double>(gc.begin(), gc.end()), std::vector<double>(gg.begin(), gg.end()), 1e-4,
              "qwen2_chat chat gradient");
}

}  // namespace
}  // namespace rapidin::model
