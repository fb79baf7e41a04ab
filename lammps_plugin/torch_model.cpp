#include "torch_model.h"

#include <torch/cuda.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/script.h>
#include <ATen/Parallel.h>
#include <caffe2/serialize/inline_container.h>

#include <algorithm>
#include <stdexcept>

namespace mlsurrogate {

namespace {

const char *const kExportAgain = "export the model again with `mlsurrogate export`";

// torch's message without its C++ backtrace and without the TorchScript traceback that
// precedes the reason of a scripted `raise` (the user needs the reason, not the frames).
std::string user_message(const std::exception &e) {
  const auto *c10_error = dynamic_cast<const c10::Error *>(&e);
  const std::string text = c10_error ? c10_error->what_without_backtrace() : e.what();
  if (text.find("Traceback of TorchScript") == std::string::npos) return text;
  // the reason follows the last line that starts in column 0 with "<ExceptionType>: "
  std::size_t line_end = text.size();
  while (line_end > 0) {
    const std::size_t newline = text.rfind('\n', line_end - 1);
    const std::size_t begin = newline == std::string::npos ? 0 : newline + 1;
    const std::string line = text.substr(begin, line_end - begin);
    const std::size_t colon = line.find(": ");
    if (!line.empty() && line[0] != ' ' && colon != std::string::npos &&
        line.find(' ') > colon) {
      std::string reason = text.substr(begin + colon + 2);
      while (!reason.empty() && (reason.back() == '\n' || reason.back() == ' ')) reason.pop_back();
      return reason;
    }
    if (newline == std::string::npos) break;
    line_end = newline;
  }
  return text;
}

// Runs `fn`, turning torch's exceptions (a scripted `raise ValueError` included) into
// std::runtime_error carrying only the reason.
template <class Fn>
auto guarded(Fn &&fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const std::exception &e) {
    throw std::runtime_error(user_message(e));
  }
}

// A training checkpoint (torch.save) and a TorchScript archive are both zip files; only
// the second holds code/. Anything else is not a model at all.
void check_archive(const std::string &path) {
  std::vector<std::string> records;
  try {
    caffe2::serialize::PyTorchStreamReader reader(path);
    records = reader.getAllRecords();
  } catch (const std::exception &) {
    throw std::runtime_error("model '" + path +
                             "' is not a TorchScript model (not a zip archive); give the file "
                             "written by `mlsurrogate export`");
  }
  const bool has_code = std::any_of(records.begin(), records.end(), [](const std::string &r) {
    return r.rfind("code/", 0) == 0;
  });
  if (has_code) return;
  if (std::find(records.begin(), records.end(), "data.pkl") != records.end())
    throw std::runtime_error("model '" + path +
                             "' is a training checkpoint, not an exported model: run "
                             "`mlsurrogate export " + path +
                             " -o model.pt` and give the exported file");
  throw std::runtime_error("model '" + path +
                           "' is not a TorchScript model (a zip archive without TorchScript "
                           "code); give the file written by `mlsurrogate export`");
}

// Typed attributes of the exported module; a missing one is an older export.
class AttributeReader {
 public:
  AttributeReader(const torch::jit::Module &module, const std::string &path)
      : module_(module), path_(path) {}

  c10::IValue get(const std::string &name) const {
    if (!module_.hasattr(name))
      throw std::runtime_error("model '" + path_ + "' has no '" + name +
                               "': it was exported by an older mlsurrogate; " + kExportAgain);
    return module_.attr(name);
  }
  double number(const std::string &name) const {
    const c10::IValue v = get(name);
    if (v.isDouble()) return v.toDouble();
    if (v.isInt()) return static_cast<double>(v.toInt());
    throw wrong_type(name, "a number");
  }
  int integer(const std::string &name) const {
    const c10::IValue v = get(name);
    if (!v.isInt()) throw wrong_type(name, "an integer");
    return static_cast<int>(v.toInt());
  }
  bool boolean(const std::string &name) const {
    const c10::IValue v = get(name);
    if (!v.isBool()) throw wrong_type(name, "a bool");
    return v.toBool();
  }
  std::string string(const std::string &name) const {
    const c10::IValue v = get(name);
    if (!v.isString()) throw wrong_type(name, "a string");
    return v.toStringRef();
  }
  std::vector<std::string> strings(const std::string &name) const {
    const c10::IValue v = get(name);
    std::vector<std::string> out;
    if (!v.isList()) throw wrong_type(name, "a list of strings");
    for (const c10::IValue &item : v.toListRef()) {
      if (!item.isString()) throw wrong_type(name, "a list of strings");
      out.push_back(item.toStringRef());
    }
    return out;
  }
  // A per-element list of numbers: one value for each of `count` elements.
  std::vector<double> numbers(const std::string &name, std::size_t count) const {
    const c10::IValue v = get(name);
    std::vector<double> out;
    if (!v.isList()) throw wrong_type(name, "a list of numbers");
    for (const c10::IValue &item : v.toListRef()) {
      if (item.isDouble())
        out.push_back(item.toDouble());
      else if (item.isInt())
        out.push_back(static_cast<double>(item.toInt()));
      else
        throw wrong_type(name, "a list of numbers");
    }
    if (out.size() != count)
      throw std::runtime_error("model '" + path_ + "': '" + name + "' has " +
                               std::to_string(out.size()) + " values for " +
                               std::to_string(count) + " elements; " + kExportAgain);
    return out;
  }

 private:
  std::runtime_error wrong_type(const std::string &name, const char *expected) const {
    return std::runtime_error("model '" + path_ + "': attribute '" + name + "' is not " +
                              expected + "; " + kExportAgain);
  }
  const torch::jit::Module &module_;
  const std::string &path_;
};

const char *const kFunctionalMethods[] = {"dos",          "fermi_level",      "density",
                                          "global_terms", "band_free_points", "potential_points",
                                          "fermi_shift_part", "ldos_gradient"};

}  // namespace

int ModelContract::element_index(const std::string &element) const {
  const auto found = std::find(elements.begin(), elements.end(), element);
  return found == elements.end() ? -1 : static_cast<int>(found - elements.begin());
}

struct TorchModel::Impl {
  torch::jit::Module module;
  torch::jit::Module network;
  torch::jit::Module functional;
  std::vector<torch::jit::Module> members;  // an ensemble's networks, in export order
  torch::Device device{torch::kCPU};
  torch::Dtype network_dtype = torch::kFloat64;
  int64_t num_energies = 0;

  // LDOS rows of the network `choice` (the model's forward is its network's). A
  // jit::Module is a shared handle; forward needs a non-const one, hence the copies.
  torch::Tensor forward(const NetworkChoice &choice, const torch::Tensor &x) const {
    switch (choice.kind) {
      case NetworkChoice::Kind::kMember: {
        if (choice.index < 0 || choice.index >= static_cast<int>(members.size()))
          throw std::runtime_error("the model has no ensemble member " +
                                   std::to_string(choice.index));
        torch::jit::Module member = members[choice.index];
        return member.forward({x}).toTensor();
      }
      case NetworkChoice::Kind::kSampled:
        return network
            .get_method("forward_sampled")({x, static_cast<int64_t>(choice.seed),
                                            static_cast<int64_t>(choice.index)})
            .toTensor();
      case NetworkChoice::Kind::kWhole:
        break;
    }
    torch::jit::Module whole = module;
    return whole.forward({x}).toTensor();
  }
};

namespace {

// The contract of `module`: format and version first (they say whether the rest is
// there), then every attribute, the submodules and the methods the pair style calls.
ModelContract read_contract(const torch::jit::Module &module, const std::string &path) {
  const AttributeReader attr(module, path);
  if (!module.hasattr("format"))
    throw std::runtime_error("model '" + path +
                             "' has no 'format': it is not an mlsurrogate model, or it was "
                             "exported by an older mlsurrogate; " + kExportAgain);
  const std::string format = attr.string("format");
  if (format != kModelFormat)
    throw std::runtime_error("model '" + path + "' has format '" + format + "', not '" +
                             kModelFormat + "': it is not an mlsurrogate model");
  const int version = attr.integer("format_version");
  if (version != kModelFormatVersion)
    throw std::runtime_error("model '" + path + "' has format version " +
                             std::to_string(version) + ", this build reads " +
                             std::to_string(kModelFormatVersion) +
                             ": export it again with this build's `mlsurrogate export`");

  ModelContract c;
  c.elements = attr.strings("elements");
  if (c.elements.empty())
    throw std::runtime_error("model '" + path + "' lists no elements; " + kExportAgain);
  const std::size_t n = c.elements.size();
  c.valence_charges = attr.numbers("valence_charges", n);
  c.masses = attr.numbers("masses", n);
  c.grid_spacing = attr.number("grid_spacing");
  c.cutoff = attr.number("cutoff");
  if (!(c.grid_spacing > 0.0) || !(c.cutoff > 0.0))
    throw std::runtime_error("model '" + path + "' has grid_spacing " +
                             std::to_string(c.grid_spacing) + " and cutoff " +
                             std::to_string(c.cutoff) + " A; both must be positive");
  BispectrumSettings &s = c.descriptors;
  s.rcutfac = attr.number("rcutfac");
  s.rfac0 = attr.number("rfac0");
  s.twojmax = attr.integer("twojmax");
  s.radius = attr.numbers("radius", n);
  s.weight = attr.numbers("weight", n);
  s.rmin0 = attr.number("rmin0");
  s.switchflag = attr.boolean("switchflag");
  s.bzeroflag = attr.boolean("bzeroflag");
  s.quadraticflag = attr.boolean("quadraticflag");
  s.bnormflag = attr.boolean("bnormflag");
  s.wselfallflag = attr.boolean("wselfallflag");
  if (attr.boolean("chemflag"))
    for (std::size_t e = 0; e < n; ++e) s.chem_map.push_back(static_cast<int>(e));
  try {
    s.validate();
  } catch (const std::exception &e) {
    throw std::runtime_error("model '" + path + "': descriptor settings: " + e.what());
  }
  c.dropout_probability = attr.number("dropout_probability");
  if (!(c.dropout_probability >= 0.0 && c.dropout_probability < 1.0))
    throw std::runtime_error("model '" + path + "' has dropout_probability " +
                             std::to_string(c.dropout_probability) + ", not in [0, 1); " +
                             kExportAgain);
  c.metadata_json = attr.string("metadata_json");
  return c;
}

}  // namespace

TorchModel::TorchModel(const std::string &path, const std::string &device)
    : impl_(std::make_unique<Impl>()), path_(path) {
  check_archive(path);
  guarded([&] {
    impl_->module = torch::jit::load(path, torch::Device(device));
    impl_->module.eval();
  });
  contract_ = read_contract(impl_->module, path);
  guarded([&] {
    for (const char *name : {"network", "functional"})
      if (!impl_->module.hasattr(name) || !impl_->module.attr(name).isModule())
        throw std::runtime_error("model '" + path + "' has no '" + name +
                                 "' submodule: it is not an mlsurrogate model; " + kExportAgain);
    impl_->functional = impl_->module.attr("functional").toModule();
    for (const char *name : kFunctionalMethods)
      if (!impl_->functional.find_method(name))
        throw std::runtime_error("model '" + path + "' has no functional." + name + "; " +
                                 kExportAgain);
    if (!impl_->module.find_method("descriptor_gradient"))
      throw std::runtime_error("model '" + path + "' has no descriptor_gradient; " +
                               kExportAgain);
    const torch::Tensor energies = impl_->functional.attr("energies").toTensor();
    impl_->device = energies.device();
    impl_->num_energies = energies.numel();
    // a single network or an ensemble of them: the dtype of its (first) weights
    impl_->network = impl_->module.attr("network").toModule();
    const torch::jit::Module &network = impl_->network;
    const auto weights = network.parameters();
    if (weights.size() == 0)
      throw std::runtime_error("model '" + path + "': the network has no weights");
    impl_->network_dtype = (*weights.begin()).scalar_type();
    if (network.hasattr("members") && network.attr("members").isModule())
      for (const torch::jit::Module &member : network.attr("members").toModule().children())
        impl_->members.push_back(member);
    if (contract_.dropout_probability > 0.0 && !network.find_method("forward_sampled"))
      throw std::runtime_error("model '" + path +
                               "' has dropout but its network no forward_sampled; " +
                               kExportAgain);
    if (impl_->network_dtype != torch::kFloat64 && impl_->network_dtype != torch::kFloat32)
      throw std::runtime_error("model '" + path + "': the network's weights are " +
                               std::string(c10::toString(impl_->network_dtype)) +
                               ", not float64 or float32");
  });
  contract_.num_energies = static_cast<int>(impl_->num_energies);
  contract_.network_dtype = impl_->network_dtype == torch::kFloat64 ? "float64" : "float32";
}

TorchModel::~TorchModel() = default;

int TorchModel::ensemble_size() const {
  return impl_->members.empty() ? 1 : static_cast<int>(impl_->members.size());
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

namespace {

std::vector<double> to_vector(const torch::Tensor &t) {
  const torch::Tensor host = t.detach().to(torch::kCPU, torch::kFloat64).contiguous();
  return std::vector<double>(host.data_ptr<double>(), host.data_ptr<double>() + host.numel());
}

torch::Tensor tensor_of(const std::vector<double> &v, std::vector<int64_t> shape,
                        const torch::Device &device) {
  return torch::from_blob(const_cast<double *>(v.data()), shape, torch::kFloat64)
      .to(device)
      .clone();
}

torch::Tensor scalar(double value, const torch::Device &device) {
  return torch::tensor(value, torch::dtype(torch::kFloat64).device(device));
}

}  // namespace

std::vector<double> TorchModel::predict_ldos(const double *descriptors, int npoints,
                                             int nfeatures, const NetworkChoice &network) const {
  return guarded([&] {
    torch::NoGradGuard no_grad;
    const torch::Tensor x =
        torch::from_blob(const_cast<double *>(descriptors), {npoints, nfeatures}, torch::kFloat64)
            .to(impl_->device, impl_->network_dtype);
    return to_vector(impl_->forward(network, x));
  });
}

namespace {

torch::Tensor rows_of(const std::vector<double> &ldos, int64_t num_energies,
                      const torch::Device &device) {
  const int64_t n = static_cast<int64_t>(ldos.size()) / num_energies;
  return tensor_of(ldos, {n, num_energies}, device);
}

}  // namespace

std::vector<double> TorchModel::dos(const std::vector<double> &ldos, double voxel) const {
  return guarded([&] {
    const Impl &m = *impl_;
    return to_vector(m.functional.get_method("dos")({rows_of(ldos, m.num_energies, m.device), voxel})
                         .toTensor());
  });
}

double TorchModel::fermi_level(const std::vector<double> &dos, double n_electrons) const {
  return guarded([&] {
    const Impl &m = *impl_;
    const torch::Tensor d = tensor_of(dos, {m.num_energies}, m.device);
    return m.functional.get_method("fermi_level")({d, n_electrons}).toTensor().item<double>();
  });
}

std::vector<double> TorchModel::density(const std::vector<double> &ldos, double mu) const {
  return guarded([&] {
    const Impl &m = *impl_;
    return to_vector(m.functional.get_method("density")(
                                     {rows_of(ldos, m.num_energies, m.device), scalar(mu, m.device)})
                         .toTensor());
  });
}

TorchModel::GlobalTerms TorchModel::global_terms(const std::vector<double> &dos,
                                                 const std::vector<double> &density,
                                                 const int shape[3], const double cell[9],
                                                 double mu) const {
  return guarded([&] {
    const Impl &m = *impl_;
    const std::vector<double> cell_v(cell, cell + 9);
    const c10::IValue out = m.functional.get_method("global_terms")(
        {tensor_of(dos, {m.num_energies}, m.device),
         tensor_of(density, {shape[0], shape[1], shape[2]}, m.device),
         tensor_of(cell_v, {3, 3}, m.device), scalar(mu, m.device)});
    if (!out.isTuple() || out.toTupleRef().elements().size() != 3)
      throw std::runtime_error("model '" + path_ +
                               "': functional.global_terms does not return (terms, phi, "
                               "dPhi/dstrain); " + kExportAgain);
    const auto tuple = out.toTuple();
    GlobalTerms result;
    for (const auto &item : tuple->elements()[0].toGenericDict())
      result.terms.emplace_back(item.key().toStringRef(), item.value().toTensor().item<double>());
    result.phi = to_vector(tuple->elements()[1].toTensor());
    result.phi_strain = to_vector(tuple->elements()[2].toTensor());
    return result;
  });
}

std::vector<double> TorchModel::band_free_points(const std::vector<double> &ldos, double mu,
                                                 double voxel) const {
  return guarded([&] {
    const Impl &m = *impl_;
    return to_vector(m.functional.get_method("band_free_points")(
                                     {rows_of(ldos, m.num_energies, m.device), scalar(mu, m.device),
                                      voxel})
                         .toTensor());
  });
}

std::vector<double> TorchModel::potential_points(const std::vector<double> &density,
                                                 const int shape[3], const double cell[9]) const {
  return guarded([&] {
    const Impl &m = *impl_;
    const std::vector<double> cell_v(cell, cell + 9);
    return to_vector(m.functional.get_method("potential_points")(
                                     {tensor_of(density, {shape[0], shape[1], shape[2]}, m.device),
                                      tensor_of(cell_v, {3, 3}, m.device)})
                         .toTensor());
  });
}

double TorchModel::fermi_shift_part(const std::vector<double> &ldos, double mu,
                                    const std::vector<double> &phi_local) const {
  return guarded([&] {
    const Impl &m = *impl_;
    const torch::Tensor phi =
        tensor_of(phi_local, {static_cast<int64_t>(phi_local.size())}, m.device);
    return m.functional
        .get_method("fermi_shift_part")(
            {rows_of(ldos, m.num_energies, m.device), scalar(mu, m.device), phi})
        .toTensor()
        .item<double>();
  });
}

std::vector<double> TorchModel::ldos_gradient(double mu, const std::vector<double> &phi_local,
                                              const std::vector<double> &dos, double fermi_shift,
                                              double voxel) const {
  return guarded([&] {
    const Impl &m = *impl_;
    const torch::Tensor phi =
        tensor_of(phi_local, {static_cast<int64_t>(phi_local.size())}, m.device);
    return to_vector(m.functional.get_method("ldos_gradient")(
                                     {scalar(mu, m.device), phi,
                                      tensor_of(dos, {m.num_energies}, m.device),
                                      scalar(fermi_shift, m.device), voxel})
                         .toTensor());
  });
}

std::vector<double> TorchModel::descriptor_gradient(const double *descriptors, int npoints,
                                                    int nfeatures,
                                                    const std::vector<double> &ldos_gradient,
                                                    const NetworkChoice &network) const {
  return guarded([&] {
    const Impl &m = *impl_;
    const torch::Tensor x =
        torch::from_blob(const_cast<double *>(descriptors), {npoints, nfeatures}, torch::kFloat64)
            .to(m.device, m.network_dtype);
    const torch::Tensor g = rows_of(ldos_gradient, m.num_energies, m.device).to(m.network_dtype);
    if (network.kind == NetworkChoice::Kind::kWhole)
      return to_vector(m.module.get_method("descriptor_gradient")({x, g}).toTensor());
    // one member or sampled network: the same back-propagation as the exported
    // descriptor_gradient, through that network's forward pass alone
    torch::AutoGradMode enable_grad(true);
    const torch::Tensor inputs = x.detach().clone().requires_grad_(true);
    const torch::Tensor ldos = m.forward(network, inputs);
    return to_vector(torch::autograd::grad({ldos}, {inputs}, {g})[0]);
  });
}

}  // namespace mlsurrogate
