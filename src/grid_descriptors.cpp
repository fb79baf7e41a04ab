#include "grid_descriptors.hpp"

#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>

namespace mlsurrogate {

namespace {

// compute sna/grid skips neighbours that sit on the grid point itself
constexpr double kCoincidentSq = 1e-20;
constexpr int kMaxBinsPerDim = 128;

struct Neighbor {
  std::size_t atom;
  double d[3];  // x_point - x_atom
};
using NeighborLists = std::array<std::vector<Neighbor>, kLanes>;

// Cartesian bins of width >= cutoff/2 over the atoms' bounding box; every atom within
// `cutoff` of a point lies within two bins of the point's bin in each direction.
class CellList {
 public:
  CellList(AtomsView atoms, double cutoff) : atoms_(atoms) {
    for (int k = 0; k < 3; ++k) {
      lo_[k] = atoms.n ? atoms.pos[k] : 0.0;
      double hi = lo_[k];
      for (std::size_t i = 0; i < atoms.n; ++i) {
        lo_[k] = std::min(lo_[k], atoms.pos[3 * i + k]);
        hi = std::max(hi, atoms.pos[3 * i + k]);
      }
      const double extent = hi - lo_[k];
      nbin_[k] = static_cast<int>(std::clamp(std::floor(extent / (0.5 * cutoff)), 1.0,
                                             static_cast<double>(kMaxBinsPerDim)));
      inv_width_[k] = extent > 0.0 ? nbin_[k] / extent : 0.0;
    }
    const std::size_t nb = static_cast<std::size_t>(nbin_[0]) * nbin_[1] * nbin_[2];
    start_.assign(nb + 1, 0);
    std::vector<std::size_t> bin_of(atoms.n);
    for (std::size_t i = 0; i < atoms.n; ++i) {
      int b[3];
      for (int k = 0; k < 3; ++k)
        b[k] = std::min(nbin_[k] - 1, static_cast<int>((atoms.pos[3 * i + k] - lo_[k]) * inv_width_[k]));
      bin_of[i] = flat(b[0], b[1], b[2]);
      ++start_[bin_of[i] + 1];
    }
    for (std::size_t b = 0; b < nb; ++b) start_[b + 1] += start_[b];
    atom_.resize(atoms.n);
    std::vector<std::size_t> fill(start_.begin(), start_.end() - 1);
    for (std::size_t i = 0; i < atoms.n; ++i) atom_[fill[bin_of[i]]++] = i;
  }

  template <class Fn>
  void for_each_candidate(const double p[3], Fn&& fn) const {
    int lo[3], hi[3];
    for (int k = 0; k < 3; ++k) {
      const double t = std::floor((p[k] - lo_[k]) * inv_width_[k]);
      // clamp in double first: a point far outside must not overflow the int conversion
      const int c = static_cast<int>(std::clamp(t, -4.0, nbin_[k] + 4.0));
      lo[k] = std::max(0, c - 2);
      hi[k] = std::min(nbin_[k] - 1, c + 2);
    }
    for (int bx = lo[0]; bx <= hi[0]; ++bx)
      for (int by = lo[1]; by <= hi[1]; ++by)
        for (int bz = lo[2]; bz <= hi[2]; ++bz) {
          const std::size_t b = flat(bx, by, bz);
          for (std::size_t i = start_[b]; i < start_[b + 1]; ++i) fn(atom_[i]);
        }
  }

 private:
  std::size_t flat(int bx, int by, int bz) const {
    return (static_cast<std::size_t>(bx) * nbin_[1] + by) * nbin_[2] + bz;
  }
  AtomsView atoms_;
  double lo_[3]{}, inv_width_[3]{};
  int nbin_[3]{};
  std::vector<std::size_t> start_, atom_;
};

void invert3(const std::array<double, 9>& m, double inv[9]) {
  const double det = m[0] * (m[4] * m[8] - m[5] * m[7]) - m[1] * (m[3] * m[8] - m[5] * m[6]) +
                     m[2] * (m[3] * m[7] - m[4] * m[6]);
  inv[0] = (m[4] * m[8] - m[5] * m[7]) / det;
  inv[1] = (m[2] * m[7] - m[1] * m[8]) / det;
  inv[2] = (m[1] * m[5] - m[2] * m[4]) / det;
  inv[3] = (m[5] * m[6] - m[3] * m[8]) / det;
  inv[4] = (m[0] * m[8] - m[2] * m[6]) / det;
  inv[5] = (m[2] * m[3] - m[0] * m[5]) / det;
  inv[6] = (m[3] * m[7] - m[4] * m[6]) / det;
  inv[7] = (m[1] * m[6] - m[0] * m[7]) / det;
  inv[8] = (m[0] * m[4] - m[1] * m[3]) / det;
}

void check_cell(const Cell& cell) {
  const double v = cell.volume();
  double scale = 0.0;
  for (double x : cell.h) scale = std::max(scale, std::fabs(x));
  if (!std::isfinite(v) || std::fabs(v) <= 1e-10 * scale * scale * scale || scale == 0.0)
    throw std::invalid_argument("cell has zero volume (lattice vectors are linearly dependent)");
}

// Cartesian position of the p-th point of the block (last index fastest)
void point_position(const Cell& cell, const GridBlock& block, std::size_t p, double x[3]) {
  const std::size_t ny = block.hi[1] - block.lo[1];
  const std::size_t nz = block.hi[2] - block.lo[2];
  const double f[3] = {static_cast<double>(block.lo[0] + p / (ny * nz)) / block.shape[0],
                       static_cast<double>(block.lo[1] + (p / nz) % ny) / block.shape[1],
                       static_cast<double>(block.lo[2] + p % nz) / block.shape[2]};
  cell.to_cartesian(f, x);
}

// Becke's cell function s(mu) = (1 - p(p(p(mu)))) / 2, p(mu) = 3 mu / 2 - mu^3 / 2
double becke_step(double mu) {
  for (int k = 0; k < 3; ++k) mu = 1.5 * mu - 0.5 * mu * mu * mu;
  return 0.5 * (1.0 - mu);
}

}  // namespace

double Cell::volume() const {
  return h[0] * (h[4] * h[8] - h[5] * h[7]) - h[1] * (h[3] * h[8] - h[5] * h[6]) +
         h[2] * (h[3] * h[7] - h[4] * h[6]);
}

void Cell::to_cartesian(const double f[3], double x[3]) const {
  for (int k = 0; k < 3; ++k) x[k] = f[0] * h[k] + f[1] * h[3 + k] + f[2] * h[6 + k];
}

std::size_t GridBlock::num_points() const {
  std::size_t n = 1;
  for (int k = 0; k < 3; ++k) n *= static_cast<std::size_t>(std::max(0, hi[k] - lo[k]));
  return n;
}

void GridBlock::validate() const {
  static const char* axis = "xyz";
  for (int k = 0; k < 3; ++k) {
    if (shape[k] <= 0)
      throw std::invalid_argument(std::string("grid size along ") + axis[k] +
                                  " must be positive, got " + std::to_string(shape[k]));
    if (lo[k] < 0 || hi[k] > shape[k] || lo[k] > hi[k])
      throw std::invalid_argument(std::string("grid index range along ") + axis[k] + " [" +
                                  std::to_string(lo[k]) + ", " + std::to_string(hi[k]) +
                                  ") does not lie in [0, " + std::to_string(shape[k]) + "]");
  }
}

std::optional<std::size_t> find_non_finite_atom(AtomsView atoms, std::size_t num_checked) {
  for (std::size_t i = 0; i < std::min(num_checked, atoms.n); ++i)
    for (int k = 0; k < 3; ++k)
      if (!std::isfinite(atoms.pos[3 * i + k])) return i;
  return std::nullopt;
}

namespace {

// A NaN or infinite coordinate would send the cell list's bin arithmetic out of range.
void check_finite(AtomsView atoms) {
  if (const auto bad = find_non_finite_atom(atoms, atoms.n))
    throw std::invalid_argument("atom " + std::to_string(*bad) + " has a non-finite position (" +
                                std::to_string(atoms.pos[3 * *bad]) + ", " +
                                std::to_string(atoms.pos[3 * *bad + 1]) + ", " +
                                std::to_string(atoms.pos[3 * *bad + 2]) + ")");
}

}  // namespace

PeriodicImages periodic_images(const Cell& cell, AtomsView atoms, double cutoff) {
  check_cell(cell);
  check_finite(atoms);
  // reach along each lattice direction in fractional units: cutoff / plane spacing
  double reach[3];
  const double vol = std::fabs(cell.volume());
  for (int k = 0; k < 3; ++k) {
    const double* u = &cell.h[3 * ((k + 1) % 3)];
    const double* w = &cell.h[3 * ((k + 2) % 3)];
    const double cx = u[1] * w[2] - u[2] * w[1];
    const double cy = u[2] * w[0] - u[0] * w[2];
    const double cz = u[0] * w[1] - u[1] * w[0];
    reach[k] = cutoff * std::sqrt(cx * cx + cy * cy + cz * cz) / vol;
  }
  double inv[9];  // fractional = cartesian . inv
  invert3(cell.h, inv);
  PeriodicImages img;
  for (std::size_t i = 0; i < atoms.n; ++i) {
    const double* xi = &atoms.pos[3 * i];
    double f[3];
    for (int k = 0; k < 3; ++k) f[k] = xi[0] * inv[k] + xi[1] * inv[3 + k] + xi[2] * inv[6 + k];
    for (double& x : f) {
      x -= std::floor(x);
      if (x >= 1.0) x = 0.0;  // -1e-17 wraps to 1.0 in floating point
    }
    int smin[3], smax[3];
    for (int k = 0; k < 3; ++k) {
      smin[k] = static_cast<int>(std::floor(-reach[k] - f[k]));
      smax[k] = static_cast<int>(std::ceil(1.0 + reach[k] - f[k]));
    }
    for (int a = smin[0]; a <= smax[0]; ++a)
      for (int b = smin[1]; b <= smax[1]; ++b)
        for (int c = smin[2]; c <= smax[2]; ++c) {
          const double g[3] = {f[0] + a, f[1] + b, f[2] + c};
          bool inside = true;
          for (int k = 0; k < 3; ++k) inside = inside && g[k] > -reach[k] && g[k] < 1.0 + reach[k];
          if (!inside) continue;
          double x[3];
          cell.to_cartesian(g, x);
          img.pos.insert(img.pos.end(), x, x + 3);
          img.type.push_back(atoms.type[i]);
          img.owner.push_back(i);
        }
  }
  return img;
}

std::pair<int, int> owned_grid_range(int n, double frac_lo, double frac_hi) {
  int lo = static_cast<int>(frac_lo * n);
  if (1.0 * lo != frac_lo * n) ++lo;
  int hi = static_cast<int>(frac_hi * n);
  if (1.0 * hi == frac_hi * n) --hi;
  return {lo, hi + 1};
}

int grid_points_for_spacing(double length, double spacing) {
  if (!(length > 0.0) || !(spacing > 0.0) || !std::isfinite(length / spacing))
    throw std::invalid_argument("grid from spacing needs a positive length and spacing, got " +
                                std::to_string(length) + " and " + std::to_string(spacing));
  const double n = std::floor(length / spacing + 0.5);
  if (n > static_cast<double>(std::numeric_limits<int>::max()))
    throw std::invalid_argument("spacing " + std::to_string(spacing) + " gives more than " +
                                std::to_string(std::numeric_limits<int>::max()) +
                                " grid points along " + std::to_string(length));
  return std::max(1, static_cast<int>(n));
}

std::optional<std::pair<std::size_t, std::size_t>> find_coincident_atoms(AtomsView atoms,
                                                                         std::size_t num_checked,
                                                                         double tolerance) {
  if (atoms.n < 2) return std::nullopt;
  // bins of about one atom each (CellList bins are half its cutoff wide): O(1) work per atom
  double volume = 1.0;
  for (int k = 0; k < 3; ++k) {
    double lo = atoms.pos[k], hi = atoms.pos[k];
    for (std::size_t i = 0; i < atoms.n; ++i) {
      lo = std::min(lo, atoms.pos[3 * i + k]);
      hi = std::max(hi, atoms.pos[3 * i + k]);
    }
    volume *= std::max(hi - lo, tolerance);
  }
  const double cutoff = std::max(tolerance, 2.0 * std::cbrt(volume / atoms.n));
  const CellList bins(atoms, cutoff);
  const double tolsq = tolerance * tolerance;
  for (std::size_t i = 0; i < std::min(num_checked, atoms.n); ++i) {
    const double* xi = &atoms.pos[3 * i];
    std::optional<std::size_t> partner;
    bins.for_each_candidate(xi, [&](std::size_t j) {
      const double* xj = &atoms.pos[3 * j];
      const double rsq = (xi[0] - xj[0]) * (xi[0] - xj[0]) + (xi[1] - xj[1]) * (xi[1] - xj[1]) +
                         (xi[2] - xj[2]) * (xi[2] - xj[2]);
      if (j != i && rsq < tolsq && !partner) partner = j;
    });
    if (partner) return std::make_pair(i, *partner);
  }
  return std::nullopt;
}

GridDescriptors::GridDescriptors(const BispectrumSettings& settings, int num_threads)
    : sna_(settings), threads_(num_threads) {
  if (num_threads < 1)
    throw std::invalid_argument("number of threads must be >= 1, got " +
                                std::to_string(num_threads));
}

// Calls fn(thread, first, count, neighbours, workspace) for batches of up to kLanes
// consecutive points, with U of point first + l accumulated in lane l and its neighbours
// (within each atom type's cutoff) in neighbours[l]. Points are split into contiguous
// ranges, one per thread, so results do not depend on scheduling.
template <class BatchFn>
void GridDescriptors::for_each_batch(const Cell& cell, const GridBlock& block, AtomsView atoms,
                                     BatchFn&& fn) const {
  block.validate();
  check_cell(cell);
  for (std::size_t i = 0; i < atoms.n; ++i)
    if (atoms.type[i] < 0 || atoms.type[i] >= sna_.settings().num_types())
      throw std::invalid_argument("atom " + std::to_string(i) + " has type " +
                                  std::to_string(atoms.type[i] + 1) + " but only " +
                                  std::to_string(sna_.settings().num_types()) +
                                  " element radii and weights are given");
  check_finite(atoms);
  const std::size_t npoints = block.num_points();
  if (npoints == 0) return;
  const CellList bins(atoms, sna_.settings().max_cutoff());
  std::vector<double> cutsq(sna_.settings().num_types());
  for (std::size_t t = 0; t < cutsq.size(); ++t) {
    const double c = sna_.settings().cutoff(static_cast<int>(t));
    cutsq[t] = c * c;
  }
  const int nthreads = num_threads_for(npoints);

  auto work = [&](int t) {
    BispectrumWorkspace ws = sna_.make_workspace();
    NeighborLists nbrs;
    std::vector<double> displacements;
    std::vector<int> types;
    const std::size_t begin = npoints * t / nthreads;
    const std::size_t end = npoints * (t + 1) / nthreads;
    for (std::size_t first = begin; first < end; first += kLanes) {
      const int count = static_cast<int>(std::min<std::size_t>(kLanes, end - first));
      sna_.begin_centers(ws);
      for (int l = 0; l < kLanes; ++l) {
        nbrs[l].clear();
        if (l >= count) continue;
        double x[3];
        point_position(cell, block, first + l, x);
        bins.for_each_candidate(x, [&](std::size_t a) {
          const double* xa = &atoms.pos[3 * a];
          const Neighbor nb{a, {x[0] - xa[0], x[1] - xa[1], x[2] - xa[2]}};
          const double rsq = nb.d[0] * nb.d[0] + nb.d[1] * nb.d[1] + nb.d[2] * nb.d[2];
          if (rsq < cutsq[atoms.type[a]] && rsq > kCoincidentSq) nbrs[l].push_back(nb);
        });
        displacements.clear();
        types.clear();
        for (const Neighbor& nb : nbrs[l]) {
          displacements.insert(displacements.end(), nb.d, nb.d + 3);
          types.push_back(atoms.type[nb.atom]);
        }
        sna_.add_neighbors(ws, l, types.size(), displacements.data(), types.data());
      }
      fn(t, first, count, nbrs, ws);
    }
  };

  std::vector<std::exception_ptr> errors(nthreads);
  std::vector<std::thread> pool;
  for (int t = 1; t < nthreads; ++t)
    pool.emplace_back([&, t] {
      try {
        work(t);
      } catch (...) {
        errors[t] = std::current_exception();
      }
    });
  try {
    work(0);
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (std::thread& th : pool) th.join();
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
}

int GridDescriptors::num_threads_for(std::size_t npoints) const {
  return static_cast<int>(std::max<std::size_t>(1, std::min<std::size_t>(threads_, npoints)));
}

void GridDescriptors::compute(const Cell& cell, const GridBlock& block, AtomsView atoms,
                              double* out) const {
  const std::size_t K = num_descriptors();
  for_each_batch(cell, block, atoms,
                 [&](int, std::size_t first, int count, const NeighborLists&,
                     BispectrumWorkspace& ws) {
                   double* dst[kLanes] = {};
                   for (int l = 0; l < count; ++l) dst[l] = out + (first + l) * K;
                   sna_.components(ws, dst);
                 });
}

void GridDescriptors::gradient(const Cell& cell, const GridBlock& block, AtomsView atoms,
                               const double* beta, double* dE_dR, double* dE_dstrain,
                               double* strain_per_atom, double* strain_per_point) const {
  const std::size_t K = num_descriptors();
  const int nthreads = num_threads_for(block.num_points());
  // one accumulator per thread, summed in thread order: deterministic for a thread count
  std::vector<std::vector<double>> grad(nthreads, std::vector<double>(3 * atoms.n, 0.0));
  std::vector<std::array<double, 9>> strain(nthreads, std::array<double, 9>{});
  std::vector<std::vector<double>> atom_strain(strain_per_atom ? nthreads : 0,
                                               std::vector<double>(9 * atoms.n, 0.0));
  if (strain_per_point)
    std::fill(strain_per_point, strain_per_point + 9 * block.num_points(), 0.0);
  for_each_batch(cell, block, atoms,
                 [&](int t, std::size_t first, int count, const NeighborLists& nbrs,
                     BispectrumWorkspace& ws) {
                   const double* b[kLanes] = {};
                   for (int l = 0; l < count; ++l) b[l] = beta + (first + l) * K;
                   sna_.begin_adjoint(ws, b);
                   for (int l = 0; l < count; ++l) {
                     sna_.select_lane(ws, l);
                     for (const Neighbor& nb : nbrs[l]) {
                       double g[3];  // dE/dd with d = x_point - x_atom
                       sna_.neighbor_gradient(ws, nb.d, atoms.type[nb.atom], g);
                       for (int a = 0; a < 3; ++a) {
                         grad[t][3 * nb.atom + a] -= g[a];
                         for (int c = 0; c < 3; ++c) {
                           const double term = g[a] * nb.d[c];
                           strain[t][3 * a + c] += term;
                           if (strain_per_atom) atom_strain[t][9 * nb.atom + 3 * a + c] += term;
                           if (strain_per_point)
                             strain_per_point[9 * (first + l) + 3 * a + c] += term;
                         }
                       }
                     }
                   }
                 });
  std::fill(dE_dR, dE_dR + 3 * atoms.n, 0.0);
  std::fill(dE_dstrain, dE_dstrain + 9, 0.0);
  if (strain_per_atom) std::fill(strain_per_atom, strain_per_atom + 9 * atoms.n, 0.0);
  for (int t = 0; t < nthreads; ++t) {
    for (std::size_t i = 0; i < 3 * atoms.n; ++i) dE_dR[i] += grad[t][i];
    for (int i = 0; i < 9; ++i) dE_dstrain[i] += strain[t][i];
    if (strain_per_atom)
      for (std::size_t i = 0; i < 9 * atoms.n; ++i) strain_per_atom[i] += atom_strain[t][i];
  }
}

std::vector<double> GridDescriptors::partition(const Cell& cell, const GridBlock& block,
                                               AtomsView atoms, const double* values, int width,
                                               double* out) const {
  block.validate();
  check_cell(cell);
  if (width < 1) throw std::invalid_argument("partition needs width >= 1");
  check_finite(atoms);
  std::vector<double> unclaimed(width, 0.0);
  const double cutoff = sna_.settings().max_cutoff();
  const CellList bins(atoms, cutoff);
  auto distance = [](const double* a, const double* b) {
    return std::sqrt((a[0] - b[0]) * (a[0] - b[0]) + (a[1] - b[1]) * (a[1] - b[1]) +
                     (a[2] - b[2]) * (a[2] - b[2]));
  };
  std::vector<std::size_t> near;
  std::vector<double> r, cell_weight;
  for (std::size_t p = 0; p < block.num_points(); ++p) {
    double x[3];
    point_position(cell, block, p, x);
    near.clear();
    r.clear();
    bins.for_each_candidate(x, [&](std::size_t a) {
      const double d = distance(x, &atoms.pos[3 * a]);
      if (d < cutoff) {
        near.push_back(a);
        r.push_back(d);
      }
    });
    const double* v = values + p * width;
    if (near.empty()) {
      for (int k = 0; k < width; ++k) unclaimed[k] += v[k];
      continue;
    }
    // P_i = prod_j s(mu_ij), mu_ij = (r_i - r_j) / R_ij; w_i = P_i / sum_j P_j
    cell_weight.assign(near.size(), 1.0);
    for (std::size_t i = 0; i < near.size(); ++i)
      for (std::size_t j = 0; j < near.size(); ++j) {
        const double rij = distance(&atoms.pos[3 * near[i]], &atoms.pos[3 * near[j]]);
        if (i != j && rij > 0.0) cell_weight[i] *= becke_step((r[i] - r[j]) / rij);
      }
    double total = 0.0;
    for (const double w : cell_weight) total += w;
    for (std::size_t i = 0; i < near.size(); ++i)
      for (int k = 0; k < width; ++k) out[near[i] * width + k] += cell_weight[i] / total * v[k];
  }
  return unclaimed;
}

}  // namespace mlsurrogate
