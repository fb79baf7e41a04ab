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
    : impl_(std::make_unique<Impl>()), path_(path), device_(device) {
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

int TorchModel::cuda_device_count() {
  return torch::cuda::is_available() ? static_cast<int>(torch::cuda::device_count()) : 0;
}

}  // namespace mlsurrogate

namespace mlsurrogate {

namespace {

// Runs `fn`, turning torch's exceptions (a scripted `raise ValueError` included) into
// std::runtime_error carrying only the message.
template <class Fn>
auto guarded(Fn &&fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const c10::Error &e) {
    throw std::runtime_error(e.what_without_backtrace());
  }
}

std::vector<double> to_vector(const torch::Tensor &t) {
  const torch::Tensor host = t.detach().to(torch::kCPU, torch::kFloat64).contiguous();
  return std::vector<double>(host.data_ptr<double>(), host.data_ptr<double>() + host.numel());
}

}  // namespace

std::vector<double> TorchModel::number_list_attr(const std::string &name) const {
  if (!impl_->module.hasattr(name))
    throw std::runtime_error("model has no attribute '" + name + "'");
  std::vector<double> out;
  const c10::IValue value = impl_->module.attr(name);
  if (!value.isList()) throw std::runtime_error("model attribute '" + name + "' is not a list");
  for (const c10::IValue &item : value.toListRef()) {
    if (item.isDouble())
      out.push_back(item.toDouble());
    else if (item.isInt())
      out.push_back(static_cast<double>(item.toInt()));
    else
      throw std::runtime_error("model attribute '" + name + "' is not a list of numbers");
  }
  return out;
}

bool TorchModel::bool_attr(const std::string &name) const {
  if (!impl_->module.hasattr(name))
    throw std::runtime_error("model has no attribute '" + name + "'");
  const c10::IValue value = impl_->module.attr(name);
  if (!value.isBool()) throw std::runtime_error("model attribute '" + name + "' is not a bool");
  return value.toBool();
}

namespace {

struct Handles {
  torch::jit::Module functional;
  torch::Device device;
  torch::Dtype network_dtype;
  int num_energies;
};

Handles handles(const torch::jit::Module &module) {
  if (!module.hasattr("functional") || !module.hasattr("network"))
    throw std::runtime_error("not an mlsurrogate model (no 'functional' or 'network' submodule)");
  torch::jit::Module functional = module.attr("functional").toModule();
  const torch::Tensor energies = functional.attr("energies").toTensor();
  // a single network or an ensemble of them: the dtype of its (first) weights
  const auto weights = module.attr("network").toModule().parameters();
  if (weights.size() == 0) throw std::runtime_error("the model's network has no weights");
  return {functional, energies.device(), (*weights.begin()).scalar_type(),
          static_cast<int>(energies.numel())};
}

}  // namespace

int TorchModel::num_energies() const {
  return guarded([&] { return handles(impl_->module).num_energies; });
}

std::vector<double> TorchModel::predict_ldos(const double *descriptors, int npoints,
                                             int nfeatures) const {
  return guarded([&] {
    const Handles h = handles(impl_->module);
    torch::NoGradGuard no_grad;
    const torch::Tensor x =
        torch::from_blob(const_cast<double *>(descriptors), {npoints, nfeatures}, torch::kFloat64)
            .to(h.device, h.network_dtype);
    return to_vector(impl_->module.forward({x}).toTensor());
  });
}

namespace {

torch::Tensor tensor_of(const std::vector<double> &v, std::vector<int64_t> shape,
                        const torch::Device &device) {
  return torch::from_blob(const_cast<double *>(v.data()), shape, torch::kFloat64)
      .to(device)
      .clone();
}

torch::Tensor rows_of(const std::vector<double> &ldos, const Handles &h) {
  const int64_t n = static_cast<int64_t>(ldos.size()) / h.num_energies;
  return tensor_of(ldos, {n, h.num_energies}, h.device);
}

torch::Tensor scalar(double value, const torch::Device &device) {
  return torch::tensor(value, torch::dtype(torch::kFloat64).device(device));
}

}  // namespace

std::vector<double> TorchModel::dos(const std::vector<double> &ldos, double voxel) const {
  return guarded([&] {
    const Handles h = handles(impl_->module);
    return to_vector(h.functional.get_method("dos")({rows_of(ldos, h), voxel}).toTensor());
  });
}

double TorchModel::fermi_level(const std::vector<double> &dos, double n_electrons) const {
  return guarded([&] {
    const Handles h = handles(impl_->module);
    const torch::Tensor d = tensor_of(dos, {h.num_energies}, h.device);
    return h.functional.get_method("fermi_level")({d, n_electrons}).toTensor().item<double>();
  });
}

std::vector<double> TorchModel::density(const std::vector<double> &ldos, double mu) const {
  return guarded([&] {
    const Handles h = handles(impl_->module);
    return to_vector(
        h.functional.get_method("density")({rows_of(ldos, h), scalar(mu, h.device)}).toTensor());
  });
}

TorchModel::GlobalTerms TorchModel::global_terms(const std::vector<double> &dos,
                                                 const std::vector<double> &density,
                                                 const int shape[3], const double cell[9],
                                                 double mu) const {
  return guarded([&] {
    const Handles h = handles(impl_->module);
    const std::vector<double> cell_v(cell, cell + 9);
    const c10::IValue out = h.functional.get_method("global_terms")(
        {tensor_of(dos, {h.num_energies}, h.device),
         tensor_of(density, {shape[0], shape[1], shape[2]}, h.device),
         tensor_of(cell_v, {3, 3}, h.device), scalar(mu, h.device)});
    if (!out.isTuple() || out.toTupleRef().elements().size() != 3)
      throw std::runtime_error(
          "functional.global_terms does not return (terms, phi, dPhi/dstrain): the model was "
          "exported by another mlsurrogate version; export it again with `mlsurrogate export`");
    const auto tuple = out.toTuple();
    GlobalTerms result;
    for (const auto &item : tuple->elements()[0].toGenericDict())
      result.terms.emplace_back(item.key().toStringRef(), item.value().toTensor().item<double>());
    result.phi = to_vector(tuple->elements()[1].toTensor());
    result.phi_strain = to_vector(tuple->elements()[2].toTensor());
    return result;
  });
}

namespace {

// Methods added after the first model format: a clear error for older files.
torch::jit::Method newer_method(const Handles &h, const std::string &name, const char *purpose) {
  if (!h.functional.find_method(name))
    throw std::runtime_error("the model has no functional." + name + " (" + purpose +
                             "): it was exported by an older mlsurrogate; export it again with "
                             "`mlsurrogate export`");
  return h.functional.get_method(name);
}

}  // namespace

std::vector<double> TorchModel::band_free_points(const std::vector<double> &ldos, double mu,
                                                 double voxel) const {
  return guarded([&] {
    const Handles h = handles(impl_->module);
    return to_vector(newer_method(h, "band_free_points", "per-atom energies")(
                         {rows_of(ldos, h), scalar(mu, h.device), voxel})
                         .toTensor());
  });
}

std::vector<double> TorchModel::potential_points(const std::vector<double> &density,
                                                 const int shape[3], const double cell[9]) const {
  return guarded([&] {
    const Handles h = handles(impl_->module);
    const std::vector<double> cell_v(cell, cell + 9);
    return to_vector(newer_method(h, "potential_points", "per-atom energies")(
                         {tensor_of(density, {shape[0], shape[1], shape[2]}, h.device),
                          tensor_of(cell_v, {3, 3}, h.device)})
                         .toTensor());
  });
}

double TorchModel::fermi_shift_part(const std::vector<double> &ldos, double mu,
                                    const std::vector<double> &phi_local) const {
  return guarded([&] {
    const Handles h = handles(impl_->module);
    const torch::Tensor phi =
        tensor_of(phi_local, {static_cast<int64_t>(phi_local.size())}, h.device);
    return h.functional.get_method("fermi_shift_part")({rows_of(ldos, h), scalar(mu, h.device), phi})
        .toTensor()
        .item<double>();
  });
}

std::vector<double> TorchModel::ldos_gradient(double mu, const std::vector<double> &phi_local,
                                              const std::vector<double> &dos, double fermi_shift,
                                              double voxel) const {
  return guarded([&] {
    const Handles h = handles(impl_->module);
    const torch::Tensor phi =
        tensor_of(phi_local, {static_cast<int64_t>(phi_local.size())}, h.device);
    return to_vector(h.functional.get_method("ldos_gradient")(
                                      {scalar(mu, h.device), phi,
                                       tensor_of(dos, {h.num_energies}, h.device),
                                       scalar(fermi_shift, h.device), voxel})
                         .toTensor());
  });
}

std::vector<double> TorchModel::descriptor_gradient(const double *descriptors, int npoints,
                                                    int nfeatures,
                                                    const std::vector<double> &ldos_gradient) const {
  return guarded([&] {
    const Handles h = handles(impl_->module);
    const torch::Tensor x =
        torch::from_blob(const_cast<double *>(descriptors), {npoints, nfeatures}, torch::kFloat64)
            .to(h.device, h.network_dtype);
    const torch::Tensor g = rows_of(ldos_gradient, h).to(h.network_dtype);
    return to_vector(impl_->module.get_method("descriptor_gradient")({x, g}).toTensor());
  });
}

}  // namespace mlsurrogate
