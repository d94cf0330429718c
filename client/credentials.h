// The client side of rapidin's transport security, for the CLI, the client library and the router's connections
// to its shard servers: TLS (server verified against a CA; optionally a client certificate for mutual TLS) and a
// bearer token sent with every call. Thread-safety: plain values and pure functions.
#ifndef RAPIDIN_CLIENT_CREDENTIALS_H_
#define RAPIDIN_CLIENT_CREDENTIALS_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace rapidin::client {

struct Credentials {
  std::string tls_ca;    // PEM file: the CA that signed the server's certificate. Empty: plaintext
  std::string tls_cert;  // PEM files of this client's certificate and key, for mutual TLS (both or neither;
  std::string tls_key;   //   they need tls_ca)
  std::string token;     // sent as "authorization: Bearer <token>"; empty: no token
};

// The channel credentials for `c` (files read now). Errors: NOT_FOUND for a missing file, INVALID_ARGUMENT for a
// file that holds no PEM block, or a certificate without its key (or either without tls_ca).
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentials(const Credentials& c);

// Adds c.token, if any, to the call's metadata.
void AddToken(const Credentials& c, grpc::ClientContext* ctx);

// A token file's first line with surrounding white space removed. Errors: NOT_FOUND, INVALID_ARGUMENT when empty.
// The token never appears in an error message.
absl::StatusOr<std::string> ReadTokenFile(const std::string& path);

// The bearer token from `file` (ReadTokenFile) when it is given, else from the environment variable `env` (when
// `env` is not null and the variable is set and non-empty), else empty: no token.
absl::StatusOr<std::string> TokenFromFileOrEnv(const std::string& file, const char* env);

// A PEM file's contents. Errors: NOT_FOUND, INVALID_ARGUMENT when it holds no "-----BEGIN" block.
absl::StatusOr<std::string> ReadPemFile(const std::string& path, const char* what);

}  // namespace rapidin::client

#endif  // RAPIDIN_CLIENT_CREDENTIALS_H_
