// pybind11 bindings of the C++ core (src/). Errors in arguments arrive in Python as
// ValueError (std::invalid_argument); heavy work runs without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "core_info.hpp"
#include "grid_descriptors.hpp"

namespace py = pybind11;
using mlsurrogate::BispectrumSettings;

namespace {

using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;
using IntArray = py::array_t<int, py::array::c_style | py::array::forcecast>;

struct PeriodicInput {
  mlsurrogate::Cell cell;
  mlsurrogate::GridBlock block;
  mlsurrogate::PeriodicImages images;
  std::size_t natoms = 0;
};

void require_shape(const py::array& a, std::vector<py::ssize_t> shape, const char* name) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (std::size_t k = 0; ok && k < shape.size(); ++k) ok = shape[k] < 0 || a.shape(k) == shape[k];
  if (ok) return;
  std::string got = "(";
  for (py::ssize_t k = 0; k < a.ndim(); ++k) got += (k ? ", " : "") + std::to_string(a.shape(k));
  std::string want = "(";
  for (std::size_t k = 0; k < shape.size(); ++k)
    want += (k ? ", " : "") + (shape[k] < 0 ? std::string("n") : std::to_string(shape[k]));
  throw std::invalid_argument(std::string(name) + " has shape " + got + ") but (" +
                              want.substr(1) + ") is needed");
}

PeriodicInput periodic_input(const BispectrumSettings& s, const DoubleArray& cell,
                             const DoubleArray& positions, const IntArray& types,
                             std::array<int, 3> shape, std::array<int, 3> lo,
                             std::array<int, 3> hi) {
  require_shape(cell, {3, 3}, "cell");
  require_shape(positions, {-1, 3}, "positions");
  require_shape(types, {positions.shape(0)}, "types");
  PeriodicInput in;
  std::copy(cell.data(), cell.data() + 9, in.cell.h.begin());
  in.block = {shape, lo, hi};
  in.block.validate();
  in.natoms = static_cast<std::size_t>(positions.shape(0));
  for (std::size_t i = 0; i < in.natoms; ++i)
    if (types.data()[i] < 0 || types.data()[i] >= s.num_types())
      throw std::invalid_argument("atom " + std::to_string(i) + " has type index " +
                                  std::to_string(types.data()[i]) + " outside [0, " +
                                  std::to_string(s.num_types()) + ")");
  const mlsurrogate::AtomsView atoms{positions.data(), types.data(), in.natoms};
  in.images = mlsurrogate::periodic_images(in.cell, atoms, s.max_cutoff());
  return in;
}

// Per-image rows (width values each) summed onto the original atoms: out (natoms x width)
void fold_images(const PeriodicInput& in, const std::vector<double>& per_image, int width,
                 double* out) {
  std::fill(out, out + width * in.natoms, 0.0);
  for (std::size_t i = 0; i < in.images.owner.size(); ++i)
    for (int k = 0; k < width; ++k) out[width * in.images.owner[i] + k] += per_image[width * i + k];
}

py::array_t<double> grid_descriptors(const BispectrumSettings& s, const DoubleArray& cell,
                                     const DoubleArray& positions, const IntArray& types,
                                     std::array<int, 3> shape, std::array<int, 3> lo,
                                     std::array<int, 3> hi, int threads) {
  const mlsurrogate::GridDescriptors calc(s, threads);
  PeriodicInput in = periodic_input(s, cell, positions, types, shape, lo, hi);
  py::array_t<double> out({static_cast<py::ssize_t>(hi[0] - lo[0]),
                           static_cast<py::ssize_t>(hi[1] - lo[1]),
                           static_cast<py::ssize_t>(hi[2] - lo[2]),
                           static_cast<py::ssize_t>(calc.num_descriptors())});
  double* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    calc.compute(in.cell, in.block, in.images.view(), dst);
  }
  return out;
}

std::pair<py::array_t<double>, py::array_t<double>> grid_descriptor_gradient(
    const BispectrumSettings& s, const DoubleArray& cell, const DoubleArray& positions,
    const IntArray& types, std::array<int, 3> shape, std::array<int, 3> lo,
    std::array<int, 3> hi, const DoubleArray& beta, int threads) {
  const mlsurrogate::GridDescriptors calc(s, threads);
  PeriodicInput in = periodic_input(s, cell, positions, types, shape, lo, hi);
  require_shape(beta, {hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2], calc.num_descriptors()},
                "beta");
  std::vector<double> image_grad(3 * in.images.type.size());
  py::array_t<double> grad({static_cast<py::ssize_t>(in.natoms), py::ssize_t{3}});
  py::array_t<double> strain({py::ssize_t{3}, py::ssize_t{3}});
  double* g = grad.mutable_data();
  double* e = strain.mutable_data();
  const double* b = beta.data();
  {
    py::gil_scoped_release release;
    calc.gradient(in.cell, in.block, in.images.view(), b, image_grad.data(), e);
    fold_images(in, image_grad, 3, g);
  }
  return {grad, strain};
}

std::pair<py::array_t<double>, py::array_t<double>> grid_partition(
    const BispectrumSettings& s, const DoubleArray& cell, const DoubleArray& positions,
    const IntArray& types, std::array<int, 3> shape, std::array<int, 3> lo,
    std::array<int, 3> hi, const DoubleArray& values) {
  const mlsurrogate::GridDescriptors calc(s, 1);
  PeriodicInput in = periodic_input(s, cell, positions, types, shape, lo, hi);
  require_shape(values, {hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2], -1}, "values");
  const int width = static_cast<int>(values.shape(3));
  std::vector<double> image_share(width * in.images.type.size(), 0.0);
  py::array_t<double> share({static_cast<py::ssize_t>(in.natoms), py::ssize_t{width}});
  py::array_t<double> unclaimed(width);
  double* out = share.mutable_data();
  const double* v = values.data();
  {
    py::gil_scoped_release release;
    const std::vector<double> rest =
        calc.partition(in.cell, in.block, in.images.view(), v, width, image_share.data());
    fold_images(in, image_share, width, out);
    std::copy(rest.begin(), rest.end(), unclaimed.mutable_data());
  }
  return {share, unclaimed};
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "Bindings of the mlsurrogate C++ core";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const std::invalid_argument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
  m.def("core_version", &mlsurrogate::core_version,
        "Version string of the compiled C++ core library");

  py::class_<BispectrumSettings>(m, "BispectrumSettings",
                                 "Keywords of LAMMPS compute sna/grid, per-type lists 0-based")
      .def(py::init<>())
      .def_readwrite("rcutfac", &BispectrumSettings::rcutfac)
      .def_readwrite("rfac0", &BispectrumSettings::rfac0)
      .def_readwrite("twojmax", &BispectrumSettings::twojmax)
      .def_readwrite("radius", &BispectrumSettings::radius)
      .def_readwrite("weight", &BispectrumSettings::weight)
      .def_readwrite("rmin0", &BispectrumSettings::rmin0)
      .def_readwrite("switchflag", &BispectrumSettings::switchflag)
      .def_readwrite("bzeroflag", &BispectrumSettings::bzeroflag)
      .def_readwrite("quadraticflag", &BispectrumSettings::quadraticflag)
      .def_readwrite("bnormflag", &BispectrumSettings::bnormflag)
      .def_readwrite("wselfallflag", &BispectrumSettings::wselfallflag)
      .def_readwrite("chem_map", &BispectrumSettings::chem_map)
      .def("validate", &BispectrumSettings::validate)
      .def("num_descriptors",
           [](const BispectrumSettings& s) { return mlsurrogate::Bispectrum(s).num_descriptors(); });

  m.def("grid_descriptors", &grid_descriptors, py::arg("settings"), py::arg("cell"),
        py::arg("positions"), py::arg("types"), py::arg("shape"), py::arg("lo"), py::arg("hi"),
        py::arg("threads"),
        "Descriptors of grid points lo <= i < hi of a periodic cell, shape (bx, by, bz, K).");
  m.def("grid_descriptor_gradient", &grid_descriptor_gradient, py::arg("settings"),
        py::arg("cell"), py::arg("positions"), py::arg("types"), py::arg("shape"), py::arg("lo"),
        py::arg("hi"), py::arg("beta"), py::arg("threads"),
        "dE/dR (natoms, 3) and dE/dstrain (3, 3) of E = sum(beta * B) over the block.");
  m.def("grid_partition", &grid_partition, py::arg("settings"), py::arg("cell"),
        py::arg("positions"), py::arg("types"), py::arg("shape"), py::arg("lo"), py::arg("hi"),
        py::arg("values"),
        "Becke-cell shares (natoms, width) of per-point values (bx, by, bz, width) and the "
        "sums (width,) of points with no atom within the cutoff.");
  m.def("grid_points_for_spacing", &mlsurrogate::grid_points_for_spacing, py::arg("length"),
        py::arg("spacing"),
        "Grid points along a cell vector of this length for a target spacing: "
        "max(1, floor(length / spacing + 0.5)), the pair style's rule.");
  m.def("owned_grid_range", &mlsurrogate::owned_grid_range, py::arg("n"), py::arg("frac_lo"),
        py::arg("frac_hi"),
        "Half-open range of grid indices a subdomain [frac_lo, frac_hi) owns (compute "
        "grid/local rule).");
}
