// The server side of transport security: TLS server credentials, and the bearer-token table that every RPC of the
// shard service and the router checks.
//
// Token file: one "TOKEN ROLE" per line (blank lines and lines starting with '#' ignored), ROLE one of
//   query   Query, QueryByVector, GetRecord, Stats
//   ingest  Ingest, Stats
//   admin   every method
// A call carries its token as "authorization: Bearer TOKEN" metadata. Tokens are compared in constant time (in
// the token's length), never logged, and never echoed in errors.
// Thread-safety: Check may run on many threads while Reload replaces the table.
#ifndef RAPIDIN_SERVER_INTERNAL_AUTH_H_
#define RAPIDIN_SERVER_INTERNAL_AUTH_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "base/mutex.h"
#include "server/options.h"

namespace rapidin::server::internal {

enum class Role { kQuery, kIngest, kAdmin };

// What a method needs: kQuery for reads (Stats: any role), kIngest for Ingest, kAdmin for administration.
enum class Need { kQuery, kIngest, kAdmin, kAnyRole };

class TokenTable {
 public:
  // Reads the file. Errors: NOT_FOUND, INVALID_ARGUMENT naming the line (never the token) for a malformed one or
  // an unknown role, or for a file with no token.
  static absl::StatusOr<std::unique_ptr<TokenTable>> Load(const std::string& path);

  // Re-reads the file; on an error the old table stays in force and the error is returned.
  absl::Status Reload();

  // OK, or UNAUTHENTICATED (no bearer token, or not in the table), or PERMISSION_DENIED (the token's role may
  // not call `method`).
  absl::Status Check(const grpc::ServerContextBase& ctx, Need need, const char* method) const;

  size_t size() const;

 private:
  explicit TokenTable(std::string path) : path_(std::move(path)) {}
  static absl::StatusOr<std::vector<std::pair<std::string, Role>>> Parse(const std::string& path);

  const std::string path_;
  mutable Mutex mu_;
  std::vector<std::pair<std::string, Role>> tokens_ ABSL_GUARDED_BY(mu_);
};

// tokens->Check(...), or OK when tokens is null (no --auth-tokens).
inline absl::Status Authorize(const TokenTable* tokens, const grpc::ServerContextBase& ctx, Need need,
                              const char* method) {
  return tokens == nullptr ? absl::OkStatus() : tokens->Check(ctx, need, method);
}

// TLS server credentials from net.tls_cert / tls_key (and tls_client_ca: mutual TLS), or insecure ones when no
// certificate is configured. Errors: NOT_FOUND for a missing file, INVALID_ARGUMENT for a file without a PEM block,
// a certificate without its key, or a client CA without a certificate.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(const ServerOptions::Net& net);

}  // namespace rapidin::server::internal

#endif  // RAPIDIN_SERVER_INTERNAL_AUTH_H_
