#include "client/credentials.h"

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace rapidin::client {
namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(what, ": cannot read ", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

absl::StatusOr<std::string> ReadPemFile(const std::string& path, const char* what) {
  auto pem = ReadFile(path, what);
  if (!pem.ok()) return pem.status();
  if (!absl::StrContains(*pem, "-----BEGIN ")) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", path, " holds no PEM block"));
  }
  return pem;
}

absl::StatusOr<std::string> ReadTokenFile(const std::string& path) {
  auto text = ReadFile(path, "token file");
  if (!text.ok()) return text.status();
  const std::string first = text->substr(0, text->find('\n'));
  const std::string token(absl::StripAsciiWhitespace(first));
  if (token.empty()) return absl::InvalidArgumentError(absl::StrCat("token file ", path, ": the first line is empty"));
  return token;
}

absl::StatusOr<std::string> TokenFromFileOrEnv(const std::string& file, const char* env) {
  if (!file.empty()) return ReadTokenFile(file);
  const char* value = env != nullptr ? std::getenv(env) : nullptr;
  return std::string(value != nullptr ? value : "");
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentials(const Credentials& c) {
  if (c.tls_ca.empty()) {
    if (!c.tls_cert.empty() || !c.tls_key.empty()) {
      return absl::InvalidArgumentError("a client certificate needs TLS: give the server's CA (--tls-ca) too");
    }
    return grpc::InsecureChannelCredentials();
  }
  if (c.tls_cert.empty() != c.tls_key.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  grpc::SslCredentialsOptions o;
  auto ca = ReadPemFile(c.tls_ca, "--tls-ca");
  if (!ca.ok()) return ca.status();
  o.pem_root_certs = *ca;
  if (!c.tls_cert.empty()) {
    auto cert = ReadPemFile(c.tls_cert, "--tls-cert");
    if (!cert.ok()) return cert.status();
    auto key = ReadPemFile(c.tls_key, "--tls-key");
    if (!key.ok()) return key.status();
    o.pem_cert_chain = *cert;
    o.pem_private_key = *key;
  }
  return grpc::SslCredentials(o);
}

void AddToken(const Credentials& c, grpc::ClientContext* ctx) {
  if (!c.token.empty()) ctx->AddMetadata("authorization", "Bearer " + c.token);
}

}  // namespace rapidin::client
