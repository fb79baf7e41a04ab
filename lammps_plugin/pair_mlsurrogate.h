/* pair_style mlsurrogate: grid-LDOS ML surrogate of Kohn-Sham DFT.
 *
 *   pair_style mlsurrogate model.pt [grid nx ny nz | spacing h]
 *                          [device cpu|cuda|cuda:N] [threads N] [batch M] [ionion on|off]
 *                          [uncertainty N [dropout T [seed S]] [file FILE] [warn F]]
 *   pair_coeff * * Elem_1 ... Elem_ntypes
 *
 * LAMMPS glue only: positions in, forces, energy and virial tallied out. The electronic
 * step (descriptors of the grid points each rank owns, the network, the energy
 * functional's reductions, back-propagation and the adjoint descriptor contraction) is
 * mlsurrogate::ElectronicStep; the model's contract is mlsurrogate::ModelContract.
 * Requires newton pair on. Reference: docs/pair_style.md.
 */
#ifndef LMP_PAIR_MLSURROGATE_H
#define LMP_PAIR_MLSURROGATE_H

#include "pair.h"

#include <array>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

namespace mlsurrogate {
class TorchModel;
class ElectronicStep;
struct AtomsView;
struct GridBlock;
struct ElectronicInput;
struct NetworkChoice;
}

namespace LAMMPS_NS {

class PairMLSurrogate : public Pair {
 public:
  PairMLSurrogate(class LAMMPS *);
  ~PairMLSurrogate() override;

  void compute(int, int) override;
  void settings(int, char **) override;
  void coeff(int, char **) override;
  void init_style() override;
  double init_one(int, int) override;
  void finish() override;
  void *extract_peratom(const char *, int &) override;
  int pack_reverse_comm(int, int, double *) override;
  void unpack_reverse_comm(int, int *, double *) override;

 protected:
  void allocate();
  void reset_settings();
  int positive_int(const std::string &keyword, const char *word, const char *meaning);

  std::string model_file;
  int grid[3];             // grid points per box direction; 0 = not given
  double spacing;          // target grid spacing (distance units); 0 = not given
  std::string device;      // "cpu", "cuda", "cuda:N"
  int nthreads;            // kernel and libtorch threads per rank; 0 = not given (1)
  int batch;               // grid points per network call; 0 = all at once
  bool ionion;             // require coul/long + kspace with the valence charges
  std::vector<std::string> type_element;    // element name of each atom type (1-based)
  std::vector<int> type_index;              // model element index of each atom type
  std::vector<double> type_charge;          // valence charge of each atom type
  std::unique_ptr<mlsurrogate::TorchModel> model;
  std::unique_ptr<mlsurrogate::ElectronicStep> electronic;    // uses *model: reset first

  void grid_shape(int shape[3]) const;
  mlsurrogate::GridBlock owned_block(const int shape[3]) const;
  void check_grid_spacing(const int shape[3]);
  void check_grid_memory(const mlsurrogate::GridBlock &block);
  void report_grid(const int shape[3]);
  void warn_atoms_on_grid_points(const int shape[3]);
  void check_positions(const mlsurrogate::AtomsView &atoms);
  void check_ion_ion();
  void open_deviation_file();
  void ensemble_deviations(const mlsurrogate::ElectronicInput &in);
  void warn_deviating_atoms(int nlocal);

  // deviations over networks (uncertainty keyword), deepmd-kit's model deviation: the
  // ensemble's members, or `dropout` sampled networks of MC dropout
  int uncertainty_every;            // steps between evaluations; 0 = off
  int dropout_passes;               // sampled networks; 0 = the ensemble's members
  int dropout_seed;                 // seed of the sampled networks
  std::vector<mlsurrogate::NetworkChoice> uncertainty_networks;
  std::string deviation_file;       // the table rank 0 writes
  double warn_force;                // warn above this max force deviation (eV/A); 0 = never
  std::ofstream deviation_out;      // rank 0 only
  std::vector<double> member_forces;   // per atom (ghosts included): 3 per member
  std::vector<double> atom_deviation;  // per local atom, eV/A (fix pair ... devi_f)
  double max_force_deviation = 0.0;    // of the last evaluation, eV/A
  double energy_deviation = 0.0;       // of the last evaluation, eV/atom

  // thermo extras (compute pair mlsurrogate): band energy, -TS, Fermi level, E_H,
  // E_xc, electron count, electronic free energy (no E_ii); the last evaluation's max
  // force deviation and energy deviation (0 without uncertainty)
  std::array<double, 9> extras{};
};

}    // namespace LAMMPS_NS

#endif
