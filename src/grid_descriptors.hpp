// Bispectrum descriptors with the points of a real-space grid as centres, and the
// adjoint force contraction, over a block of a periodic cell's grid. Used by the Python
// package (through pybind11) and by the LAMMPS pair style (one block per MPI rank).
#pragma once

#include <array>
#include <cstddef>
#include <optional>
#include <utility>
#include <vector>

#include "bispectrum.hpp"

namespace mlsurrogate {

// Cell whose rows are the lattice vectors a, b, c (Angstrom). A grid point of
// fractional coordinates f sits at f0 a + f1 b + f2 c.
struct Cell {
  std::array<double, 9> h{};
  double volume() const;  // signed
  void to_cartesian(const double f[3], double x[3]) const;
};

// Points lo <= i < hi (per dimension) of a global shape[0] x shape[1] x shape[2] grid.
struct GridBlock {
  std::array<int, 3> shape{};
  std::array<int, 3> lo{};
  std::array<int, 3> hi{};
  std::size_t num_points() const;
  void validate() const;  // throws std::invalid_argument
};

// Cartesian positions (n x 3, row-major) and 0-based types of every atom that may be a
// neighbour of a grid point: periodic images or LAMMPS ghosts included.
struct AtomsView {
  const double* pos = nullptr;
  const int* type = nullptr;
  std::size_t n = 0;
};

// Images of the atoms of a periodic cell within `cutoff` of the cell; owner[i] is the
// index of the original atom of image i.
struct PeriodicImages {
  std::vector<double> pos;
  std::vector<int> type;
  std::vector<std::size_t> owner;
  AtomsView view() const { return {pos.data(), type.data(), type.size()}; }
};
PeriodicImages periodic_images(const Cell& cell, AtomsView atoms, double cutoff);

// Grid points [lo, hi) of one dimension owned by a subdomain spanning fractions
// [frac_lo, frac_hi) of the box: the rule of LAMMPS compute grid/local (points on the
// lower boundary belong to the subdomain, points on the upper one do not).
std::pair<int, int> owned_grid_range(int n, double frac_lo, double frac_hi);

// Grid points along a cell vector of `length` for a target `spacing` (same units): the
// nearest integer to length / spacing with halves rounded up, at least 1. The one rule
// of the pair style's `spacing` keyword and mlsurrogate.descriptors.grid_for_spacing.
int grid_points_for_spacing(double length, double spacing);

// Index of the first atom i < num_checked with a non-finite coordinate, if any.
std::optional<std::size_t> find_non_finite_atom(AtomsView atoms, std::size_t num_checked);

// The first pair (i, j) of distinct atoms closer than `tolerance` with i < num_checked
// (the lowest such i), if any, found with a cell list in O(n). Positions must be finite.
std::optional<std::pair<std::size_t, std::size_t>> find_coincident_atoms(AtomsView atoms,
                                                                         std::size_t num_checked,
                                                                         double tolerance);

class GridDescriptors {
 public:
  GridDescriptors(const BispectrumSettings& settings, int num_threads);

  int num_descriptors() const { return sna_.num_descriptors(); }

  // out[p * K + k], p running over the block with the last index fastest.
  void compute(const Cell& cell, const GridBlock& block, AtomsView atoms, double* out) const;

  // For E = sum_p sum_k beta[p * K + k] B_k(p): dE/dR of every atom (n x 3) and
  // dE/d(strain) (3 x 3, row-major) for a homogeneous deformation x -> (1 + eps) x that
  // moves grid points and atoms together. Both are overwritten. dE/d(strain) is a sum of
  // (point, atom) pair terms; if given, strain_per_atom (n x 9) and strain_per_point
  // (points x 9) receive each atom's and each point's sum of them (for per-atom virials).
  void gradient(const Cell& cell, const GridBlock& block, AtomsView atoms, const double* beta,
                double* dE_dR, double* dE_dstrain, double* strain_per_atom = nullptr,
                double* strain_per_point = nullptr) const;

  // Shares values[p * width + k] of every point of the block among the atoms within the
  // cutoff by Becke's fuzzy Voronoi cells (A. D. Becke, J. Chem. Phys. 88, 2547 (1988),
  // eqs. 11-21: smooth, parameter-free, weight 1 at an atom's own position) and adds them
  // to out[i * width + k] (n x width). Returns the sums over points with no atom within
  // the cutoff, which nothing here can claim.
  std::vector<double> partition(const Cell& cell, const GridBlock& block, AtomsView atoms,
                                const double* values, int width, double* out) const;

 private:
  template <class BatchFn>
  void for_each_batch(const Cell& cell, const GridBlock& block, AtomsView atoms,
                      BatchFn&& fn) const;
  int num_threads_for(std::size_t npoints) const;

  Bispectrum sna_;
  int threads_;
};

}  // namespace mlsurrogate
