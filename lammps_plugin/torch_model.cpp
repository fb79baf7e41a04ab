#include "torch_model.h"

#include <torch/cuda.h>
#include <torch/script.h>
#include <ATen/Parallel.h>

#include <stdexcept>

namespace mlsurrogate {

struct TorchModel::Impl {
  torch::jit::Module module;
};

TorchModel::TorchModel(const std::string &path, const std::string &device)
    : impl_(new Impl), path_(path), device_(device) {
  try {
    impl_->module = torch::jit::load(path, torch::Device(device));
    impl_->module.eval();
  } catch (const c10::Error &e) {
    throw std::runtime_error(e.what_without_backtrace());
  } catch (const std::exception &e) {
    throw std::runtime_error(e.what());
  }
}

TorchModel::~TorchModel() = default;

double TorchModel::number_attr(const std::string &name, double fallback) const {
  if (!impl_->module.hasattr(name)) return fallback;
  const c10::IValue value = impl_->module.attr(name);
  if (value.isDouble()) return value.toDouble();
  if (value.isInt()) return static_cast<double>(value.toInt());
  throw std::runtime_error("model attribute '" + name + "' is not a number");
}

std::vector<std::string> TorchModel::string_list_attr(const std::string &name) const {
  std::vector<std::string> out;
  if (!impl_->module.hasattr(name)) return out;
  const c10::IValue value = impl_->module.attr(name);
  if (!value.isList()) throw std::runtime_error("model attribute '" + name + "' is not a list");
  for (const c10::IValue &item : value.toListRef()) {
    if (!item.isString())
      throw std::runtime_error("model attribute '" + name + "' is not a list of strings");
    out.push_back(item.toStringRef());
  }
  return out;
}

std::string TorchModel::check_device(const std::string &device) {
  torch::Device dev(torch::kCPU);
  try {
    dev = torch::Device(device);
  } catch (const std::exception &) {
    return "'" + device + "' is not a device name (use cpu, cuda or cuda:N)";
  }
  if (dev.is_cpu()) return "";
  if (!dev.is_cuda()) return "device '" + device + "' is not supported (use cpu, cuda or cuda:N)";
  if (!torch::cuda::is_available())
    return "device '" + device +
           "' requested, but CUDA is not available (CPU-only libtorch, or no GPU visible)";
  const auto count = static_cast<int>(torch::cuda::device_count());
  if (dev.has_index() && dev.index() >= count)
    return "device '" + device + "' requested, but only " + std::to_string(count) +
           " CUDA device(s) are visible";
  return "";
}

void TorchModel::set_num_threads(int n) { at::set_num_threads(n); }

}  // namespace mlsurrogate
