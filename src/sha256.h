// Internal: SHA-256 (hex) of a byte string: hook digests, parameter digests.
#pragma once
#include <string>
namespace ftcomm {
std::string sha256_hex(const std::string& bytes);
}
