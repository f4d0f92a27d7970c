// Internal: SHA-256 without the torch headers (also declared in script_hook.h).
#pragma once
#include <string>
namespace ftcomm {
std::string sha256_hex(const std::string& bytes);
}
