#include "server/internal/auth.h"

#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "client/credentials.h"

namespace rapidin::server::internal {
namespace {

// Equal in time that depends on the presented token's length only, not on where it first differs.
bool ConstantTimeEquals(const std::string& known, absl::string_view presented) {
  unsigned char diff = known.size() != presented.size() ? 1 : 0;
  for (size_t i = 0; i < presented.size(); ++i) {
    const unsigned char k = known.empty() ? 0 : static_cast<unsigned char>(known[i % known.size()]);
    diff |= k ^ static_cast<unsigned char>(presented[i]);
  }
  return diff == 0;
}

const char* RoleName(Role r) {
  switch (r) {
    case Role::kQuery:
      return "query";
    case Role::kIngest:
      return "ingest";
    case Role::kAdmin:
      return "admin";
  }
  return "?";
}

bool Allowed(Role have, Need need) {
  if (have == Role::kAdmin || need == Need::kAnyRole) return true;
  return (need == Need::kQuery && have == Role::kQuery) || (need == Need::kIngest && have == Role::kIngest);
}

}  // namespace

absl::StatusOr<std::vector<std::pair<std::string, Role>>> TokenTable::Parse(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("--auth-tokens: cannot read ", path));
  std::vector<std::pair<std::string, Role>> out;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    const absl::string_view l = absl::StripAsciiWhitespace(line);
    if (l.empty() || l[0] == '#') continue;
    std::vector<absl::string_view> f = absl::StrSplit(l, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (f.size() != 2) {
      return absl::InvalidArgumentError(absl::StrCat(path, ":", n, ": expected \"TOKEN ROLE\""));
    }
    Role role;
    if (f[1] == "query") {
      role = Role::kQuery;
    } else if (f[1] == "ingest") {
      role = Role::kIngest;
    } else if (f[1] == "admin") {
      role = Role::kAdmin;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", n, ": unknown role \"", f[1], "\" (query, ingest or admin)"));
    }
    out.emplace_back(std::string(f[0]), role);
  }
  if (out.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": no token"));
  return out;
}

absl::StatusOr<std::unique_ptr<TokenTable>> TokenTable::Load(const std::string& path) {
  auto tokens = Parse(path);
  if (!tokens.ok()) return tokens.status();
  std::unique_ptr<TokenTable> t(new TokenTable(path));
  MutexLock l(&t->mu_);
  t->tokens_ = std::move(*tokens);
  return t;
}

absl::Status TokenTable::Reload() {
  auto tokens = Parse(path_);
  if (!tokens.ok()) return tokens.status();
  MutexLock l(&mu_);
  tokens_ = std::move(*tokens);
  return absl::OkStatus();
}

size_t TokenTable::size() const {
  MutexLock l(&mu_);
  return tokens_.size();
}

absl::Status TokenTable::Check(const grpc::ServerContextBase& ctx, Need need, const char* method) const {
  const auto& md = ctx.client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) {
    return absl::UnauthenticatedError("no bearer token: send \"authorization: Bearer TOKEN\" metadata");
  }
  const absl::string_view value(it->second.data(), it->second.size());
  constexpr absl::string_view kBearer = "Bearer ";
  if (!absl::StartsWith(value, kBearer)) {
    return absl::UnauthenticatedError("the authorization metadata is not \"Bearer TOKEN\"");
  }
  const absl::string_view presented = value.substr(kBearer.size());
  bool found = false;
  Role role = Role::kQuery;
  {
    MutexLock l(&mu_);
    for (const auto& [token, r] : tokens_) {  // no early exit: the time does not say which entry matched
      if (ConstantTimeEquals(token, presented) && !found) {
        found = true;
        role = r;
      }
    }
  }
  if (!found) return absl::UnauthenticatedError("invalid token");
  if (!Allowed(role, need)) {
    return absl::PermissionDeniedError(absl::StrCat("a token of role ", RoleName(role), " may not call ", method));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(const ServerOptions::Net& net) {
  if (net.tls_cert.empty() && net.tls_key.empty()) {
    if (!net.tls_client_ca.empty()) {
      return absl::InvalidArgumentError("--tls-client-ca needs TLS: give --tls-cert and --tls-key too");
    }
    return grpc::InsecureServerCredentials();
  }
  if (net.tls_cert.empty() || net.tls_key.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  auto cert = client::ReadPemFile(net.tls_cert, "--tls-cert");
  if (!cert.ok()) return cert.status();
  auto key = client::ReadPemFile(net.tls_key, "--tls-key");
  if (!key.ok()) return key.status();
  grpc::SslServerCredentialsOptions o(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  o.pem_key_cert_pairs.push_back({*key, *cert});
  if (!net.tls_client_ca.empty()) {
    auto ca = client::ReadPemFile(net.tls_client_ca, "--tls-client-ca");
    if (!ca.ok()) return ca.status();
    o.pem_root_certs = *ca;
    o.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(o);
}

}  // namespace rapidin::server::internal
