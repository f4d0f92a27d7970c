// The models `ftcomm train` trains: a rank's parameters and the loss of its share
// of a step's global batch. The global batch depends only on (seed, step), so a
// resumed run sees the same data at any world size.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

namespace ftcomm::tools {

class Model {
 public:
  explicit Model(at::Device device) : device_(device) {}
  virtual ~Model() = default;
  std::vector<at::Tensor>& params() { return params_; }
  // The loss of samples [first, first + count) of step `step`'s global batch of
  // `global` samples, as this rank's share of the global mean: the sum of its
  // samples' losses x world / global, so the ranks' average is the mean over the
  // global batch however it is divided.
  virtual at::Tensor loss(int64_t step, int64_t first, int64_t count, int64_t global, int world, int64_t seed) = 0;

 protected:
  at::Tensor param(at::Tensor init);
  at::Device device_;
  std::vector<at::Tensor> params_;
};

// The text --model charlm trains on when --data is not given.
constexpr const char* kDefaultCharLmData = "/usr/share/common-licenses/GPL-3";

// "mlp": an MLP fitting a fixed random teacher network on synthetic inputs.
// "charlm": a small character-level transformer (bytes as tokens; 2 pre-LN
// blocks, d=64, 4 heads, context 32) predicting the next byte of `data` (a text
// file; empty: kDefaultCharLmData). Throws c10::Error for another name or
// unreadable data.
std::unique_ptr<Model> make_model(const std::string& name, int64_t seed, const std::string& data, at::Device device);

}  // namespace ftcomm::tools
