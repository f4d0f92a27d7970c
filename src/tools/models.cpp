#include "models.h"

#include <cmath>
#include <fstream>
#include <iterator>
#include <limits>

#include <ATen/ATen.h>

namespace ftcomm::tools {

at::Tensor Model::param(at::Tensor init) {
  params_.push_back(init.to(device_).requires_grad_());
  return params_.back();
}

namespace {

// An MLP fitting a fixed random teacher network on synthetic inputs.
class Mlp : public Model {
 public:
  Mlp(int64_t seed, at::Device device) : Model(device) {
    auto init = at::make_generator<at::CPUGeneratorImpl>(1000 + seed);
    for (size_t i = 0; i + 1 < widths_.size(); ++i) {
      param(at::randn({widths_[i], widths_[i + 1]}, init) / std::sqrt(double(widths_[i])));
      param(at::zeros({widths_[i + 1]}));
    }
    teacher_ = at::randn({widths_.front(), widths_.back()}, init).to(device);
  }
  at::Tensor loss(int64_t step, int64_t first, int64_t count, int64_t global, int world, int64_t seed) override {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed * 1000003 + step * 131);
    const at::Tensor x = at::randn({global, widths_.front()}, gen).narrow(0, first, count).to(device_);
    const at::Tensor y = at::tanh(at::mm(x, teacher_) / 8.0);
    at::Tensor h = x;
    for (size_t i = 0; i < params_.size(); i += 2) {
      h = at::addmm(params_[i + 1], h, params_[i]);
      if (i + 2 < params_.size()) h = at::relu(h);
    }
    return (h - y).pow(2).mean(1).sum() * (double(world) / double(global));
  }

 private:
  std::vector<int64_t> widths_{64, 256, 256, 16};
  at::Tensor teacher_;
};

// A small character-level transformer (bytes as tokens; 2 pre-LN blocks, d=64,
// 4 heads, context 32) trained to predict the next byte of a text file.
class CharLm : public Model {
 public:
  CharLm(int64_t seed, const std::string& path, at::Device device) : Model(device) {
    std::ifstream in(path, std::ios::binary);
    TORCH_CHECK(in, "--data '", path, "' cannot be read; give a text file (the default is ", kDefaultCharLmData, ")");
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    TORCH_CHECK(static_cast<int64_t>(text.size()) > kContext + 1, "--data '", path, "' is too short to train on");
    data_ = at::empty({static_cast<int64_t>(text.size())}, at::kLong);
    for (size_t i = 0; i < text.size(); ++i) data_[i] = static_cast<int64_t>(static_cast<unsigned char>(text[i]));
    auto init = at::make_generator<at::CPUGeneratorImpl>(2000 + seed);
    auto w = [&](std::vector<int64_t> shape, double fan_in) { return param(at::randn(shape, init) / std::sqrt(fan_in)); };
    embed_ = w({kVocab, kDim}, 1.0 / 0.02 / 0.02);
    pos_ = w({kContext, kDim}, 1.0 / 0.02 / 0.02);
    for (int l = 0; l < kLayers; ++l) {
      Block b;
      b.ln1_w = param(at::ones({kDim}));
      b.ln1_b = param(at::zeros({kDim}));
      b.qkv = w({kDim, 3 * kDim}, kDim);
      b.proj = w({kDim, kDim}, kDim);
      b.ln2_w = param(at::ones({kDim}));
      b.ln2_b = param(at::zeros({kDim}));
      b.fc1 = w({kDim, 4 * kDim}, kDim);
      b.fc1_b = param(at::zeros({4 * kDim}));
      b.fc2 = w({4 * kDim, kDim}, 4 * kDim);
      b.fc2_b = param(at::zeros({kDim}));
      blocks_.push_back(b);
    }
    lnf_w_ = param(at::ones({kDim}));
    lnf_b_ = param(at::zeros({kDim}));
    head_ = w({kDim, kVocab}, kDim);
    mask_ = at::full({kContext, kContext}, -std::numeric_limits<float>::infinity()).triu(1).to(device);
  }
  at::Tensor loss(int64_t step, int64_t first, int64_t count, int64_t global, int world, int64_t seed) override {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed * 1000003 + step * 131);
    const int64_t batch = count;
    const at::Tensor starts =
        at::randint(0, data_.numel() - kContext - 1, {global, 1}, gen, at::kLong).narrow(0, first, count);
    const at::Tensor index = starts + at::arange(kContext + 1, at::kLong);
    const at::Tensor window = data_.index_select(0, index.reshape({-1})).view({batch, kContext + 1}).to(device_);
    const at::Tensor tokens = window.narrow(1, 0, kContext), targets = window.narrow(1, 1, kContext);
    // The embedding as a one-hot matmul: its backward has no atomic adds, so CUDA
    // runs are bit-reproducible (index_select's backward is not).
    at::Tensor x = at::matmul(at::one_hot(tokens, kVocab).to(embed_.scalar_type()), embed_) + pos_;
    const int64_t dh = kDim / kHeads;
    for (const auto& b : blocks_) {
      at::Tensor h = at::layer_norm(x, {kDim}, b.ln1_w, b.ln1_b);
      auto qkv = at::matmul(h, b.qkv).view({batch, kContext, 3, kHeads, dh}).permute({2, 0, 3, 1, 4});
      at::Tensor att = at::matmul(qkv[0], qkv[1].transpose(-2, -1)) / std::sqrt(double(dh)) + mask_;
      at::Tensor y = at::matmul(at::softmax(att, -1), qkv[2]).transpose(1, 2).reshape({batch, kContext, kDim});
      x = x + at::matmul(y, b.proj);
      h = at::layer_norm(x, {kDim}, b.ln2_w, b.ln2_b);
      x = x + at::matmul(at::gelu(at::matmul(h, b.fc1) + b.fc1_b), b.fc2) + b.fc2_b;
    }
    const at::Tensor logits = at::matmul(at::layer_norm(x, {kDim}, lnf_w_, lnf_b_), head_);
    return at::nll_loss(at::log_softmax(logits.view({-1, kVocab}), -1), targets.reshape({-1}), {},
                        at::Reduction::Sum) *
           (double(world) / double(global * kContext));
  }

 private:
  static constexpr int64_t kVocab = 256, kDim = 64, kHeads = 4, kContext = 32, kLayers = 2;
  struct Block {
    at::Tensor ln1_w, ln1_b, qkv, proj, ln2_w, ln2_b, fc1, fc1_b, fc2, fc2_b;
  };
  at::Tensor data_, embed_, pos_, lnf_w_, lnf_b_, head_, mask_;
  std::vector<Block> blocks_;
};

}  // namespace

std::unique_ptr<Model> make_model(const std::string& name, int64_t seed, const std::string& data, at::Device device) {
  if (name == "mlp") return std::make_unique<Mlp>(seed, device);
  TORCH_CHECK(name == "charlm", "unknown model '", name, "'; use mlp or charlm");
  return std::make_unique<CharLm>(seed, data.empty() ? kDefaultCharLmData : data, device);
}

}  // namespace ftcomm::tools
