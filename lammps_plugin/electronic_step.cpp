#include "electronic_step.h"

#include "torch_model.h"

#include <algorithm>
#include <exception>

namespace mlsurrogate {

namespace {

// Symmetric part of a row-major 3 x 3 matrix, component k in LAMMPS's virial order
// xx, yy, zz, xy, xz, yz
double symmetric_part(const double *m, int k) {
  constexpr int index[6][2] = {{0, 0}, {1, 1}, {2, 2}, {0, 1}, {0, 2}, {1, 2}};
  const int a = index[k][0], b = index[k][1];
  return 0.5 * (m[3 * a + b] + m[3 * b + a]);
}

// Runs `work`; an exception becomes a StepError, collective if every rank gets it alike.
template <class Work>
void step(bool collective, Work &&work) {
  try {
    work();
  } catch (const StepError &) {
    throw;
  } catch (const std::exception &e) {
    throw StepError(e.what(), collective);
  }
}

}  // namespace

const char *const ElectronicStep::kStageNames[kNumStages] = {
    "descriptors", "inference", "functional", "back-propagation", "force contraction",
    "communication"};

ElectronicStep::ElectronicStep(const TorchModel &model, int threads, int batch, MPI_Comm comm)
    : model_(model), kernel_(model.contract().descriptors, threads), batch_(batch), comm_(comm) {}

std::size_t ElectronicStep::bytes_needed(std::size_t npoints, std::size_t ngrid) const {
  const std::size_t per_point =
      2 * (static_cast<std::size_t>(kernel_.num_descriptors()) + model_.contract().num_energies);
  constexpr std::size_t per_grid_point = 4;  // density, potential, two FFT work arrays
  return sizeof(double) * (npoints * per_point + ngrid * per_grid_point);
}

void ElectronicStep::allreduce(double *data, int count) {
  const double start = MPI_Wtime();
  MPI_Allreduce(MPI_IN_PLACE, data, count, MPI_DOUBLE, MPI_SUM, comm_);
  seconds_[COMMUNICATION] += MPI_Wtime() - start;
}

template <class Work>
void ElectronicStep::timed(Stage stage, Work &&work) {
  const double start = MPI_Wtime();
  work();
  seconds_[stage] += MPI_Wtime() - start;
}

// Descriptors of the owned grid points, one row of num_descriptors() per point
std::vector<double> ElectronicStep::describe(const ElectronicInput &in) {
  std::vector<double> descriptors(in.block.num_points() * kernel_.num_descriptors());
  step(false, [&] {
    if (descriptors.empty()) return;
    timed(DESCRIPTORS, [&] { kernel_.compute(in.cell, in.block, in.atoms, descriptors.data()); });
  });
  return descriptors;
}

ElectronicResult ElectronicStep::run(const ElectronicInput &in) { return solve(in, describe(in)); }

std::vector<ElectronicResult> ElectronicStep::run_networks(
    const ElectronicInput &in, const std::vector<NetworkChoice> &networks) {
  const std::vector<double> descriptors = describe(in);
  std::vector<ElectronicResult> results;
  ElectronicInput network_in = in;
  for (const NetworkChoice &network : networks) {
    network_in.network = network;
    results.push_back(solve(network_in, descriptors));
  }
  return results;
}

ElectronicResult ElectronicStep::solve(const ElectronicInput &in,
                                       const std::vector<double> &descriptors) {
  int rank = 0;
  MPI_Comm_rank(comm_, &rank);
  const std::array<int, 3> &shape = in.block.shape;
  const int npoints = static_cast<int>(in.block.num_points());
  const std::size_t ngrid = static_cast<std::size_t>(shape[0]) * shape[1] * shape[2];
  const double voxel = in.cell.volume() / static_cast<double>(ngrid);
  const int nfeatures = kernel_.num_descriptors();
  const int nenergies = model_.contract().num_energies;
  const std::size_t nall = in.atoms.n;
  ElectronicResult out;

  // 1. local: LDOS and the partial DOS of the owned grid points
  std::vector<double> ldos;
  std::vector<double> dos(nenergies, 0.0);
  step(false, [&] {
    if (npoints == 0) return;
    timed(INFERENCE, [&] {
      const int chunk = batch_ > 0 ? batch_ : npoints;
      for (int first = 0; first < npoints; first += chunk) {
        const int count = std::min(chunk, npoints - first);
        const std::vector<double> part = model_.predict_ldos(
            descriptors.data() + static_cast<std::size_t>(first) * nfeatures, count, nfeatures,
            in.network);
        ldos.insert(ldos.end(), part.begin(), part.end());
      }
    });
    timed(FUNCTIONAL, [&] { dos = model_.dos(ldos, voxel); });
  });
  allreduce(dos.data(), nenergies);
  for (std::size_t i = 0; i < in.nlocal; ++i) out.electrons += in.charges[i];
  allreduce(&out.electrons, 1);

  // 2. global: Fermi level; density gathered on the full grid on every rank.
  // owned[p]: full-grid index of the p-th owned point (block order, last index fastest)
  std::vector<std::size_t> owned;
  owned.reserve(npoints);
  for (int i = in.block.lo[0]; i < in.block.hi[0]; ++i)
    for (int j = in.block.lo[1]; j < in.block.hi[1]; ++j)
      for (int k = in.block.lo[2]; k < in.block.hi[2]; ++k)
        owned.push_back((static_cast<std::size_t>(i) * shape[1] + j) * shape[2] + k);
  double mu = 0.0;
  timed(FUNCTIONAL, [&] {
    try {
      mu = model_.fermi_level(dos, out.electrons);
    } catch (const std::exception &e) {
      throw StepError("the predicted LDOS gives no Fermi level (" + std::string(e.what()) +
                          "): the grid may be too coarse for the model, or the structure "
                          "outside its training data",
                      true);
    }
  });
  std::vector<double> density(ngrid, 0.0);
  step(true, [&] {
    timed(FUNCTIONAL, [&] {
      if (npoints == 0) return;
      const std::vector<double> local = model_.density(ldos, mu);
      for (int p = 0; p < npoints; ++p) density[owned[p]] = local[p];
    });
  });
  allreduce(density.data(), static_cast<int>(ngrid));

  TorchModel::GlobalTerms global;
  std::vector<double> phi_local(npoints);
  double fermi_shift = 0.0;
  step(true, [&] {
    timed(FUNCTIONAL, [&] {
      global = model_.global_terms(dos, density, shape.data(), in.cell.h.data(), mu);
      for (int p = 0; p < npoints; ++p) phi_local[p] = global.phi[owned[p]];
    });
  });
  step(false, [&] {
    timed(FUNCTIONAL,
          [&] { if (npoints > 0) fermi_shift = model_.fermi_shift_part(ldos, mu, phi_local); });
  });
  allreduce(&fermi_shift, 1);
  out.terms.insert(global.terms.begin(), global.terms.end());

  // 3. local: dA/dLDOS, back-propagation to dA/dB, adjoint contraction to forces
  const bool per_atom = in.energy_per_atom || in.virial_per_atom;
  std::array<double, 9> strain{};
  out.dE_dR.assign(3 * nall, 0.0);
  std::vector<double> strain_per_atom(in.virial_per_atom ? 9 * nall : 0);
  std::vector<double> strain_per_point(in.virial_per_atom ? 9 * static_cast<std::size_t>(npoints)
                                                          : 0);
  std::vector<double> band_points, potential_points;
  step(false, [&] {
    if (per_atom)
      timed(FUNCTIONAL, [&] {
        potential_points = model_.potential_points(density, shape.data(), in.cell.h.data());
        if (npoints > 0) band_points = model_.band_free_points(ldos, mu, voxel);
      });
    if (npoints == 0) return;
    std::vector<double> dA_dldos, beta;
    timed(FUNCTIONAL,
          [&] { dA_dldos = model_.ldos_gradient(mu, phi_local, dos, fermi_shift, voxel); });
    timed(BACKPROP, [&] {
      beta = model_.descriptor_gradient(descriptors.data(), npoints, nfeatures, dA_dldos,
                                        in.network);
    });
    timed(CONTRACTION, [&] {
      kernel_.gradient(in.cell, in.block, in.atoms, beta.data(), out.dE_dR.data(), strain.data(),
                       in.virial_per_atom ? strain_per_atom.data() : nullptr,
                       in.virial_per_atom ? strain_per_point.data() : nullptr);
    });
  });

  // dA/dstrain: the descriptor part of the grid points, the band term (D scales with the
  // voxel volume: (E_band - TS) I) and the rest of the explicit cell dependence,
  // replicated on every rank (see mlsurrogate.physics): mu keeps N_val, Phi[n; cell], and
  // the caller's isotropic partner term
  std::array<double, 9> explicit_rest{};
  if (in.virial || in.virial_per_atom) {
    std::map<std::string, double> &terms = out.terms;
    const double c = terms["edos_at_mu"] + fermi_shift;
    for (int a = 0; a < 3; ++a)
      for (int b = 0; b < 3; ++b)
        explicit_rest[3 * a + b] =
            0.5 * (global.phi_strain[3 * a + b] + global.phi_strain[3 * b + a]);
    const double isotropic_rest = -c * out.electrons / terms["dos_at_mu"] +
        in.background_strain_per_charge2 * out.electrons * out.electrons;
    for (int a = 0; a < 3; ++a) explicit_rest[4 * a] += isotropic_rest;
  }
  if (in.virial)
    for (int k = 0; k < 6; ++k) {
      out.dE_dstrain[k] = symmetric_part(strain.data(), k);
      if (rank == 0)
        out.dE_dstrain[k] +=
            symmetric_part(explicit_rest.data(), k) + (k < 3 ? out.terms["band_free"] : 0.0);
    }
  if (per_atom)
    share_per_atom(in, owned, band_points, potential_points, strain_per_atom, strain_per_point,
                   explicit_rest, out);
  return out;
}

/* Per-atom energy and virial: a convention, since the grid energy belongs to no atom.
   Each grid point's share of A - E_ii (band_free_points + potential_points) goes to the
   atoms by Becke's fuzzy Voronoi cells (GridDescriptors::partition). Each (point, atom)
   term of the descriptor virial goes half to the atom and half to the point's owners
   (LAMMPS's many-body rule with the point as the centre); the band term follows the
   point's owners; the explicit cell terms, and points with no atom within the cutoff,
   are shared by valence charge. Ghost atoms' shares go to their owners through the
   caller's reverse communication. */
void ElectronicStep::share_per_atom(const ElectronicInput &in,
                                    const std::vector<std::size_t> &owned,
                                    const std::vector<double> &band_points,
                                    const std::vector<double> &potential_points,
                                    const std::vector<double> &strain_per_atom,
                                    const std::vector<double> &strain_per_point,
                                    const std::array<double, 9> &explicit_rest,
                                    ElectronicResult &out) {
  constexpr int kWidth = 8;  // energy, band energy, six virial components
  const std::size_t npoints = owned.size();
  const std::size_t nall = in.atoms.n;
  std::vector<double> values(kWidth * npoints, 0.0), share(kWidth * nall, 0.0);
  for (std::size_t p = 0; p < npoints; ++p) {
    double *v = &values[kWidth * p];
    v[0] = band_points[p] + potential_points[owned[p]];
    v[1] = band_points[p];
    if (in.virial_per_atom)
      for (int k = 0; k < 6; ++k) v[2 + k] = 0.5 * symmetric_part(&strain_per_point[9 * p], k);
  }
  std::vector<double> unclaimed;
  step(false, [&] {
    unclaimed = kernel_.partition(in.cell, in.block, in.atoms, values.data(), kWidth, share.data());
  });
  allreduce(unclaimed.data(), kWidth);

  if (in.energy_per_atom) out.atom_energy.assign(nall, 0.0);
  if (in.virial_per_atom) out.atom_strain.assign(6 * nall, 0.0);
  for (std::size_t i = 0; i < nall; ++i) {
    const double by_charge = i < in.nlocal ? in.charges[i] / out.electrons : 0.0;
    const double *s = &share[kWidth * i];
    if (in.energy_per_atom) out.atom_energy[i] = s[0] + by_charge * unclaimed[0];
    if (!in.virial_per_atom) continue;
    for (int k = 0; k < 6; ++k) {
      const double band = k < 3 ? s[1] + by_charge * unclaimed[1] : 0.0;
      out.atom_strain[6 * i + k] = 0.5 * symmetric_part(&strain_per_atom[9 * i], k) + s[2 + k] +
          band + by_charge * (unclaimed[2 + k] + symmetric_part(explicit_rest.data(), k));
    }
  }
}

}  // namespace mlsurrogate
