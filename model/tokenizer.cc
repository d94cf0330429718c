#include "model/tokenizer.h"

#include <cstdio>
#include <fstream>

#include <unordered_map>

#include "absl/strings/str_cat.h"

namespace rapidin::model {
namespace {

class Llama2cTokenizer : public Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& path, int32_t vocab_size);
  Encoding Encode(const std::string& text, bool dummy_prefix) const override;
  std::string Piece(int32_t id) const override;
  int32_t vocab_size() const override { return static_cast<int32_t>(pieces_.size()); }

 private:
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int32_t> lookup_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& path, int32_t vocab_size) {
  if (vocab_size <= 0) return absl::InvalidArgumentError("tokenizer: vocab_size must be positive");
  if (!std::ifstream(path).good()) return absl::NotFoundError(absl::StrCat("tokenizer file not found: ", path));
  if (path.size() > 6 && path.compare(path.size() - 6, 6, ".model") == 0) {
    // libsentencepiece carries its own copy of protobuf-lite, whose symbols collide with libprotobuf's in one
    // process (a crash in static initialisation, seen with Debian's packages); not supported yet.
    return absl::UnimplementedError(absl::StrCat(path, ": SentencePiece .model tokenizers are not supported yet; ",
                                                 "use a llama2.c tokenizer.bin"));
  }
  return Llama2cTokenizer::Load(path, vocab_size);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Llama2cTokenizer::Load(const std::string& path, int32_t vocab_size) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("tokenizer file not found: ", path));
  std::unique_ptr<Llama2cTokenizer> t(new Llama2cTokenizer());
  int32_t max_len = 0;
  if (!in.read(reinterpret_cast<char*>(&max_len), 4) || max_len <= 0 || max_len > 4096) {
    return absl::DataLossError(absl::StrCat(path, ": not a llama2.c tokenizer (bad header)"));
  }
  t->pieces_.resize(vocab_size);
  t->scores_.resize(vocab_size);
  for (int32_t i = 0; i < vocab_size; ++i) {
    int32_t len = 0;
    if (!in.read(reinterpret_cast<char*>(&t->scores_[i]), 4) || !in.read(reinterpret_cast<char*>(&len), 4) ||
        len < 0 || len > max_len) {
      return absl::DataLossError(absl::StrCat(path, ": truncated or corrupt at token ", i, " of ", vocab_size));
    }
    t->pieces_[i].resize(len);
    if (len > 0 && !in.read(t->pieces_[i].data(), len)) {
      return absl::DataLossError(absl::StrCat(path, ": truncated at token ", i));
    }
    t->lookup_.emplace(t->pieces_[i], i);  // first occurrence wins
  }
  in.peek();
  if (!in.eof()) return absl::DataLossError(absl::StrCat(path, ": has more tokens than vocab_size ", vocab_size));
  return std::unique_ptr<Tokenizer>(std::move(t));
}

Encoding Llama2cTokenizer::Encode(const std::string& text, bool dummy_prefix) const {
  Encoding e;
  if (dummy_prefix && !text.empty()) {
    auto it = lookup_.find(" ");
    if (it != lookup_.end()) {
      e.ids.push_back(it->second);
      e.spans.push_back({0, 0});
    }
  }
  // Code points first, byte fallback for those not in the vocabulary.
  for (size_t i = 0; i < text.size();) {
    size_t n = 1;
    const unsigned char c = text[i];
    if (c >= 0xF0) n = 4;
    else if (c >= 0xE0) n = 3;
    else if (c >= 0xC0) n = 2;
    if (i + n > text.size()) n = 1;
    for (size_t j = 1; j < n; ++j) {
      if ((static_cast<unsigned char>(text[i + j]) & 0xC0) != 0x80) n = 1;
    }
    auto it = lookup_.find(text.substr(i, n));
    if (it != lookup_.end()) {
      e.ids.push_back(it->second);
      e.spans.push_back({static_cast<int32_t>(i), static_cast<int32_t>(i + n)});
    } else {
      for (size_t j = 0; j < n; ++j) {
        e.ids.push_back(static_cast<unsigned char>(text[i + j]) + 3);
        e.spans.push_back({static_cast<int32_t>(i + j), static_cast<int32_t>(i + j + 1)});
      }
    }
    i += n;
  }
  // Merge the best-scoring adjacent pair until none merges (llama2.c's run.c, including its tie rule: the
  // leftmost pair among equal scores).
  for (;;) {
    float best = -1e10f;
    int32_t best_id = -1;
    size_t best_i = 0;
    for (size_t i = 0; i + 1 < e.ids.size(); ++i) {
      auto it = lookup_.find(pieces_[e.ids[i]] + pieces_[e.ids[i + 1]]);
      if (it != lookup_.end() && scores_[it->second] > best) {
        best = scores_[it->second];
        best_id = it->second;
        best_i = i;
      }
    }
    if (best_id < 0) break;
    e.ids[best_i] = best_id;
    e.spans[best_i].end = e.spans[best_i + 1].end;
    if (e.spans[best_i].begin == e.spans[best_i].end && e.spans[best_i + 1].begin < e.spans[best_i].begin) {
      e.spans[best_i].begin = e.spans[best_i + 1].begin;
    }
    e.ids.erase(e.ids.begin() + best_i + 1);
    e.spans.erase(e.spans.begin() + best_i + 1);
  }
  return e;
}

std::string Llama2cTokenizer::Piece(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return "";
  const std::string& p = pieces_[id];
  unsigned int byte = 0;
  if (p.size() == 6 && std::sscanf(p.c_str(), "<0x%02X>", &byte) == 1) return std::string(1, static_cast<char>(byte));
  return p;
}

}  // namespace rapidin::model
