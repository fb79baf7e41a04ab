// SNAP bispectrum components of the neighbour density around one centre, and the
// adjoint of sum_k beta_k B_k with respect to the neighbour displacements.
//
// Math: Bartok et al., PRL 104, 136403 (2010); Thompson et al., J. Comput. Phys. 285,
// 316 (2015); Wigner U functions and Clebsch-Gordan coefficients from Varshalovich,
// Moskalev, Khersonskii, "Quantum Theory of Angular Momentum" (1988), 4.8.2 and 8.2.1.
// Conventions (index order of components, bzero, self weight, chem channels, bnorm,
// quadratic terms) are those of LAMMPS compute sna/grid, so values agree to round-off.
//
// Angular momenta are stored doubled: j = 2J, and m = J + M runs over 0..j.
#pragma once

#include <cstddef>
#include <vector>

namespace mlsurrogate {

// Keywords of LAMMPS compute sna/grid. Per-type vectors are indexed by 0-based atom type.
struct BispectrumSettings {
  double rcutfac = 4.67637;
  double rfac0 = 0.99363;
  int twojmax = 10;
  std::vector<double> radius;  // per type
  std::vector<double> weight;  // per type
  double rmin0 = 0.0;
  bool switchflag = true;
  bool bzeroflag = false;
  bool quadraticflag = false;
  bool bnormflag = false;
  bool wselfallflag = false;
  std::vector<int> chem_map;  // empty: one density channel; else channel of each type

  int num_types() const { return static_cast<int>(radius.size()); }
  int num_elements() const;
  // Neighbour cutoff of an atom of this type: 2 * radius * rcutfac (the grid point
  // has no radius of its own in compute sna/grid).
  double cutoff(int type) const { return 2.0 * radius[type] * rcutfac; }
  double max_cutoff() const;
  // Throws std::invalid_argument naming the offending keyword and value.
  void validate() const;
};

// Centres are processed kLanes at a time: the U, Z and Y arrays hold kLanes values per
// entry (lane fastest), so every inner loop of the contractions is a short vector loop.
constexpr int kLanes = 4;

// Scratch space of kLanes centres; one per thread.
struct BispectrumWorkspace {
  std::vector<double> utot_re, utot_im;  // [element][u index][lane]: U of the densities
  std::vector<double> y_re, y_im;        // [element][u index][lane]: adjoint weights
  std::vector<double> z_re, z_im;        // one Z block, half plane, [entry][lane]
  std::vector<double> ylane_re, ylane_im;  // [element][u index]: Y of the selected lane
  std::vector<double> u4_re, u4_im;      // [u index][4]: u of 4 neighbours, or (u, du/dd)
  std::vector<double> acc_re, acc_im;    // [element][u index][4]: weighted neighbour sums
  std::vector<double> linear;            // [lane][component]: linear components
  std::vector<double> beta_linear;       // [lane][component]: dE/dB of linear components
  std::vector<double> coef;              // [element][lane]: adjoint weights of one Z block
};

class Bispectrum {
 public:
  explicit Bispectrum(const BispectrumSettings& settings);

  const BispectrumSettings& settings() const { return s_; }
  int num_descriptors() const { return num_descriptors_; }
  BispectrumWorkspace make_workspace() const;

  // Start kLanes new centres: U = self term only.
  void begin_centers(BispectrumWorkspace& ws) const;
  // Add to centre `lane` its `count` neighbours of the given types at displacements
  // d (count x 3), d = x_centre - x_atom (the sign convention of compute sna/grid).
  // Caller ensures 1e-20 < |d|^2 < cutoff^2.
  void add_neighbors(BispectrumWorkspace& ws, int lane, std::size_t count, const double* d,
                     const int* types) const;
  // All components (linear, then quadratic if enabled) of each centre; out[lane] may be
  // null for unused lanes.
  void components(BispectrumWorkspace& ws, double* const out[kLanes]) const;
  // Prepare the adjoint for beta[lane] = dE/dB (length num_descriptors(); null: zero).
  void begin_adjoint(BispectrumWorkspace& ws, const double* const beta[kLanes]) const;
  // Make neighbor_gradient act on centre `lane`, after begin_adjoint.
  void select_lane(BispectrumWorkspace& ws, int lane) const;
  // dE/dd for one neighbour of the selected centre.
  void neighbor_gradient(BispectrumWorkspace& ws, const double d[3], int type,
                         double grad[3]) const;

 private:
  struct Block {  // Z block (j1, j2, j), j1 >= j2, |j1-j2| <= j <= min(twojmax, j1+j2)
    int j1, j2, j;
    std::size_t cg;  // offset of its (j1+1) x (j2+1) Clebsch-Gordan table
  };
  struct Triple {  // a unique bispectrum component (j1 >= j2, j >= j1)
    int j1, j2, j;
    int block;
  };
  struct AdjointTerm {  // dE/dY contribution: factor * beta[component]
    int component;
    double factor;
  };

  int u_index(int j, int mb, int ma) const { return u_offset_[j] + mb * (j + 1) + ma; }
  int block_id(int j1, int j2, int j) const;
  int element_of(int type) const { return s_.chem_map.empty() ? 0 : s_.chem_map[type]; }
  struct CayleyKlein {  // a = ar + i ai, b = br + i bi and their derivatives by d
    double ar, ai, br, bi;
    double dar[3], dai[3], dbr[3], dbi[3];
  };
  CayleyKlein cayley_klein(const double d[3], double rcut, bool with_derivative) const;
  void wigner_u_gradient(const double d[3], double rcut, BispectrumWorkspace& ws) const;
  void z_block(const Block& blk, int e1, int e2, BispectrumWorkspace& ws) const;
  void linear_components(BispectrumWorkspace& ws) const;

  BispectrumSettings s_;
  int nelem_ = 1;
  int center_elem_ = 0;
  int num_u_ = 0;
  int num_linear_ = 0;
  int num_descriptors_ = 0;
  std::vector<int> u_offset_;
  std::vector<int> rec_offset_;          // U recursion coefficients of layer j start here
  std::vector<double> rec_a_, rec_b_;   // [j][mb <= j/2][ma < j], see u_recursion
  std::vector<double> cg_;
  std::vector<Block> blocks_;
  std::vector<int> block_lookup_;
  std::vector<Triple> triples_;
  std::vector<double> bzero_;
  // adjoint plan: terms of (block, e1, e2, e3) in adj_terms_[adj_start_[i] .. adj_start_[i+1])
  std::vector<std::size_t> adj_start_;
  std::vector<AdjointTerm> adj_terms_;
};

}  // namespace mlsurrogate
