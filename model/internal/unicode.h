// Private to model/: Unicode normalisation (ICU) that keeps, for every output byte, the source bytes it came
// from, so token spans can be reported in the caller's text after NFC or NFKC.
#ifndef RAPIDIN_MODEL_INTERNAL_UNICODE_H_
#define RAPIDIN_MODEL_INTERNAL_UNICODE_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace rapidin::model::internal {

enum class NormalForm { kNone, kNfc, kNfkc };

struct Normalized {
  std::string text;
  // Output byte i came from source bytes [begin[i], end[i]) (offsets into the input plus `base`). Text already in
  // normal form maps byte to byte; in a run that normalisation changes, output character k maps to source
  // character k, or to the last one when the run grew (`tokenizers`' alignment).
  std::vector<int32_t> begin, end;
};

// Normalises `in` (invalid UTF-8 bytes pass through unchanged).
Normalized Normalize(std::string_view in, NormalForm form, int32_t base = 0);

}  // namespace rapidin::model::internal

#endif  // RAPIDIN_MODEL_INTERNAL_UNICODE_H_
