// Fine-tuning: AdamW steps against a hand-written update, LoRA adapters and checkpoints round-tripped.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <random>
#include <sstream>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "model/engine.h"
#include "kernels/rapidgrad.h"
#include "model/featurizer.h"
#include "model/testing.h"
#include "model/training.h"
#include "tests/test_util.h"
#include "tests/tiny_model.h"

namespace rapidin::model {
namespace {

using rapidin::testing::TinyModel;

std::vector<TokenizedExample> RandomBatch(std::mt19937& rng, int vocab) {
  std::vector<TokenizedExample> batch;
  for (int len : {9, 14, 6}) {
    TokenizedExample t;
    for (int i = 0; i < len; ++i) t.ids.push_back(static_cast<int32_t>(rng() % vocab));
    t.response_begin = len / 2;
    batch.push_back(t);
  }
  batch[1].loss_weights.assign(batch[1].ids.size() - batch[1].response_begin, 1.0);
  batch[1].loss_weights[0] = 0.0;  // hotword-style weights
  batch[1].loss_weights[2] = 3.0;
  return batch;
}

// The padded batch loss equals the mean of the per-record losses, and the update is AdamW's first step
// (p <- p (1 - lr wd) - lr g / (|g| + eps)) with g the mean of the per-record gradients; float64 throughout.
TEST(Train, StepIsAdamWOnTheMeanRecordLoss) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  EngineOptions o;
  o.use_double = true;
  auto e = GradientEngine::Random(TinyModel(false), static_cast<uint32_t>(rapidin::testing::FuzzSeed() + 6), o);
  ASSERT_TRUE(e.ok()) << e.status();
  std::mt19937 rng(static_cast<uint32_t>(rapidin::testing::FuzzSeed() + 7));
  const auto batch = RandomBatch(rng, 11);
  double mean_loss = 0;
  std::vector<double> mean_grad((*e)->grad_dim(), 0.0);
  for (const auto& t : batch) {
    mean_loss += *(*e)->LossIds(t) / batch.size();
    std::vector<double> g;
    ASSERT_TRUE((*e)->GradientIds(t, false, &g).ok());
    for (size_t i = 0; i < g.size(); ++i) mean_grad[i] += g[i] / batch.size();
  }
  const auto before = model::testing::SelectedValues(**e);
  AdamWOptions adam;
  adam.lr = 1e-3;
  adam.weight_decay = 0.1;
  auto loss = model::TrainStep(e->get(), batch, adam);
  ASSERT_TRUE(loss.ok()) << loss.status();
  EXPECT_NEAR(*loss, mean_loss, 1e-12);
  const auto after = model::testing::SelectedValues(**e);
  ASSERT_EQ(after.size(), before.size());
  for (size_t i = 0; i < after.size(); ++i) {
    const double g = mean_grad[i];
    const double want = before[i] * (1 - adam.lr * adam.weight_decay) - adam.lr * g / (std::fabs(g) + adam.eps);
    ASSERT_NEAR(after[i], want, 1e-12) << i;
  }
  // A few more steps lower the loss on the same batch.
  double last = *loss;
  for (int s = 0; s < 20; ++s) last = *model::TrainStep(e->get(), batch, adam);
  EXPECT_LT(last, *loss);
  EXPECT_EQ(model::TrainStep(e->get(), {}, adam).status().code(), absl::StatusCode::kInvalidArgument);
}

// LoRA fine-tuning: a fresh adapter changes nothing (B = 0); after training, the saved PEFT adapter on the saved
// base, and the merged llama2.c checkpoint, both reproduce the trained model's logits.
TEST(Train, LoraAdapterAndCheckpointRoundTrip) {
  rapidin::testing::TempDir dir;
  EngineOptions o;
  auto e = GradientEngine::Random(TinyModel(false), 5, o);
  ASSERT_TRUE(e.ok()) << e.status();
  ASSERT_TRUE(model::SaveLlama2c(**e, dir.path("base.bin")).ok());
  std::mt19937 rng(9);
  const auto batch = RandomBatch(rng, 11);
  const std::vector<int32_t> probe = {1, 4, 7, 2, 9, 3, 3, 10};
  const auto base_logits = *(*e)->LogitsIds(probe);
  LoraConfig lc;
  lc.rank = 2;
  lc.alpha = 4;
  lc.seed = 3;
  ASSERT_TRUE(model::AddLora(e->get(), lc).ok());
  EXPECT_EQ(model::AddLora(e->get(), lc).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(*(*e)->LogitsIds(probe), base_logits);
  for (const auto& p : (*e)->params()) EXPECT_NE(p.name.find(".lora_"), std::string::npos) << p.name;
  AdamWOptions adam;
  adam.lr = 1e-2;
  const std::string untrained_hash = (*e)->model_hash();
  const double first = *model::TrainStep(e->get(), batch, adam);
  double last = first;
  for (int s = 0; s < 30; ++s) last = *model::TrainStep(e->get(), batch, adam);
  EXPECT_LT(last, first);
  const auto trained = *(*e)->LogitsIds(probe);
  EXPECT_NE((*e)->model_hash(), untrained_hash);  // the hash follows the trained weights
  EXPECT_EQ((*e)->model_hash(), (*e)->model_hash());
  ASSERT_TRUE(model::SaveAdapter(**e, dir.path("adapter"), dir.path("base.bin")).ok());
  ASSERT_TRUE(model::SaveLlama2c(**e, dir.path("merged.bin")).ok());

  EngineOptions with_adapter;
  with_adapter.model_path = dir.path("base.bin");
  with_adapter.adapter_path = dir.path("adapter");
  auto a = GradientEngine::Load(with_adapter);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ((*a)->grad_dim(), (*e)->grad_dim());
  EngineOptions merged;
  merged.model_path = dir.path("merged.bin");
  auto m = GradientEngine::Load(merged);
  ASSERT_TRUE(m.ok()) << m.status();
  const auto la = *(*a)->LogitsIds(probe), lm = *(*m)->LogitsIds(probe);
  double worst_a = 0, worst_m = 0, diff_base = 0;
  for (size_t i = 0; i < trained.size(); ++i) {
    worst_a = std::max(worst_a, static_cast<double>(std::fabs(la[i] - trained[i])));
    worst_m = std::max(worst_m, static_cast<double>(std::fabs(lm[i] - trained[i])));
    diff_base = std::max(diff_base, static_cast<double>(std::fabs(trained[i] - base_logits[i])));
  }
  EXPECT_LT(worst_a, 1e-5);
  EXPECT_LT(worst_m, 1e-4);
  EXPECT_GT(diff_base, 1e-3);  // training did move the model
}

}  // namespace
}  // namespace rapidin::model
