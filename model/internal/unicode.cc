#include "model/internal/unicode.h"

#include <unicode/normalizer2.h>
#include <unicode/unistr.h>
#include <unicode/utf8.h>

namespace rapidin::model::internal {
namespace {

void CopyIdentity(std::string_view in, size_t b, size_t e, int32_t base, Normalized* out) {
  for (size_t i = b; i < e; ++i) {
    out->text.push_back(in[i]);
    out->begin.push_back(base + static_cast<int32_t>(i));
    out->end.push_back(base + static_cast<int32_t>(i + 1));
  }
}

}  // namespace

Normalized Normalize(std::string_view in, NormalForm form, int32_t base) {
  Normalized out;
  if (form == NormalForm::kNone) {
    CopyIdentity(in, 0, in.size(), base, &out);
    return out;
  }
  UErrorCode err = U_ZERO_ERROR;
  const icu::Normalizer2* norm =
      form == NormalForm::kNfc ? icu::Normalizer2::getNFCInstance(err) : icu::Normalizer2::getNFKCInstance(err);
  if (U_FAILURE(err) || norm == nullptr) {  // ICU's data is linked in; this does not happen in practice
    CopyIdentity(in, 0, in.size(), base, &out);
    return out;
  }
  const int32_t n = static_cast<int32_t>(in.size());
  const auto* s = reinterpret_cast<const uint8_t*>(in.data());
  // Runs that normalise independently: a new run starts before every character with a normalisation boundary
  // before it, and around invalid bytes.
  int32_t run = 0, i = 0;
  auto flush = [&](int32_t b, int32_t e) {
    if (b >= e) return;
    const std::string_view piece = in.substr(b, e - b);
    icu::UnicodeString u = icu::UnicodeString::fromUTF8(icu::StringPiece(piece.data(), piece.size()));
    UErrorCode e2 = U_ZERO_ERROR;
    if (norm->isNormalized(u, e2) && U_SUCCESS(e2)) {
      CopyIdentity(in, b, e, base, &out);
      return;
    }
    e2 = U_ZERO_ERROR;
    icu::UnicodeString nu = norm->normalize(u, e2);
    std::string utf8;
    nu.toUTF8String(utf8);
    // Output character k stands for source character k (the last one when the run grew), as `tokenizers`
    // aligns: a composed character keeps its base character's bytes, an expansion shares its source's.
    std::vector<std::pair<int32_t, int32_t>> src;  // source characters' byte ranges
    for (int32_t i = b; i < e;) {
      const int32_t at = i;
      UChar32 c;
      U8_NEXT(s, i, e, c);
      src.push_back({at, i});
    }
    size_t k = 0;
    for (size_t i = 0; i < utf8.size(); ++k) {
      const unsigned char lead = utf8[i];
      const size_t len = lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4;
      const auto& r = src[std::min(k, src.size() - 1)];
      for (size_t j = 0; j < len && i < utf8.size(); ++j, ++i) {
        out.text.push_back(utf8[i]);
        out.begin.push_back(base + r.first);
        out.end.push_back(base + r.second);
      }
    }
  };
  while (i < n) {
    const int32_t at = i;
    UChar32 c;
    U8_NEXT(s, i, n, c);
    if (c < 0) {  // an invalid byte: its own run, copied
      flush(run, at);
      CopyIdentity(in, at, i, base, &out);
      run = i;
      continue;
    }
    if (at > run && norm->hasBoundaryBefore(c)) {
      flush(run, at);
      run = at;
    }
  }
  flush(run, n);
  return out;
}

}  // namespace rapidin::model::internal
