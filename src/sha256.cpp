// SHA-256 through OpenSSL's EVP interface (libcrypto).
#include "sha256.h"

#include <cstdio>
#include <memory>

#include <c10/util/Exception.h>
#include <openssl/evp.h>

namespace ftcomm {

std::string sha256_hex(const std::string& bytes) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  TORCH_CHECK(EVP_Digest(bytes.data(), bytes.size(), digest, &length, EVP_sha256(), nullptr) == 1 && length == 32,
              "SHA-256 failed in OpenSSL");
  std::string hex(2 * length, '0');
  for (unsigned int i = 0; i < length; ++i) std::snprintf(&hex[2 * i], 3, "%02x", digest[i]);
  return hex;
}

}  // namespace ftcomm
