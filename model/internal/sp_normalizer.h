// Private to model/: SentencePiece's normaliser, as libsentencepiece runs it before its BPE model (normalizer.cc):
// the model's own precompiled character map (a darts-clone double-array trie of rewrite rules: nmt_nfkc maps tabs,
// newlines and other spaces to " ", drops control characters, applies NFKC), then the whitespace rules (leading,
// trailing and repeated spaces dropped, a dummy "▁" prefix, spaces escaped as U+2581). With no map the text is
// copied one UTF-8 character at a time. Malformed UTF-8 becomes U+FFFD, one byte at a time, as libsentencepiece does.
#ifndef RAPIDIN_MODEL_INTERNAL_SP_NORMALIZER_H_
#define RAPIDIN_MODEL_INTERNAL_SP_NORMALIZER_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace rapidin::model::internal {

class SpNormalizer {
 public:
  struct Spec {
    std::string precompiled_charsmap;  // empty: no rewrite rules
    bool add_dummy_prefix = true;
    bool remove_extra_whitespaces = true;
    bool escape_whitespaces = true;
  };
  // Errors: DATA_LOSS for a character map whose sizes do not add up.
  static absl::StatusOr<SpNormalizer> Create(Spec spec);

  // normalized: the text as the BPE model sees it. norm_to_orig: normalized.size() + 1 byte offsets into raw (the
  // source position of every normalised byte, then the end), from which a piece [b, e) of normalized came from
  // raw[norm_to_orig[b], norm_to_orig[e]).
  void Normalize(std::string_view raw, std::string* normalized, std::vector<int32_t>* norm_to_orig) const;

  // The rewrite of input's longest prefix that has a rule, or its first UTF-8 character (U+FFFD for a malformed
  // byte), and how many bytes of input it consumed (at least 1 for a non-empty input).
  std::pair<std::string_view, size_t> NormalizePrefix(std::string_view input) const;

 private:
  Spec spec_;                    // its precompiled_charsmap is moved into the two below
  std::vector<uint32_t> units_;  // the double array
  std::string pool_;             // the rewritten strings, NUL-terminated
};

}  // namespace rapidin::model::internal

#endif  // RAPIDIN_MODEL_INTERNAL_SP_NORMALIZER_H_
