// The rapidin client library behind the `rapidin` CLI: JSONL parsing with line-numbered errors, a thin gRPC
// client, and the table/JSON renderings of results.
//
// Thread-safety: the free functions are; a Client may be shared by threads (gRPC stubs are thread-safe, and a
// call keeps no state in the Client).
#ifndef RAPIDIN_CLIENT_CLIENT_H_
#define RAPIDIN_CLIENT_CLIENT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "client/credentials.h"
#include "rapidin/v1/rapidin.grpc.pb.h"

namespace rapidin::client {

// One JSONL line {"id", "instruction"?, "input"?, "output"?, "text"?, "metadata"?: {str: str}, "vector": [..]}.
// Errors name the problem (the caller adds the line number).
absl::StatusOr<rapidin::v1::IngestRecord> ParseRecordLine(const std::string& line);
// One JSONL line {"vector": [..], "weight"?: w}.
absl::StatusOr<rapidin::v1::QueryVector> ParseQueryLine(const std::string& line);

// Reads a JSONL file, calling fn(line_number, line) for each non-blank line; stops at fn's first error,
// which is returned as "FILE:LINE: message".
absl::Status ForEachLine(const std::string& path,
                         const std::function<absl::Status(int64_t line_no, const std::string& line)>& fn);

// Byte offset of the first byte that does not start well-formed UTF-8 (no overlong forms, surrogates or code
// points past U+10FFFF), or std::string::npos when all of `s` is.
size_t InvalidUtf8At(std::string_view s);
// proto3 string fields must hold UTF-8, and gRPC's decoder refuses a message that breaks this with an empty
// INTERNAL error. INVALID_ARGUMENT naming the first such field (e.g. "records[2].record.id") and the byte.
absl::Status CheckUtf8(const google::protobuf::Message& m);

// Every call checks its request with CheckUtf8 before sending it.
class Client {
 public:
  // Plaintext, no token. deadline_s <= 0: no deadline.
  static std::unique_ptr<Client> Connect(const std::string& address, double deadline_s = 60,
                                         int max_message_bytes = 64 << 20);
  // With TLS and/or a bearer token (client/credentials.h); the errors of ChannelCredentials.
  static absl::StatusOr<std::unique_ptr<Client>> Connect(const std::string& address, const Credentials& credentials,
                                                         double deadline_s = 60, int max_message_bytes = 64 << 20);

  // Streams `batches`; each is applied atomically by the server. progress(records_sent) after each batch.
  absl::StatusOr<rapidin::v1::IngestResponse> Ingest(
      const std::function<bool(rapidin::v1::IngestRequest*)>& next_batch,
      const std::function<void(uint64_t)>& progress = nullptr);
  absl::StatusOr<rapidin::v1::QueryByVectorResponse> QueryByVector(const rapidin::v1::QueryByVectorRequest& req);
  absl::StatusOr<rapidin::v1::QueryResponse> Query(const rapidin::v1::QueryRequest& req);
  absl::StatusOr<rapidin::v1::StatsResponse> Stats();
  absl::StatusOr<rapidin::v1::GetRecordResponse> GetRecord(const std::string& id, bool include_vector);
  absl::StatusOr<rapidin::v1::DeleteRecordsResponse> DeleteRecords(const std::vector<std::string>& ids,
                                                                   bool compact = false);

 private:
  Client() = default;
  // The deadline (unless `stream`: an Ingest stream runs as long as its batches) and the token.
  void Prepare(grpc::ClientContext* ctx, bool stream = false) const;
  std::unique_ptr<rapidin::v1::InfluenceService::Stub> stub_;
  double deadline_s_ = 60;
  Credentials credentials_;
};

// Renderings. JSON is one object per call, stable field names (protobuf's JSON mapping).
std::string ToJson(const google::protobuf::Message& m);
std::string QueryTable(const rapidin::v1::QueryByVectorResponse& r);
std::string ResultTable(const rapidin::v1::QueryResult& r, const std::string& title);
std::string TextQueryTable(const rapidin::v1::QueryResponse& r);
// Each returned record with its generation and record tokens shaded by influence (ANSI colours when color,
// otherwise [+tok]/[-tok] markers), with a legend.
std::string AttributionText(const rapidin::v1::QueryResponse& r, bool color);
// One self-contained HTML page (no network access needed): the generation and each returned record with tokens
// shaded by influence; hovering a token shows its field, byte offsets and score.
std::string AttributionHtml(const rapidin::v1::QueryRequest& q, const rapidin::v1::QueryResponse& r);
std::string StatsTable(const rapidin::v1::StatsResponse& s);
std::string RecordTable(const rapidin::v1::GetRecordResponse& r);

}  // namespace rapidin::client

#endif  // RAPIDIN_CLIENT_CLIENT_H_
