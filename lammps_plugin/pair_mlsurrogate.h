/* pair_style mlsurrogate: grid-LDOS ML surrogate of Kohn-Sham DFT.
 *
 *   pair_style mlsurrogate model.pt [grid nx ny nz | spacing h]
 *                          [device cpu|cuda|cuda:N] [threads N] [batch M] [ionion on|off]
 *   pair_coeff * * Elem_1 ... Elem_ntypes
 *
 * Every rank computes descriptors of the grid points it owns (the compute sna/grid/local
 * rule), runs the network on them, and takes part in the reductions of the energy
 * functional (DOS, density, Fermi-level shift); forces come from back-propagation and
 * the adjoint descriptor contraction (requires newton pair on).
 */
#ifndef LMP_PAIR_MLSURROGATE_H
#define LMP_PAIR_MLSURROGATE_H

#include "pair.h"

#include <array>
#include <memory>
#include <string>
#include <vector>

namespace mlsurrogate {
class TorchModel;
class GridDescriptors;
struct Cell;
struct GridBlock;
struct AtomsView;
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

 protected:
  void allocate();
  void reset_settings();

  std::string model_file;
  int grid[3];             // grid points per box direction; 0 = not given
  double spacing;          // target grid spacing (distance units); 0 = not given
  std::string device;      // "cpu", "cuda", "cuda:N"
  int nthreads;            // kernel and libtorch threads per rank; 0 = not given (1)
  int batch;               // grid points per network call; 0 = all at once
  double cutmax;           // descriptor cutoff from the model; 0 = unknown
  std::vector<std::string> type_element;    // element name of each atom type (1-based)
  std::vector<int> type_index;              // model element index of each atom type
  std::vector<double> type_charge;          // valence charge of each atom type
  std::unique_ptr<mlsurrogate::TorchModel> model;
  std::unique_ptr<mlsurrogate::GridDescriptors> kernel;

  void grid_shape(int shape[3]) const;
  void check_grid_spacing(const int shape[3]);
  void warn_atoms_on_grid_points(const int shape[3]);
  void check_ion_ion();
  void tally_per_atom(const mlsurrogate::Cell &, const mlsurrogate::GridBlock &,
                      const mlsurrogate::AtomsView &, const std::vector<std::size_t> &owned,
                      const std::vector<double> &band_points,
                      const std::vector<double> &potential_points,
                      const std::vector<double> &strain_per_atom,
                      const std::vector<double> &strain_per_point,
                      const std::array<double, 9> &explicit_rest, double electrons);

  bool ionion;             // require coul/long + kspace with the valence charges
  // thermo extras (compute pair mlsurrogate): band energy, -TS, Fermi level, E_H,
  // E_xc, electron count, electronic free energy (no E_ii)
  std::array<double, 7> extras{};
  // wall time per stage, summed over the run: descriptors, inference, functional,
  // back-propagation, force contraction, communication
  std::array<double, 6> seconds{};
};

}    // namespace LAMMPS_NS

#endif
