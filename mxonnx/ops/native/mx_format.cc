// Parsing of MX format names ("mxint4-128"), mirroring mxonnx.formats.parse_format for the MX kinds.
#include "mx_format.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace mxonnx {

namespace {

constexpr const char* kValid =
    "mxint{2..8}-{b}, mxfp8e4m3-{b}, mxfp8e5m2-{b}, mxfp6e3m2-{b}, mxfp6e2m3-{b}, mxfp4-{b}; "
    "b a power of two in 2..1024";

[[noreturn]] void fail(const std::string& name) {
  throw std::invalid_argument("unknown MX format '" + name + "' (valid: " + kValid + ")");
}

}  // namespace

Isa isa_cap() {
  const char* name = std::getenv("MXONNX_NATIVE_ISA");
  if (name == nullptr) return Isa::kAvx512Vnni;
  if (std::strcmp(name, "portable") == 0) return Isa::kPortable;
  if (std::strcmp(name, "avx2") == 0) return Isa::kAvx2;
  return Isa::kAvx512Vnni;
}

MxFormat parse_mx_format(const std::string& name) {
  std::string key = name;
  std::transform(key.begin(), key.end(), key.begin(), [](unsigned char c) { return std::tolower(c); });
  const auto dash = key.rfind('-');
  if (dash == std::string::npos) fail(name);
  const std::string family = key.substr(0, dash), block = key.substr(dash + 1);
  if (block.empty() || block.size() > 4 || !std::all_of(block.begin(), block.end(), ::isdigit)) fail(name);
  const int64_t size = std::stoll(block);
  if (size < 2 || size > 1024 || (size & (size - 1)) != 0) fail(name);
  for (const ElemFormat& elem : kElemFormats) {
    if (family == elem.family) return MxFormat{&elem, size};
  }
  fail(name);
}

}  // namespace mxonnx
