#include "ftcomm/errors.h"

#include <utility>

namespace ftcomm {

HookError::HookError(HookFailure failure) : c10::Error(failure.message), failure_(std::move(failure)) {}

ResumeRefused::ResumeRefused(std::string message, int64_t step, std::vector<std::string> settings)
    : c10::Error(std::move(message)), step_(step), settings_(std::move(settings)) {}

StoreError::StoreError(std::string message, std::string code)
    : c10::Error(std::move(message)), code_(std::move(code)) {}

}  // namespace ftcomm
