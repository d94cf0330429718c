// The llama2.c tokenizer (tokenizer.bin): a SentencePiece-style BPE vocabulary with scores, encoded by
// greedily merging the adjacent pair whose merge has the highest score. ids 0 = <unk>, 1 = BOS, 2 = EOS,
// 3..258 = byte fallback <0x00>..<0xFF>.
//
// Encode also returns, for every token, the byte range of the input it covers, so attributions can be mapped
// back to text. Thread-safety: immutable after Load.
#ifndef RAPIDIN_MODEL_TOKENIZER_H_
#define RAPIDIN_MODEL_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"

namespace rapidin::model {

struct Span {
  int32_t begin = 0;  // byte offsets into the encoded text, [begin, end)
  int32_t end = 0;
};

struct Encoding {
  std::vector<int32_t> ids;
  std::vector<Span> spans;
};

class Tokenizer {
 public:
  static constexpr int32_t kBos = 1;
  static constexpr int32_t kEos = 2;

  // Errors: NOT_FOUND (missing file), DATA_LOSS (truncated or inconsistent file), INVALID_ARGUMENT (vocab_size).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& path, int32_t vocab_size);

  // dummy_prefix: prepend " " as SentencePiece does at the start of a text (the prefix token gets an empty span).
  Encoding Encode(const std::string& text, bool dummy_prefix) const;
  // The text of one token (byte tokens decode to their byte).
  std::string Piece(int32_t id) const;
  int32_t vocab_size() const { return static_cast<int32_t>(pieces_.size()); }

 private:
  Tokenizer() = default;
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int32_t> lookup_;
};

}  // namespace rapidin::model

#endif  // RAPIDIN_MODEL_TOKENIZER_H_
