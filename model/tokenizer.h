// Tokenizers: the llama2.c format (tokenizer.bin: a SentencePiece-style BPE vocabulary with scores, encoded by
// greedily merging the adjacent pair whose merge has the highest score; ids 0 = <unk>, 1 = BOS, 2 = EOS,
// 3..258 = byte fallback) and SentencePiece BPE models (tokenizer.model, as Llama ships).
//
// Encode also returns, for every token, the byte range of the input it covers, so attributions can be mapped
// back to text. Thread-safety: immutable after Load.
#ifndef RAPIDIN_MODEL_TOKENIZER_H_
#define RAPIDIN_MODEL_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <string>
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
  virtual ~Tokenizer() = default;

  // A path ending in ".model" is a SentencePiece model, one ending in ".json" a Hugging Face tokenizer.json
  // (byte-level BPE: model/hf_tokenizer.cc), anything else a llama2.c tokenizer.bin.
  // Errors: NOT_FOUND (missing file), DATA_LOSS (malformed file), INVALID_ARGUMENT (vocab size differs from the
  // model's), UNIMPLEMENTED (a SentencePiece model that is not BPE).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& path, int32_t vocab_size);

  // dummy_prefix: prepend " " at the start of a text (llama2.c; the prefix token gets an empty span).
  // SentencePiece models follow their normaliser spec instead.
  virtual Encoding Encode(const std::string& text, bool dummy_prefix) const = 0;
  // The text of one token (byte tokens decode to their byte).
  virtual std::string Piece(int32_t id) const = 0;
  virtual int32_t vocab_size() const = 0;
  // BOS and EOS ids; -1 when the tokenizer has none (a tokenizer.json without a BOS template, say).
  virtual int32_t bos() const { return 1; }
  virtual int32_t eos() const { return 2; }
  // The id of a token given by its text (special tokens such as "<|im_end|>"), or -1.
  virtual int32_t TokenId(const std::string& piece) const { return -1; }
};

}  // namespace rapidin::model

#endif  // RAPIDIN_MODEL_TOKENIZER_H_
