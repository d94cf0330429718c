#include "cache/finetune.h"

#include <algorithm>
#include <filesystem>
#include <chrono>
#include <cstdio>
#include <numeric>
#include <random>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "model/training.h"

namespace rapidin::cache {
namespace {

// A fully fine-tuned model in its base's format: a llama2.c checkpoint, or a Hugging Face directory (its
// config as read) with the tokenizer's files copied in, so that the directory loads on its own.
absl::Status SaveFullModel(const model::GradientEngine& e, const std::string& path, const std::string& tokenizer) {
  absl::Status st = model::SaveLlama2c(e, path);
  if (st.code() != absl::StatusCode::kUnimplemented) return st;
  st = model::SaveHf(e, path);
  if (!st.ok() || tokenizer.empty()) return st;
  namespace fs = std::filesystem;
  const fs::path from = fs::path(tokenizer).parent_path();
  for (const char* name : {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"}) {
    std::error_code ec;
    if (!fs::exists(from / name)) continue;
    fs::copy_file(from / name, fs::path(path) / name, fs::copy_options::overwrite_existing, ec);
    if (ec) return absl::UnavailableError(absl::StrCat("cannot copy ", (from / name).string(), ": ", ec.message()));
  }
  return absl::OkStatus();
}

}  // namespace


absl::StatusOr<FinetuneSummary> RunFinetune(const FinetuneOptions& o) {
  if (o.mode != "lora" && o.mode != "full") {
    return absl::InvalidArgumentError(absl::StrCat("mode must be lora or full, got \"", o.mode, "\""));
  }
  if (o.epochs < 1 || o.batch_size < 1 || o.out_path.empty()) {
    return absl::InvalidArgumentError("finetune needs epochs >= 1, batch size >= 1 and an output path");
  }
  if (o.checkpoint_every < 0) return absl::InvalidArgumentError("checkpoint_every must be >= 0");
  if (o.lr_schedule != "constant" && o.lr_schedule != "linear") {
    return absl::InvalidArgumentError(absl::StrCat("lr schedule must be constant or linear, got \"", o.lr_schedule, "\""));
  }
  for (int e : o.checkpoint_epochs) {
    if (e < 0 || e > o.epochs) {
      return absl::InvalidArgumentError(absl::StrCat("checkpoint epoch ", e, " is not in 0..", o.epochs));
    }
  }
  const bool start_checkpoint =
      std::find(o.checkpoint_epochs.begin(), o.checkpoint_epochs.end(), 0) != o.checkpoint_epochs.end();
  if (start_checkpoint && o.mode != "full") {
    // A fresh adapter has B = 0: the gradient of A is zero, so its normalised blocks are undefined.
    return absl::InvalidArgumentError("checkpoint epoch 0 (the model before fine-tuning) needs --mode full");
  }
  if (o.mode == "lora" && !o.engine.adapter_path.empty()) {
    return absl::InvalidArgumentError("--adapter: continuing an adapter is not supported; start from the base");
  }
  const auto t0 = std::chrono::steady_clock::now();
  FinetuneSummary sum;
  auto data = ReadInstructionData(o.data_path, &sum.bad_records);
  if (!data.ok()) return data.status();
  model::SetComputeThreads(o.threads);
  auto engine = model::GradientEngine::Load(o.engine);
  if (!engine.ok()) return engine.status();
  model::GradientEngine& e = **engine;
  if (o.mode == "lora") {
    model::LoraConfig lc = o.lora;
    lc.seed = o.seed;
    absl::Status st = model::AddLora(&e, lc);
    if (!st.ok()) return st;
  }
  for (const auto& p : e.params()) sum.trained_parameters += p.numel;
  std::vector<model::TokenizedExample> examples;
  for (const auto& r : *data) {
    auto t = e.Tokenize(r.example);
    if (!t.ok()) {
      sum.bad_records.push_back({r.where, std::string(t.status().message()), r.position});
      continue;
    }
    sum.truncated += t->truncated;
    examples.push_back(std::move(*t));
  }
  sum.records = static_cast<int64_t>(examples.size());
  sum.bad = static_cast<int64_t>(sum.bad_records.size());
  if (examples.empty()) return absl::InvalidArgumentError("no usable training record");
  std::mt19937_64 rng(o.seed);
  std::vector<size_t> order(examples.size());
  const int64_t steps_per_epoch = (sum.records + o.batch_size - 1) / o.batch_size;
  const int64_t total_steps = steps_per_epoch * o.epochs;
  auto lr_at = [&](int64_t step) {
    return o.lr_schedule == "linear" ? o.adam.lr * (1.0 - static_cast<double>(step) / total_steps) : o.adam.lr;
  };
  auto epoch_lr = [&](int epoch) {  // mean over the steps of epoch (0-based)
    double s = 0;
    for (int64_t i = 0; i < steps_per_epoch; ++i) s += lr_at(epoch * steps_per_epoch + i);
    return s / steps_per_epoch;
  };
  // Writes the model and its Adam second moments; returns the optimizer state's path.
  auto save = [&](const std::string& path, int epoch, bool final_model) -> absl::Status {
    absl::Status st = o.mode == "lora" ? model::SaveAdapter(e, path, o.engine.model_path)
                                       : SaveFullModel(e, path, o.engine.tokenizer_path);
    if (!st.ok()) return st;
    FinetuneCheckpoint c;
    c.epoch = epoch;
    c.path = path;
    c.lr = epoch_lr(epoch - 1);
    c.optimizer_path = final_model && !o.optimizer_out.empty() ? o.optimizer_out
                       : o.mode == "lora"                      ? path + "/optimizer.safetensors"
                                                               : path + ".optimizer.safetensors";
    st = model::SaveOptimizerState(e, c.optimizer_path, o.adam);
    if (!st.ok()) return st;
    sum.checkpoints.push_back(std::move(c));
    return absl::OkStatus();
  };
  // Checkpoint 0, the weights before any step, opens the first epoch: its model is written now and its optimizer
  // state, the second moments of that first epoch (Adam has none before a step), once the epoch is done.
  if (start_checkpoint) {
    FinetuneCheckpoint c;
    c.path = absl::StrCat(o.out_path, ".epoch-0");
    c.optimizer_path = c.path + ".optimizer.safetensors";
    c.lr = epoch_lr(0);
    absl::Status st = SaveFullModel(e, c.path, o.engine.tokenizer_path);
    if (!st.ok()) return st;
    sum.checkpoints.push_back(std::move(c));
  }
  auto last_report = std::chrono::steady_clock::now();
  for (int epoch = 0; epoch < o.epochs; ++epoch) {
    // Shuffle, then sort windows of 32 batches by length so that a batch pads little; batches run in random order.
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    const size_t window = static_cast<size_t>(o.batch_size) * 32;
    for (size_t w = 0; w < order.size(); w += window) {
      std::sort(order.begin() + w, order.begin() + std::min(order.size(), w + window),
                [&](size_t a, size_t b) { return examples[a].ids.size() < examples[b].ids.size(); });
    }
    std::vector<int64_t> batches(steps_per_epoch);
    std::iota(batches.begin(), batches.end(), 0);
    std::shuffle(batches.begin(), batches.end(), rng);
    double loss_sum = 0;
    for (int64_t s = 0; s < steps_per_epoch; ++s) {
      std::vector<model::TokenizedExample> batch;
      const int64_t b = batches[s];
      for (int64_t i = b * o.batch_size; i < std::min<int64_t>(sum.records, (b + 1) * o.batch_size); ++i) {
        batch.push_back(examples[order[i]]);
      }
      model::AdamWOptions step = o.adam;
      step.lr = lr_at(sum.steps);
      auto loss = model::TrainStep(&e, batch, step);
      if (!loss.ok()) return loss.status();
      loss_sum += *loss;
      ++sum.steps;
      const auto now = std::chrono::steady_clock::now();
      if (o.progress && (std::chrono::duration<double>(now - last_report).count() > 2 || sum.steps == total_steps)) {
        last_report = now;
        const double el = std::chrono::duration<double>(now - t0).count();
        std::fprintf(stderr, "finetune: epoch %d/%d, step %lld/%lld, mean loss %.4f, %.0f s elapsed, ETA %.0f s\n",
                     epoch + 1, o.epochs, static_cast<long long>(sum.steps), static_cast<long long>(total_steps),
                     loss_sum / (s + 1), el, el / sum.steps * (total_steps - sum.steps));
      }
    }
    sum.epoch_loss.push_back(loss_sum / steps_per_epoch);
    if (start_checkpoint && epoch == 0) {
      absl::Status st = model::SaveOptimizerState(e, sum.checkpoints.front().optimizer_path, o.adam);
      if (!st.ok()) return st;
    }
    const bool listed = std::find(o.checkpoint_epochs.begin(), o.checkpoint_epochs.end(), epoch + 1) !=
                        o.checkpoint_epochs.end();
    if (((o.checkpoint_every > 0 && (epoch + 1) % o.checkpoint_every == 0) || listed) && epoch + 1 < o.epochs) {
      absl::Status st = save(absl::StrCat(o.out_path, ".epoch-", epoch + 1), epoch + 1, false);
      if (!st.ok()) return st;
    }
  }
  absl::Status st = save(o.out_path, o.epochs, true);
  if (!st.ok()) return st;
  sum.out_path = o.out_path;
  sum.optimizer_path = sum.checkpoints.back().optimizer_path;
  sum.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return sum;
}

absl::StatusOr<std::vector<EvalRecord>> RunEval(const model::EngineOptions& engine, const std::string& data_path,
                                                int max_new, std::vector<BadRecord>* bad) {
  auto data = ReadInstructionData(data_path, bad);
  if (!data.ok()) return data.status();
  auto e = model::GradientEngine::Load(engine);
  if (!e.ok()) return e.status();
  std::vector<EvalRecord> out;
  for (const auto& r : *data) {
    auto t = (*e)->Tokenize(r.example);
    if (!t.ok()) {
      bad->push_back({r.where, std::string(t.status().message()), r.position});
      continue;
    }
    auto loss = (*e)->LossIds(*t);
    if (!loss.ok()) return loss.status();
    EvalRecord er;
    er.id = r.id;
    er.loss = *loss;
    er.response_tokens = static_cast<int>(t->ids.size()) - t->response_begin;
    if (max_new > 0 && r.example.format != model::RecordFormat::kText) {  // a text record has no prompt
      auto g = r.example.format == model::RecordFormat::kChat
                   ? model::GenerateChat(**e, r.example.messages, max_new)
                   : model::Generate(**e, r.example.instruction, r.example.input, max_new);
      if (!g.ok()) return g.status();
      er.generation = std::move(*g);
    }
    out.push_back(std::move(er));
  }
  return out;
}

std::string EvalJsonLine(const EvalRecord& e, bool with_generation) {
  nlohmann::json j = {{"id", e.id}, {"loss", e.loss}, {"response_tokens", e.response_tokens}};
  if (with_generation) j["generation"] = e.generation;
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace rapidin::cache
