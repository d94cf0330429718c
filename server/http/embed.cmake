# Writes OUT: the page and the OpenAPI description as C++ string constants (server/http.cc serves them).
file(READ "${HTML}" html)
file(READ "${OPENAPI}" openapi)
file(WRITE "${OUT}" "// Generated from server/http/index.html and openapi.json by server/http/embed.cmake.\n"
  "namespace rapidin::server {\n"
  "extern const char* const kHttpIndexHtml = R\"rapidin_asset(${html})rapidin_asset\";\n"
  "extern const char* const kHttpOpenApiJson = R\"rapidin_asset(${openapi})rapidin_asset\";\n"
  "}  // namespace rapidin::server\n")
