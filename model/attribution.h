// Token-level attributions of a query's returned records, in the API's terms (v1::TokenScore): which generated
// tokens a record explains, and which of the record's own tokens carry its influence. Used by the shard service
// and the router alike. No LibTorch in this header. Thread-safety: as the Featurizer's const methods.
#ifndef RAPIDIN_MODEL_ATTRIBUTION_H_
#define RAPIDIN_MODEL_ATTRIBUTION_H_

#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "model/featurizer.h"
#include "rapidin/v1/rapidin.pb.h"

namespace rapidin::model {

// A returned record's text and stored vector (from the local store, or from the shard server that holds it).
using RecordFetcher = std::function<absl::Status(const v1::ScoredRecord&, v1::Record*, std::vector<float>*)>;

// Token-level views for every record of *result: generation side (per generated token, its sketch against the
// record's stored vector), the record's per-token loss view (record_tokens: each token the record's loss is on,
// its own loss's sketch against q; prompt tokens and a chat's untrained turns have none), and the training-side
// influence view (record_influence_tokens: gradient x input of I(z, q) per token, prompt tokens included). Every token is placed in its field (TokenPlace); a generation's own tokens are "generation"
// for an Alpaca query and "messages[i]" for a chat.
absl::Status Attribute(const Featurizer& featurizer, const Example& gen, const std::vector<float>& q,
                       const RecordFetcher& fetch, v1::QueryResult* result);

// The Example a stored record stands for: a chat when it has messages, text when it has text and no
// instruction, else Alpaca.
Example ExampleFromRecord(const v1::Record& r);

// Proto3 strings must be UTF-8, but a byte-fallback token can hold part of a multi-byte character: such bytes
// become U+FFFD. Byte offsets reported next to the text stay exact.
std::string ValidUtf8(const std::string& s);

}  // namespace rapidin::model

#endif  // RAPIDIN_MODEL_ATTRIBUTION_H_
