/* Thin wrapper around a TorchScript module.
 *
 * This header includes no torch header, and torch_model.cpp includes no LAMMPS
 * header: both projects ship their own {fmt} and macros, and keeping them in
 * separate translation units avoids any clash. Errors are reported as
 * std::runtime_error with a message meant for the user.
 */
#ifndef MLSURROGATE_TORCH_MODEL_H
#define MLSURROGATE_TORCH_MODEL_H

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace mlsurrogate {

class TorchModel {
 public:
  // Loads the TorchScript file `path` onto `device` ("cpu", "cuda", "cuda:N").
  // Throws std::runtime_error with torch's message if that fails.
  TorchModel(const std::string &path, const std::string &device);
  ~TorchModel();
  TorchModel(const TorchModel &) = delete;
  TorchModel &operator=(const TorchModel &) = delete;

  const std::string &path() const { return path_; }
  const std::string &device() const { return device_; }

  // Value of a numeric attribute of the module, or `fallback` if it has none.
  double number_attr(const std::string &name, double fallback) const;
  // Value of a list-of-strings attribute; empty if the module has none.
  std::vector<std::string> string_list_attr(const std::string &name) const;

  // Value of a list-of-numbers attribute; throws if the module has none.
  std::vector<double> number_list_attr(const std::string &name) const;
  // Value of a boolean attribute; throws if the module has none.
  bool bool_attr(const std::string &name) const;

  // The electronic-structure steps of an exported mlsurrogate model, in the order of
  // the distributed interface of mlsurrogate.physics (local, global, local). Arrays are
  // row-major doubles on the host; `npoints` grid points of this rank.
  int num_energies() const;
  std::vector<double> predict_ldos(const double *descriptors, int npoints, int nfeatures) const;
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
                                          const std::vector<double> &ldos_gradient) const;

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
  std::string device_;
};

}  // namespace mlsurrogate

#endif
