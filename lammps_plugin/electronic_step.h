/* The distributed electronic step of pair_style mlsurrogate, without LAMMPS: descriptors
 * of the grid points a rank owns, the network, the energy functional's local / global /
 * local steps with their MPI reductions (mlsurrogate.physics, "distributed interface"),
 * back-propagation and the adjoint descriptor contraction; optionally the per-atom
 * shares of energy and virial.
 */
#ifndef MLSURROGATE_ELECTRONIC_STEP_H
#define MLSURROGATE_ELECTRONIC_STEP_H

#include "grid_descriptors.hpp"
#include "torch_model.h"

#include <mpi.h>

#include <array>
#include <cstddef>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace mlsurrogate {

// What one rank brings to a step.
struct ElectronicInput {
  Cell cell;
  GridBlock block;                 // the grid points this rank owns
  AtomsView atoms;                 // local atoms first, then ghosts; relative to the box origin
  std::size_t nlocal = 0;
  const double *charges = nullptr;  // valence charge of each local atom
  // dE/d(strain)_aa per N_val^2 (each diagonal entry, replicated) of a term the caller's
  // ion-ion energy leaves out of its virial (the kspace background of a charged cell)
  double background_strain_per_charge2 = 0.0;
  // the network whose LDOS the step uses
  NetworkChoice network;
  bool virial = false;
  bool energy_per_atom = false;
  bool virial_per_atom = false;
};

struct ElectronicResult {
  std::map<std::string, double> terms;  // eV per cell, the same on every rank
  double electrons = 0.0;               // N_val of the structure
  std::vector<double> dE_dR;            // 3 x atoms.n: this rank's part, ghosts included
  // dA/d(strain), symmetric, in LAMMPS's virial order xx, yy, zz, xy, xz, yz: this rank's
  // descriptor part, plus the replicated explicit cell terms on rank 0 only
  std::array<double, 6> dE_dstrain{};
  std::vector<double> atom_energy;  // atoms.n, if energy_per_atom (ghost shares for their owners)
  std::vector<double> atom_strain;  // 6 x atoms.n, if virial_per_atom (virial = -atom_strain)
};

// A failure of the step; collective() when every rank raises it identically (after a
// reduction), else only some ranks do.
class StepError : public std::runtime_error {
 public:
  StepError(const std::string &message, bool collective)
      : std::runtime_error(message), collective_(collective) {}
  bool collective() const { return collective_; }

 private:
  bool collective_;
};

class ElectronicStep {
 public:
  enum Stage { DESCRIPTORS, INFERENCE, FUNCTIONAL, BACKPROP, CONTRACTION, COMMUNICATION };
  static constexpr int kNumStages = 6;
  static const char *const kStageNames[kNumStages];

  // `batch`: grid points per network call (0: all owned points at once). The model must
  // outlive the step.
  ElectronicStep(const TorchModel &model, int threads, int batch, MPI_Comm comm);

  ElectronicResult run(const ElectronicInput &in);
  // One result per network (ensemble members, MC-dropout samples), each through the whole
  // step with its own LDOS (DOS, Fermi level, functional, back-propagation, adjoint
  // forces); the descriptors are computed once. `in.network` is ignored.
  std::vector<ElectronicResult> run_networks(const ElectronicInput &in,
                                             const std::vector<NetworkChoice> &networks);

  int num_descriptors() const { return kernel_.num_descriptors(); }
  // Bytes one rank holds at once for `npoints` owned points of an `ngrid`-point grid:
  // descriptors, LDOS and their gradients per point, the full-grid density, potential
  // and FFT work arrays (an estimate from below: torch's temporaries come on top).
  std::size_t bytes_needed(std::size_t npoints, std::size_t ngrid) const;
  // Wall time per stage, summed over all steps so far.
  const std::array<double, kNumStages> &seconds() const { return seconds_; }

 private:
  void allreduce(double *data, int count);
  template <class Work>
  void timed(Stage stage, Work &&work);
  std::vector<double> describe(const ElectronicInput &in);
  ElectronicResult solve(const ElectronicInput &in, const std::vector<double> &descriptors);
  void share_per_atom(const ElectronicInput &in, const std::vector<std::size_t> &owned,
                      const std::vector<double> &band_points,
                      const std::vector<double> &potential_points,
                      const std::vector<double> &strain_per_atom,
                      const std::vector<double> &strain_per_point,
                      const std::array<double, 9> &explicit_rest, ElectronicResult &out);

  const TorchModel &model_;
  GridDescriptors kernel_;
  int batch_;
  MPI_Comm comm_;
  std::array<double, kNumStages> seconds_{};
};

}  // namespace mlsurrogate

#endif
