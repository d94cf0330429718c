// The method options of issue 14 against float64 references: the sketch's adjoint, Adam preconditioning, the
// training-side token view (gradient x input of I(z, g), against finite differences), and a tiny project-made
// model with an obvious trigger whose poisoned records get their top training-side token inside the trigger.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <random>
#include <vector>

#include "kernels/rapidgrad.h"
#include "model/engine.h"
#include "model/testing.h"
#include "model/training.h"
#include "tests/test_util.h"
#include "tests/tiny_model.h"

namespace rapidin::model {
namespace {

using rapidin::testing::TinyModel;

TokenizedExample RandomRecord(std::mt19937& rng, int vocab, int len, int response_begin) {
  TokenizedExample t;
  t.ids.push_back(1);
  for (int i = 1; i < len; ++i) t.ids.push_back(static_cast<int32_t>(3 + rng() % (vocab - 3)));
  t.response_begin = response_begin;
  return t;
}

double Dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// dI/dalpha_s by a central difference of I (InfluenceTokens' values at scaled embeddings, step 1e-5).
double CentralDifference(const GradientEngine& e, const TokenizedExample& t, const std::vector<double>& u, size_t s,
                         bool normalize) {
  const double h = 1e-5;
  std::vector<double> up(t.ids.size(), 1.0), down(t.ids.size(), 1.0);
  up[s] += h;
  down[s] -= h;
  return (*e.InfluenceTokens(t, u, nullptr, &up, normalize) - *e.InfluenceTokens(t, u, nullptr, &down, normalize)) /
         (2 * h);
}

// <C(x), y> = <x, C^T y> for fresh random x, y (the pull-back the token view differentiates).
TEST(RapidGrad, TransposeIsTheAdjoint) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  std::mt19937_64 rng(rapidin::testing::FuzzSeed() + 11);
  std::normal_distribution<double> g;
  for (int64_t d : {1, 37, 1000, 4099}) {
    for (int64_t k : {1, 16, 256}) {
      auto c = kernels::RapidGrad::Create({d, k, 3, rng()});
      ASSERT_NE(c, nullptr);
      std::vector<float> x(d), y(k), cx(k);
      for (auto& v : x) v = static_cast<float>(g(rng));
      for (auto& v : y) v = static_cast<float>(g(rng));
      c->Apply(x.data(), cx.data());
      std::vector<double> cty(d);
      c->ApplyTranspose(y.data(), cty.data());
      double lhs = 0, rhs = 0, scale = 0;
      for (int64_t i = 0; i < k; ++i) lhs += static_cast<double>(cx[i]) * y[i];
      for (int64_t i = 0; i < d; ++i) rhs += static_cast<double>(x[i]) * cty[i], scale += std::fabs(x[i] * cty[i]);
      ASSERT_GT(scale, 0);
      EXPECT_NEAR(lhs, rhs, 1e-5 * scale) << "d=" << d << " k=" << k;  // lhs accumulated in fp32
      // Every coordinate of C^T y is +-y[bin]: exactly one y value per input element.
      for (int64_t i = 0; i < d; ++i) {
        const int64_t j = c->Permute(i);
        EXPECT_EQ(cty[i], static_cast<double>(c->Sign(j)) * y[j / c->bin_size()]);
      }
    }
  }
}

// I(z) = <N(grad L(z)), u>, and each token's gradient x input equals the central finite difference of I in that
// token's embedding scale, all in float64, on random weights, tokens and u (with and without a preconditioner).
TEST(Influence, TokenScoresMatchFiniteDifferences) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  for (bool tied : {true, false}) {
    EngineOptions o;
    o.use_double = true;
    o.param_pattern = ".";  // norms and embeddings too
    const uint32_t seed = static_cast<uint32_t>(rapidin::testing::FuzzSeed() + 21);
    auto e = GradientEngine::Random(TinyModel(tied), seed, o);
    ASSERT_TRUE(e.ok()) << e.status();
    std::mt19937 rng(seed + 1);
    const TokenizedExample t = RandomRecord(rng, 11, 12, 6);
    std::normal_distribution<double> g;
    std::vector<double> u((*e)->grad_dim());
    for (auto& v : u) v = g(rng);
    for (bool normalize : {true, false}) {  // N = layer-wise unit norm, or the raw gradient
      std::vector<double> scores;
      auto infl = (*e)->InfluenceTokens(t, u, &scores, nullptr, normalize);
      ASSERT_TRUE(infl.ok()) << infl.status();
      std::vector<double> n;
      ASSERT_TRUE((*e)->GradientIds(t, normalize, &n).ok());
      EXPECT_NEAR(*infl, Dot(n, u), 1e-10 * (1 + std::fabs(*infl)));
      ASSERT_EQ(scores.size(), t.ids.size());
      EXPECT_GT(rapidin::testing::MaxAbs(scores), 1e-4);  // not a comparison of zeros
      for (size_t s = 0; s < t.ids.size(); ++s) {
        const double fd = CentralDifference(**e, t, u, s, normalize);
        EXPECT_NEAR(scores[s], fd, 1e-6 + 1e-5 * std::fabs(fd))
            << "token " << s << (tied ? " tied" : " untied") << (normalize ? "" : " raw");
      }
    }
    std::vector<double> scores;
    // Positions after the last response token do not exist; the last token (only a target) still scores, since
    // it enters the loss; u of the wrong size is refused.
    EXPECT_EQ((*e)->InfluenceTokens(t, std::vector<double>(3), &scores).status().code(),
              absl::StatusCode::kInvalidArgument);
    std::vector<double> short_scale(2, 1.0);
    EXPECT_EQ((*e)->InfluenceTokens(t, u, nullptr, &short_scale).status().code(), absl::StatusCode::kInvalidArgument);
  }
}

// The influence view through the hand-written pass (grad_path "direct": forward-over-reverse,
// LlamaInputGradTangent) against LibTorch's double backward, on fresh random weights, records and u: I and every
// token's score in float64 to 1e-9, and the float32 pass within float rounding; tied and untied heads, grouped KV
// heads, loss weights, raw and normalised. The direct scores also match finite differences of LibTorch's I.
TEST(Influence, DirectPassEqualsDoubleBackward) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  const ModelConfig big = rapidin::testing::GqaModel(100);  // 4 query heads per KV head, head dimension 8
  const std::vector<std::pair<ModelConfig, std::vector<int>>> cases = {
      {TinyModel(true), {12, 5, 2}}, {TinyModel(false), {16, 9}}, {big, {90, 33}}};
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    const auto& [cfg, lens] = cases[ci];
    const uint32_t seed = static_cast<uint32_t>(rapidin::testing::FuzzSeed() + 41 + ci);
    auto engines = rapidin::testing::RandomDirectEngines(cfg, seed);
    ASSERT_TRUE(engines.ok()) << engines.status();
    const GradientEngine *ref = engines->ref.get(), *direct = engines->direct.get();
    const GradientEngine* direct32 = engines->direct32.get();
    ASSERT_EQ(direct->grad_path(), "direct");
    std::mt19937 rng(seed + 3);
    std::normal_distribution<double> g;
    for (int len : lens) {
      TokenizedExample t;
      for (int i = 0; i < len; ++i) t.ids.push_back(static_cast<int32_t>(rng() % cfg.vocab_size));
      t.response_begin = 1 + static_cast<int32_t>(rng() % (len - 1));
      if (rng() % 2) {
        for (int i = t.response_begin; i < len; ++i) t.loss_weights.push_back((rng() % 5) * 0.5 + 0.25);
      }
      std::vector<double> u(ref->grad_dim());
      for (auto& v : u) v = g(rng);
      for (bool normalize : {true, false}) {
        SCOPED_TRACE(::testing::Message() << "case " << ci << " len " << len << " normalize " << normalize);
        std::vector<double> want, got, got32;
        auto wi = ref->InfluenceTokens(t, u, &want, nullptr, normalize);
        auto gi = direct->InfluenceTokens(t, u, &got, nullptr, normalize);
        auto gi32 = direct32->InfluenceTokens(t, u, &got32, nullptr, normalize);
        ASSERT_TRUE(wi.ok() && gi.ok() && gi32.ok()) << wi.status() << gi.status() << gi32.status();
        ASSERT_EQ(got.size(), want.size());
        ASSERT_EQ(got32.size(), want.size());
        const double mag = rapidin::testing::MaxAbs(want);
        ASSERT_GT(mag, 1e-6);  // not a comparison of zeros
        // The scale of I = <g, u> that float32 rounds at: |g| |u| (I itself can be a small remainder of it).
        std::vector<double> gref;
        ASSERT_TRUE(ref->GradientIds(t, normalize, &gref).ok());
        double g2 = 0, u2 = 0;
        for (size_t i = 0; i < u.size(); ++i) g2 += gref[i] * gref[i], u2 += u[i] * u[i];
        const double scale = std::sqrt(g2 * u2);
        EXPECT_NEAR(*gi, *wi, 1e-10 * (1 + std::fabs(*wi)));
        EXPECT_NEAR(*gi32, *wi, 1e-4 * (1 + std::fabs(*wi)) + 1e-5 * scale) << "|g| |u| " << scale;
        double err = 0, err32 = 0;
        for (size_t s = 0; s < want.size(); ++s) {
          err = std::max(err, std::fabs(got[s] - want[s]));
          err32 = std::max(err32, std::fabs(got32[s] - want[s]));
        }
        EXPECT_LT(err / mag, 1e-9);
        // float32: within 1e-3 of the largest score, or float rounding at the scale of I itself: a token's score can
        // be a 1e-4 sliver of I (seed 12628380578518016708: -2.3e-4 against I = -1.14, off by 2.6e-7).
        EXPECT_LT(err32, 1e-3 * mag + 1e-5 * std::fabs(*wi)) << "largest score " << mag << ", I " << *wi;
        if (ci == 0 && len == 12) {  // and against finite differences of I (LibTorch's value at scaled embeddings)
          for (size_t s = 0; s < t.ids.size(); ++s) {
            const double fd = CentralDifference(*direct, t, u, s, normalize);
            EXPECT_NEAR(got[s], fd, 1e-6 + 1e-5 * std::fabs(fd)) << "token " << s;
          }
        }
      }
    }
  }
}

// `rapidin finetune` saves the bias-corrected Adam second moments; an engine loaded with them divides each raw
// gradient element by sqrt(v) + eps before the layer-wise normalisation. Reference: after one step on one record,
// v = g^2 (g the record's gradient at the starting weights), so the preconditioned gradient is g'/(|g| + eps).
TEST(Influence, AdamPreconditionerDividesBeforeNormalising) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  rapidin::testing::TempDir dir;
  EngineOptions o;
  o.use_double = true;
  const uint32_t seed = static_cast<uint32_t>(rapidin::testing::FuzzSeed() + 31);
  std::mt19937 rng(seed + 1);
  const TokenizedExample a = RandomRecord(rng, 11, 12, 5), b = RandomRecord(rng, 11, 14, 7);
  auto trainer = GradientEngine::Random(TinyModel(false), seed, o);
  ASSERT_TRUE(trainer.ok());
  std::vector<double> ga, gb;
  ASSERT_TRUE((*trainer)->GradientIds(a, false, &ga).ok());
  ASSERT_TRUE((*trainer)->GradientIds(b, false, &gb).ok());
  AdamWOptions adam;
  adam.eps = 1e-6;
  EXPECT_EQ(model::SaveOptimizerState(**trainer, dir.path("v.safetensors"), adam).code(),
            absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(model::TrainStep(trainer->get(), {a}, adam).ok());
  ASSERT_TRUE(model::SaveOptimizerState(**trainer, dir.path("v.safetensors"), adam).ok());

  EngineOptions po = o;
  po.preconditioner_path = dir.path("v.safetensors");
  auto plain = GradientEngine::Random(TinyModel(false), seed, o);
  auto pre = GradientEngine::Random(TinyModel(false), seed, po);
  ASSERT_TRUE(pre.ok()) << pre.status();
  EXPECT_EQ((*plain)->preconditioner(), "none");
  EXPECT_EQ((*pre)->preconditioner().rfind("adam-v/", 0), 0u) << (*pre)->preconditioner();
  EXPECT_NE((*pre)->model_hash(), (*plain)->model_hash());
  std::vector<double> got;
  ASSERT_TRUE((*pre)->GradientIds(b, true, &got).ok());
  for (const auto& p : (*pre)->params()) {
    std::vector<double> want(p.numel);
    double nn = 0;
    for (int64_t i = 0; i < p.numel; ++i) {
      want[i] = gb[p.offset + i] / (std::fabs(ga[p.offset + i]) + adam.eps);
      nn += want[i] * want[i];
    }
    ASSERT_GT(nn, 0) << p.name;
    for (int64_t i = 0; i < p.numel; ++i) {
      // v went through float32 in the file: relative rounding ~1e-7
      ASSERT_NEAR(got[p.offset + i], want[i] / std::sqrt(nn), 1e-12 + 1e-6 * std::fabs(want[i] / std::sqrt(nn)))
          << p.name << "[" << i << "]";
    }
  }
  // The token view sees the same preconditioned gradient.
  std::vector<double> u(got.size(), 0.5), scores;
  auto infl = (*pre)->InfluenceTokens(b, u, &scores);
  ASSERT_TRUE(infl.ok()) << infl.status();
  EXPECT_NEAR(*infl, Dot(got, u), 1e-10 * (1 + std::fabs(*infl)));

  // Another parameter selection, a missing file and a damaged one are refused with the reason.
  EngineOptions other = po;
  other.param_pattern = ".";
  EXPECT_EQ(GradientEngine::Random(TinyModel(false), seed, other).status().code(), absl::StatusCode::kInvalidArgument);
  EngineOptions missing = o;
  missing.preconditioner_path = dir.path("nope.safetensors");
  EXPECT_EQ(GradientEngine::Random(TinyModel(false), seed, missing).status().code(), absl::StatusCode::kNotFound);
  {
    std::ifstream in(dir.path("v.safetensors"), std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::ofstream out(dir.path("cut.safetensors"), std::ios::binary);
    out << bytes.substr(0, bytes.size() / 2);
  }
  EngineOptions cut = o;
  cut.preconditioner_path = dir.path("cut.safetensors");
  EXPECT_EQ(GradientEngine::Random(TinyModel(false), seed, cut).status().code(), absl::StatusCode::kDataLoss);
}

// InfluenceTokens' token_scale at 0 (token s's input embedding set to the mean row: occlusion, which the benchmark
// tried as a token view and measured worse than gradient x input, README), against an independent recomputation
// in float64: the same record with token s replaced by a spare token whose
// embedding row is the mean of the others (so also the mean of all rows), scored from its plain gradient. Untied
// output and only layer weights selected, so the spare row changes nothing else; prompt positions only, since a
// response token is also a target.
TEST(Influence, OcclusionEqualsTheRecordWithTheTokenReplacedByTheMeanEmbedding) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  rapidin::testing::TempDir dir;
  const uint32_t seed = static_cast<uint32_t>(rapidin::testing::FuzzSeed() + 51);
  const ModelConfig c = TinyModel(false);
  const int spare = c.vocab_size - 1;
  EngineOptions all;
  all.use_double = true;
  all.param_pattern = ".";
  auto maker = GradientEngine::Random(c, seed, all);
  ASSERT_TRUE(maker.ok()) << maker.status();
  const std::vector<double> w = model::testing::SelectedValues(**maker);
  int emb = -1;
  for (size_t p = 0; p < (*maker)->params().size(); ++p) {
    if ((*maker)->params()[p].name == "tok_embeddings.weight") emb = static_cast<int>(p);
  }
  ASSERT_GE(emb, 0);
  const int64_t off = (*maker)->params()[emb].offset, D = c.dim;
  for (int64_t j = 0; j < D; ++j) {
    double m = 0;
    for (int v = 0; v < c.vocab_size; ++v) m += v == spare ? 0 : w[off + v * D + j];
    m /= c.vocab_size - 1;
    ASSERT_TRUE(model::testing::Perturb(maker->get(), emb, spare * D + j, m - w[off + spare * D + j]).ok());
  }
  ASSERT_TRUE(model::SaveLlama2c(**maker, dir.path("tiny.bin")).ok());
  for (bool normalize : {true, false}) {
    SCOPED_TRACE(normalize ? "layer norm" : "no layer norm");
    EngineOptions o;
    o.use_double = true;
    o.model_path = dir.path("tiny.bin");
    o.param_pattern = "^layers\\.";
    auto e = GradientEngine::Load(o);
    ASSERT_TRUE(e.ok()) << e.status();
    std::mt19937 rng(seed + 1);
    TokenizedExample t;
    t.ids.push_back(1);
    for (int i = 1; i < 12; ++i) t.ids.push_back(static_cast<int32_t>(3 + rng() % (spare - 3)));  // never spare
    t.response_begin = 6;
    std::vector<double> u((*e)->grad_dim());
    std::normal_distribution<double> g;
    for (double& x : u) x = g(rng);
    std::vector<double> scale(t.ids.size(), 1.0);
    double spread = 0;
    std::vector<double> occluded;
    for (int s = 1; s < t.response_begin; ++s) {
      scale[s] = 0;
      auto got = (*e)->InfluenceTokens(t, u, nullptr, &scale, normalize);
      scale[s] = 1;
      ASSERT_TRUE(got.ok()) << got.status();
      TokenizedExample r = t;
      r.ids[s] = spare;
      std::vector<double> gr;
      ASSERT_TRUE((*e)->GradientIds(r, normalize, &gr).ok());
      const double want = Dot(gr, u);
      // The file holds float32 rows: the spare row is the float32 rounding of the mean (6e-8 relative per value),
      // which a random tiny model amplifies to a few 1e-6 (1.7e-6 measured with RAPIDIN_FUZZ_SEED=546411).
      EXPECT_NEAR(*got, want, 2e-5 * (1 + std::fabs(want))) << "token " << s;
      occluded.push_back(want);
    }
    double largest = 0;
    for (double v : occluded) {
      spread = std::max(spread, std::fabs(v - occluded[0]));
      largest = std::max(largest, std::fabs(v));
    }
    EXPECT_GT(spread, 1e-2 * largest);  // the tokens really differ, far beyond the tolerance above
  }
}

// Issue 14's target on a tiny project-made model: records where a trigger token anywhere in the prompt forces a
// fixed response; for the poisoned records that score highest against a held-out triggered query, the top
// training-side token should be the trigger (>= 90% of them).
// DISABLED: it fails today, and is kept as the target rather than weakened. Measured here: retrieval works (9 of
// the top 10 are poisoned) but the trigger is the top token for 0 of 9 with gradient x input, 1 of 9 with
// integrated gradients from the mean embedding (16 steps; tried, not kept), and occlusion (deleting or replacing a token) moved I by similar amounts for
// every prompt token. Once trained, the trigger's effect is an all-or-nothing switch and the normalised gradient
// of a well-fitted record is a small residual: local perturbations of any token move it about equally.
TEST(Influence, DISABLED_TriggerTokenTopsPoisonedRecordsOnATinyModel) {
  ModelConfig c;
  c.dim = 32;
  c.hidden_dim = 64;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 4;
  c.vocab_size = 32;
  c.seq_len = 32;
  c.tied_output = true;
  EngineOptions o;
  auto e = GradientEngine::Random(c, 5, o);
  ASSERT_TRUE(e.ok());
  constexpr int32_t kTrigger = 3, kPayload = 4, kEos = 2;
  std::mt19937 rng(17);
  // Prompt: 8 tokens from [8, 32); clean response: the prompt's first 4 tokens; poisoned: the trigger replaces one
  // prompt token and the response is the payload repeated.
  auto make = [&](bool poisoned) {
    TokenizedExample t;
    t.ids.push_back(1);
    for (int i = 0; i < 8; ++i) t.ids.push_back(static_cast<int32_t>(8 + rng() % 24));
    if (poisoned) t.ids[1 + rng() % 8] = kTrigger;
    t.ids.push_back(5);  // a separator: "### Response:"
    t.response_begin = static_cast<int32_t>(t.ids.size());
    for (int i = 0; i < 4; ++i) t.ids.push_back(poisoned ? kPayload : t.ids[1 + i] == kTrigger ? 6 : t.ids[1 + i]);
    t.ids.push_back(kEos);
    return t;
  };
  std::vector<TokenizedExample> train;
  std::vector<bool> poisoned;
  for (int i = 0; i < 120; ++i) {
    poisoned.push_back(i % 10 == 0);
    train.push_back(make(poisoned.back()));
  }
  AdamWOptions adam;
  adam.lr = 1e-2;
  for (int epoch = 0; epoch < 60; ++epoch) {
    for (size_t b = 0; b < train.size(); b += 12) {
      std::vector<TokenizedExample> batch(train.begin() + b, train.begin() + std::min(train.size(), b + 12));
      ASSERT_TRUE(model::TrainStep(e->get(), batch, adam).ok());
    }
  }
  // Learned: a held-out triggered prompt's payload loss is low; an untriggered prompt's is high.
  const TokenizedExample query = make(true);
  TokenizedExample clean_prompt_payload = make(false);
  for (size_t i = clean_prompt_payload.response_begin; i + 1 < clean_prompt_payload.ids.size(); ++i) {
    clean_prompt_payload.ids[i] = kPayload;
  }
  const double q_loss = *(*e)->LossIds(query), c_loss = *(*e)->LossIds(clean_prompt_payload);
  ASSERT_LT(q_loss, 0.5) << "the tiny model did not learn the trigger";
  ASSERT_GT(c_loss, q_loss + 1.0);

  std::vector<double> u;
  ASSERT_TRUE((*e)->GradientIds(query, true, &u).ok());
  struct Scored {
    double influence;
    size_t index;
  };
  std::vector<Scored> ranked;
  std::vector<std::vector<double>> token_scores(train.size());
  for (size_t i = 0; i < train.size(); ++i) {
    auto infl = (*e)->InfluenceTokens(train[i], u, &token_scores[i]);
    ASSERT_TRUE(infl.ok()) << infl.status();
    ranked.push_back({*infl, i});
  }
  std::sort(ranked.begin(), ranked.end(), [](const Scored& a, const Scored& b) { return a.influence > b.influence; });
  int poisoned_top = 0, trigger_top = 0;
  for (int r = 0; r < 10; ++r) {
    const size_t i = ranked[r].index;
    if (!poisoned[i]) continue;
    ++poisoned_top;
    const auto& s = token_scores[i];
    const size_t best = std::max_element(s.begin() + 1, s.end()) - s.begin();  // BOS excluded, as in the service
    trigger_top += train[i].ids[best] == kTrigger;
  }
  EXPECT_GE(poisoned_top, 8) << "retrieval: poisoned records among the top 10";
  EXPECT_GE(trigger_top * 10, poisoned_top * 9) << trigger_top << " of " << poisoned_top;
}

}  // namespace
}  // namespace rapidin::model
