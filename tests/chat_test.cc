// Chat templates against transformers' apply_chat_template: tests/fixtures/chat/reference.json (written by
// scripts/make_chat_fixtures.py) holds each family's Jinja template as models ship it and its renders.
#include "model/chat.h"

#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "tests/test_util.h"

namespace rapidin::model {
namespace {

nlohmann::json Reference() {
  std::ifstream in(RAPIDIN_SOURCE_DIR "/tests/fixtures/chat/reference.json");
  return nlohmann::json::parse(in);
}

std::vector<Message> Conversation(const nlohmann::json& j) {
  std::vector<Message> out;
  for (const auto& m : j) out.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
  return out;
}

TEST(ChatTemplate, RecognisedFamiliesRenderAsTransformers) {
  const auto ref = Reference();
  int compared = 0, refused = 0;
  for (auto it = ref["templates"].begin(); it != ref["templates"].end(); ++it) {
    const std::string name = it.key();
    const auto& be = ref["bos_eos"][name];
    const std::string bos = be[0].is_null() ? "" : be[0].get<std::string>(), eos = be[1].get<std::string>();
    auto t = ChatTemplate::Recognize(it.value().get<std::string>(), bos, eos);
    ASSERT_TRUE(t.ok()) << name << ": " << t.status();
    EXPECT_EQ(t->name(), name);
    for (size_t c = 0; c < ref["conversations"].size(); ++c) {
      const auto conv = Conversation(ref["conversations"][c]);
      for (bool gen : {false, true}) {
        const auto& want = ref["renders"][name][c][gen ? "with_prompt" : "plain"];
        auto r = t->Render(conv, gen);
        if (want.is_null()) {  // transformers' template raises: rapidin refuses too
          EXPECT_FALSE(r.ok()) << name << " conversation " << c;
          ++refused;
          continue;
        }
        ASSERT_TRUE(r.ok()) << name << " conversation " << c << ": " << r.status();
        EXPECT_EQ(r->text, want.get<std::string>()) << name << " conversation " << c << " gen " << gen;
        ++compared;
        // Every message's content is where the spans say, and the trained bytes are the assistant turns'.
        for (const auto& p : r->contents) {
          const std::string& full = conv[p.message].content;
          EXPECT_EQ(r->text.substr(p.begin, p.end - p.begin), full.substr(p.content_offset, p.end - p.begin));
        }
        std::string trained;
        for (const auto& [b, e] : r->trained) trained += r->text.substr(b, e - b);
        std::string assistants;
        for (const auto& p : r->contents) {
          if (conv[p.message].role == "assistant") {
            assistants += r->text.substr(p.begin, p.end - p.begin) + t->spec().assistant_trained_suffix;
          }
        }
        EXPECT_EQ(trained, assistants) << name;
      }
    }
  }
  EXPECT_EQ(compared, 30);
  EXPECT_EQ(refused, 10);
}

TEST(ChatTemplate, UnknownTemplatesAndVariantsAreRefusedByName) {
  auto t = ChatTemplate::Recognize("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}{% endfor %}", "", "");
  EXPECT_EQ(t.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(t.status().message().find("--template"), std::string::npos) << t.status();
  t = ChatTemplate::Recognize("<|start_header_id|>system<|end_header_id|>Cutting Knowledge Date: Dec 2023", "", "");
  EXPECT_NE(t.status().message().find("Llama 3.1"), std::string::npos) << t.status();
  EXPECT_EQ(ChatTemplate::Named("vicuna", "", "").status().code(), absl::StatusCode::kNotFound);
  auto chatml = ChatTemplate::Named("chatml", "", "");
  ASSERT_TRUE(chatml.ok());
  EXPECT_FALSE(chatml->Render({}, false).ok());
  EXPECT_FALSE(chatml->Render({{"tool", "x"}}, false).ok());
  EXPECT_FALSE(chatml->Render({{"user", "a"}, {"system", "late"}}, false).ok());
}

TEST(ChatTemplate, FromFileRendersLikeTheBuiltIn) {
  rapidin::testing::TempDir dir;
  const nlohmann::json spec = {{"name", "my-chatml"},
                               {"system_prefix", "<|im_start|>system\n"},
                               {"system_suffix", "<|im_end|>\n"},
                               {"user_prefix", "<|im_start|>user\n"},
                               {"user_suffix", "<|im_end|>\n"},
                               {"assistant_prefix", "<|im_start|>assistant\n"},
                               {"assistant_suffix", "{eos}\n"},
                               {"assistant_trained_suffix", "{eos}"},
                               {"generation_prompt", "<|im_start|>assistant\n"}};
  std::ofstream(dir.path("t.json")) << spec.dump();
  auto f = ChatTemplate::FromFile(dir.path("t.json"), "", "<|im_end|>");
  ASSERT_TRUE(f.ok()) << f.status();
  auto b = ChatTemplate::Named("chatml", "", "<|im_end|>");
  const std::vector<Message> conv = {{"system", "s"}, {"user", "u"}, {"assistant", "a"}};
  EXPECT_EQ(f->Render(conv, true)->text, b->Render(conv, true)->text);
  std::ofstream(dir.path("bad.json")) << R"({"name": "x", "assistant_prefix": "A:", "role_colour": "red"})";
  auto bad = ChatTemplate::FromFile(dir.path("bad.json"), "", "");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(bad.status().message().find("role_colour"), std::string::npos);
  std::ofstream(dir.path("bad.json")) << "{ nope";
  EXPECT_EQ(ChatTemplate::FromFile(dir.path("bad.json"), "", "").status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(ChatTemplate::FromFile(dir.path("none.json"), "", "").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace rapidin::model
