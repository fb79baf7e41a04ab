/* An exported mlsurrogate model (one TorchScript file): its contract, read once at load,
 * and the steps of the energy functional.
 *
 * This header includes no torch header, and torch_model.cpp includes no LAMMPS
 * header: both projects ship their own {fmt} and macros, and keeping them in
 * separate translation units avoids any clash. Errors are reported as
 * std::runtime_error with a message meant for the user (no TorchScript traceback).
 */
#ifndef MLSURROGATE_TORCH_MODEL_H
#define MLSURROGATE_TORCH_MODEL_H

#include "bispectrum.hpp"

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace mlsurrogate {

// What `mlsurrogate export` writes on the module (mlsurrogate.model.SurrogateModel).
constexpr const char *kModelFormat = "mlsurrogate-model";
constexpr int kModelFormatVersion = 3;

// Everything the pair style needs to know about a model, from its typed TorchScript
// attributes; every one is required (no defaults: a missing one means an older export).
struct ModelContract {
  std::vector<std::string> elements;    // element of model type 0, 1, ...
  std::vector<double> valence_charges;  // per element, electrons
  std::vector<double> masses;           // per element, g/mol
  double grid_spacing = 0.0;            // training grid spacing, A
  double cutoff = 0.0;                  // descriptor neighbour cutoff, A
  BispectrumSettings descriptors;       // compute sna/grid keywords (per-element lists)
  int num_energies = 0;                 // points of the LDOS energy grid
  double dropout_probability = 0.0;     // p of the network's dropout (MC dropout); 0: none
  std::string network_dtype;            // "float64" or "float32"
  std::string metadata_json;            // metadata.json of the archive

  // Index of `element` in `elements`, or -1.
  int element_index(const std::string &element) const;
};

// One network the electronic step runs: the model's own (an ensemble's mean LDOS), one
// ensemble member, or one sampled network of MC dropout (pass `index` of `seed`:
// network.forward_sampled of the model, the keep-masks drawn by its TorchScript code
// exactly as in Python).
struct NetworkChoice {
  enum class Kind { kWhole, kMember, kSampled };
  Kind kind = Kind::kWhole;
  int index = 0;       // the member, or the pass of a sampled network
  long long seed = 0;  // of a sampled network

  static NetworkChoice whole() { return {}; }
  static NetworkChoice member(int m) { return {Kind::kMember, m, 0}; }
  static NetworkChoice sampled(long long seed, int pass) { return {Kind::kSampled, pass, seed}; }
};

class TorchModel {
 public:
  // Loads the TorchScript file `path` onto `device` ("cpu", "cuda", "cuda:N") and reads
  // its contract. Throws std::runtime_error naming the file and what to do if it is not
  // a zip archive, a training checkpoint, not TorchScript, of another format version,
  // or lacks an attribute.
  TorchModel(const std::string &path, const std::string &device);
  ~TorchModel();
  TorchModel(const TorchModel &) = delete;
  TorchModel &operator=(const TorchModel &) = delete;

  const ModelContract &contract() const { return contract_; }

  // Networks of an ensemble model (the `members` of its network); 1 for a single network.
  int ensemble_size() const;

  // The electronic-structure steps of an exported mlsurrogate model, in the order of
  // the distributed interface of mlsurrogate.physics (local, global, local). Arrays are
  // row-major doubles on the host; `npoints` grid points of this rank.
  // `network` selects the network of predict_ldos and descriptor_gradient.
  std::vector<double> predict_ldos(const double *descriptors, int npoints, int nfeatures,
                                   const NetworkChoice &network) const;
  std::vector<double> dos(const std::vector<double> &ldos, double voxel) const;
  double fermi_level(const std::vector<double> &dos, double n_electrons) const;
  std::vector<double> density(const std::vector<double> &ldos, double mu) const;
  struct GlobalTerms {
    std::vector<std::pair<std::string, double>> terms;  // eV per cell
    std::vector<double> phi;                            // dPhi/dn on the full grid
    std::vector<double> phi_strain;                     // dPhi/dstrain at fixed n, 3 x 3
  };
  GlobalTerms global_terms(const std::vector<double> &dos, const std::vector<double> &density,
                           const int shape[3], const double cell[9], double mu) const;
  // Each point's share of E_band - TS (owned points) and of -E_H + E_xc - int v_xc n
  // (full grid), eV: the per-atom energies.
  std::vector<double> band_free_points(const std::vector<double> &ldos, double mu,
                                       double voxel) const;
  std::vector<double> potential_points(const std::vector<double> &density, const int shape[3],
                                       const double cell[9]) const;
  double fermi_shift_part(const std::vector<double> &ldos, double mu,
                          const std::vector<double> &phi_local) const;
  std::vector<double> ldos_gradient(double mu, const std::vector<double> &phi_local,
                                    const std::vector<double> &dos, double fermi_shift,
                                    double voxel) const;
  std::vector<double> descriptor_gradient(const double *descriptors, int npoints, int nfeatures,
                                          const std::vector<double> &ldos_gradient,
                                          const NetworkChoice &network) const;

  // Empty if `device` can be used by this libtorch on this machine, otherwise
  // the reason why not.
  static std::string check_device(const std::string &device);
  // Number of CUDA devices this libtorch sees (0 without CUDA).
  static int cuda_device_count();
  // Sets the number of intra-op threads of libtorch.
  static void set_num_threads(int n);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string path_;
  ModelContract contract_;
};

}  // namespace mlsurrogate

#endif
