// Transport security: TLS (server, mutual), bearer tokens with roles, token reload, and the router's TLS and
// token to its shard servers. Certificates are made per test run with the openssl command (skipped without it).
#include <gtest/gtest.h>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "client/client.h"
#include "client/credentials.h"
#include "server/server.h"
#include "tests/test_util.h"

namespace rapidin::server {
namespace {

using client::Client;
using client::Credentials;
using rapidin::testing::TempDir;
namespace v1 = rapidin::v1;

constexpr int kK = 8;
// Distinct, recognisable secrets: the log test looks for them.
constexpr char kQueryToken[] = "qtok-7f3a9c1e5b";
constexpr char kIngestToken[] = "itok-2d8e6b4a90";
constexpr char kAdminToken[] = "atok-c51f0e7d33";
constexpr char kWrongToken[] = "wrong-9b1c4e2a77";

// The certificates of tests/make-test-certs.sh, made in d.
bool MakeCerts(const TempDir& d) {
  const std::string cmd = "bash " RAPIDIN_SOURCE_DIR "/tests/make-test-certs.sh " + d.path() + " >/dev/null 2>&1";
  return std::system(cmd.c_str()) == 0;
}

bool HaveOpenssl() { return std::system("openssl version >/dev/null 2>&1") == 0; }

#define SKIP_WITHOUT_OPENSSL() \
  if (!HaveOpenssl()) GTEST_SKIP() << "no openssl command here (Debian: openssl) to make test certificates"

class SecurityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!HaveOpenssl()) return;
    ASSERT_TRUE(MakeCerts(certs_)) << "openssl failed to make the test certificates";
    WriteTokens({{kQueryToken, "query"}, {kIngestToken, "ingest"}, {kAdminToken, "admin"}});
  }

  std::string Cert(const std::string& name, const char* ext = ".pem") const { return certs_.path(name + ext); }

  void WriteTokens(const std::vector<std::pair<std::string, std::string>>& lines) {
    std::ofstream f(certs_.path("tokens"));
    f << "# test tokens\n\n";
    for (const auto& [t, r] : lines) f << t << " " << r << "\n";
  }

  ServerOptions Options(const std::string& store) const {
    ServerOptions o;
    o.store.path = store;
    o.store.create_k = kK;
    o.store.shards = 2;
    o.net.listen = "127.0.0.1:0";
    o.net.metrics_listen = "";
    return o;
  }

  // Options for a server that speaks TLS with certificate `cert` (see MakeCerts).
  ServerOptions TlsOptions(const std::string& store, const std::string& cert) const {
    ServerOptions o = Options(store);
    o.net.tls_cert = Cert(cert);
    o.net.tls_key = Cert(cert, ".key");
    return o;
  }

  std::unique_ptr<Server> Start(const ServerOptions& o) {
    auto s = Server::Create(o);
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? std::move(*s) : nullptr;
  }

  static std::string Address(const Server& s) { return "127.0.0.1:" + std::to_string(s.port()); }
  static std::string Localhost(const Server& s) { return "localhost:" + std::to_string(s.port()); }

  // Stats through a client with these credentials; the status code.
  static absl::StatusCode StatsCode(const std::string& address, const Credentials& c) {
    auto cl = Client::Connect(address, c, /*deadline_s=*/5);
    if (!cl.ok()) return cl.status().code();
    return (*cl)->Stats().status().code();
  }

  static absl::Status IngestOne(Client* c, const std::string& id) {
    auto r = c->Ingest([&, sent = false](v1::IngestRequest* b) mutable {
      if (sent) return false;
      sent = true;
      auto* rec = b->add_records();
      rec->mutable_record()->set_id(id);
      rec->mutable_record()->set_text("a record");
      for (int i = 0; i < kK; ++i) rec->add_vector(0.25f * (i + 1));
      return true;
    });
    return r.status();
  }

  static absl::Status QueryOne(Client* c) {
    v1::QueryByVectorRequest q;
    auto* v = q.add_queries();
    for (int i = 0; i < kK; ++i) v->add_values(1.0f);
    q.set_top_k(1);
    return c->QueryByVector(q).status();
  }

  TempDir certs_, stores_;
};

TEST_F(SecurityTest, TlsRefusesPlaintextAndAnotherCa) {
  SKIP_WITHOUT_OPENSSL();
  auto s = Start(TlsOptions(stores_.path("tls"), "server"));
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(StatsCode(Address(*s), Credentials{}), absl::StatusCode::kUnavailable) << "plaintext against TLS";
  EXPECT_EQ(StatsCode(Address(*s), Credentials{Cert("ca")}), absl::StatusCode::kOk);
  EXPECT_EQ(StatsCode(Localhost(*s), Credentials{Cert("ca")}), absl::StatusCode::kOk);
  EXPECT_EQ(StatsCode(Address(*s), Credentials{Cert("other")}), absl::StatusCode::kUnavailable) << "wrong CA";
}

TEST_F(SecurityTest, ExpiredServerCertificateIsRefusedByClients) {
  SKIP_WITHOUT_OPENSSL();
  auto s = Start(TlsOptions(stores_.path("expired"), "expired"));
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(StatsCode(Address(*s), Credentials{Cert("ca")}), absl::StatusCode::kUnavailable);
}

TEST_F(SecurityTest, MutualTlsNeedsAClientCertificateFromItsCa) {
  SKIP_WITHOUT_OPENSSL();
  ServerOptions o = TlsOptions(stores_.path("mtls"), "server");
  o.net.tls_client_ca = Cert("ca");
  auto s = Start(o);
  ASSERT_NE(s, nullptr);
  EXPECT_NE(StatsCode(Address(*s), Credentials{Cert("ca")}), absl::StatusCode::kOk) << "no client certificate";
  EXPECT_NE(StatsCode(Address(*s), Credentials{Cert("ca"), Cert("stranger"), Cert("stranger", ".key")}),
            absl::StatusCode::kOk)
      << "a client certificate from another CA";
  EXPECT_EQ(StatsCode(Address(*s), Credentials{Cert("ca"), Cert("client"), Cert("client", ".key")}),
            absl::StatusCode::kOk);
}

TEST_F(SecurityTest, BadSecuritySettingsAreRefusedAtStartUp) {
  SKIP_WITHOUT_OPENSSL();
  ServerOptions o = Options(stores_.path("bad"));
  o.net.tls_cert = Cert("server");
  EXPECT_EQ(Server::Create(o).status().code(), absl::StatusCode::kInvalidArgument) << "certificate without key";
  o.net.tls_key = certs_.path("missing.key");
  EXPECT_EQ(Server::Create(o).status().code(), absl::StatusCode::kNotFound);
  o.net.tls_key = certs_.path("tokens");  // not PEM
  EXPECT_EQ(Server::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = Options(stores_.path("bad"));
  o.net.tls_client_ca = Cert("ca");
  EXPECT_EQ(Server::Create(o).status().code(), absl::StatusCode::kInvalidArgument) << "client CA without TLS";
  o = Options(stores_.path("bad"));
  WriteTokens({{kAdminToken, "root"}});
  o.net.auth_tokens = certs_.path("tokens");
  auto st = Server::Create(o).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("unknown role"), std::string::npos) << st;
  EXPECT_EQ(st.message().find(kAdminToken), std::string::npos) << "the error must not show the token";
  EXPECT_FALSE(std::filesystem::exists(stores_.path("bad"))) << "refused before the store was created";
}

TEST_F(SecurityTest, TokensAndRoles) {
  SKIP_WITHOUT_OPENSSL();
  ServerOptions o = Options(stores_.path("tokens"));
  o.net.auth_tokens = certs_.path("tokens");
  auto s = Start(o);
  ASSERT_NE(s, nullptr);
  auto as = [&](const std::string& token) {
    return std::move(*Client::Connect(Address(*s), Credentials{"", "", "", token}));
  };
  auto none = as(""), wrong = as(kWrongToken), query = as(kQueryToken), ingest = as(kIngestToken),
       admin = as(kAdminToken);
  EXPECT_EQ(none->Stats().status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(wrong->Stats().status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(QueryOne(none.get()).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(IngestOne(none.get(), "r0").code(), absl::StatusCode::kUnauthenticated);

  EXPECT_EQ(IngestOne(query.get(), "r0").code(), absl::StatusCode::kPermissionDenied);
  ASSERT_TRUE(IngestOne(ingest.get(), "r1").ok());
  ASSERT_TRUE(IngestOne(admin.get(), "r2").ok());
  EXPECT_EQ(QueryOne(ingest.get()).code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(ingest->GetRecord("r1", false).status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_TRUE(QueryOne(query.get()).ok());
  EXPECT_TRUE(QueryOne(admin.get()).ok());
  EXPECT_TRUE(query->GetRecord("r1", false).ok());
  for (Client* c : {query.get(), ingest.get(), admin.get()}) EXPECT_TRUE(c->Stats().ok());
  for (Client* c : {none.get(), wrong.get()}) {
    EXPECT_EQ(c->DeleteRecords({"r1"}).status().code(), absl::StatusCode::kUnauthenticated);
  }
  for (Client* c : {query.get(), ingest.get()}) {
    EXPECT_EQ(c->DeleteRecords({"r1"}).status().code(), absl::StatusCode::kPermissionDenied);
  }
  ASSERT_TRUE(admin->GetRecord("r2", false).ok());
  auto del = admin->DeleteRecords({"r2"});
  ASSERT_TRUE(del.ok()) << del.status();
  EXPECT_EQ(del->deleted(), 1u);
  ASSERT_TRUE(IngestOne(admin.get(), "r2").ok());
  auto stats = admin->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->num_records(), 2u) << "the refused ingests wrote nothing";

  // Reload: the query token is replaced; a broken file leaves the tokens in force.
  WriteTokens({{"qtok-new-41d2", "query"}, {kAdminToken, "admin"}});
  ASSERT_TRUE(s->ReloadTokens().ok());
  EXPECT_EQ(QueryOne(query.get()).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(QueryOne(ingest.get()).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_TRUE(QueryOne(as("qtok-new-41d2").get()).ok());
  WriteTokens({{kAdminToken, "superuser"}});
  EXPECT_EQ(s->ReloadTokens().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(QueryOne(as("qtok-new-41d2").get()).ok()) << "the old table stays after a failed reload";
}

TEST_F(SecurityTest, TokensNeverReachTheLogOrTheErrors) {
  SKIP_WITHOUT_OPENSSL();
  std::ostringstream log;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(log);
  auto previous = spdlog::default_logger();
  spdlog::set_default_logger(std::make_shared<spdlog::logger>("capture", sink));
  spdlog::set_level(spdlog::level::trace);
  std::vector<std::string> errors;
  {
    ServerOptions o = Options(stores_.path("log"));
    o.net.auth_tokens = certs_.path("tokens");
    auto s = Start(o);
    ASSERT_NE(s, nullptr);
    for (const char* t : {kWrongToken, kQueryToken, kIngestToken, kAdminToken}) {
      auto c = std::move(*Client::Connect(Address(*s), Credentials{"", "", "", t}));
      errors.push_back(std::string(IngestOne(c.get(), "x").message()));
      errors.push_back(std::string(QueryOne(c.get()).message()));
      errors.push_back(std::string(c->Stats().status().message()));
    }
    ASSERT_TRUE(s->ReloadTokens().ok());
  }
  spdlog::set_default_logger(previous);
  spdlog::set_level(spdlog::level::info);
  const std::string text = log.str();
  EXPECT_NE(text.find("bearer tokens"), std::string::npos) << "the log was captured: " << text;
  for (const char* t : {kWrongToken, kQueryToken, kIngestToken, kAdminToken}) {
    EXPECT_EQ(text.find(t), std::string::npos) << "token in the log";
    for (const auto& e : errors) EXPECT_EQ(e.find(t), std::string::npos) << "token in an error: " << e;
  }
}

TEST_F(SecurityTest, RouterSpeaksTlsAndTokensToItsShardServers) {
  SKIP_WITHOUT_OPENSSL();
  std::vector<std::unique_ptr<Server>> shards;
  std::vector<std::string> addresses;
  for (int i = 0; i < 2; ++i) {
    ServerOptions o = TlsOptions(stores_.path("shard" + std::to_string(i)), "server");
    o.net.tls_client_ca = Cert("ca");
    o.net.auth_tokens = certs_.path("tokens");
    shards.push_back(Start(o));
    ASSERT_NE(shards.back(), nullptr);
    addresses.push_back(Localhost(*shards.back()));
    auto c = Client::Connect(addresses.back(), Credentials{Cert("ca"), Cert("client"), Cert("client", ".key"),
                                                           kIngestToken});
    ASSERT_TRUE(c.ok());
    ASSERT_TRUE(IngestOne(c->get(), "s" + std::to_string(i)).ok());
  }
  ServerOptions ro;
  ro.net.listen = "127.0.0.1:0";
  ro.net.metrics_listen = "";
  ro.net.tls_cert = Cert("server");
  ro.net.tls_key = Cert("server", ".key");
  ro.net.auth_tokens = certs_.path("tokens");
  ro.router.shard_servers = addresses;
  ro.router.connect_timeout = absl::Seconds(5);

  // Without the shard servers' CA, or without a token they accept, the router does not start.
  EXPECT_FALSE(Server::Create(ro).ok());
  ro.router.shard_credentials = Credentials{Cert("ca"), Cert("client"), Cert("client", ".key"), kWrongToken};
  auto refused = Server::Create(ro);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("invalid token"), std::string::npos) << refused.status();

  ro.router.shard_credentials.token = kAdminToken;
  auto router = Start(ro);
  ASSERT_NE(router, nullptr);
  EXPECT_EQ(StatsCode(Address(*router), Credentials{Cert("ca")}), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(StatsCode(Address(*router), Credentials{}), absl::StatusCode::kUnavailable) << "plaintext";
  auto c = Client::Connect(Address(*router), Credentials{Cert("ca"), "", "", kQueryToken});
  ASSERT_TRUE(c.ok());
  auto stats = (*c)->Stats();
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->num_records(), 2u);
  EXPECT_TRUE(QueryOne(c->get()).ok());
  auto rec = (*c)->GetRecord("s1", false);
  ASSERT_TRUE(rec.ok()) << rec.status();
  EXPECT_EQ(IngestOne(c->get(), "r").code(), absl::StatusCode::kPermissionDenied);
}

}  // namespace
}  // namespace rapidin::server
