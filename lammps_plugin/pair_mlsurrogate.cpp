#include "pair_mlsurrogate.h"

#include "torch_model.h"

#include "grid_descriptors.hpp"

#include "atom.h"
#include "comm.h"
#include "domain.h"
#include "error.h"
#include "force.h"
#include "kspace.h"
#include "memory.h"
#include "neighbor.h"
#include "platform.h"
#include "update.h"
#include "utils.h"

#include <mpi.h>

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <exception>
#include <map>
#include <string>

using namespace LAMMPS_NS;

namespace {

const char *const USAGE =
    "pair_style mlsurrogate model.pt [grid nx ny nz | spacing h] [device cpu|cuda|cuda:N] "
    "[threads N] [batch M] [ionion on|off]";

bool is_keyword(const std::string &word)
{
  return word == "grid" || word == "spacing" || word == "device" || word == "threads" ||
      word == "batch" || word == "ionion";
}

// Strict parsers: the whole word must be a number.
bool parse_positive_int(const char *word, int &value)
{
  errno = 0;
  char *end = nullptr;
  const long v = std::strtol(word, &end, 10);
  if (errno != 0 || end == word || *end != '\0' || v <= 0 || v > MAXSMALLINT) return false;
  value = static_cast<int>(v);
  return true;
}

bool parse_positive_double(const char *word, double &value)
{
  errno = 0;
  char *end = nullptr;
  const double v = std::strtod(word, &end);
  if (errno != 0 || end == word || *end != '\0' || !std::isfinite(v) || v <= 0.0) return false;
  value = v;
  return true;
}

// Symmetric part of a row-major 3 x 3 matrix, component k in LAMMPS's virial order
// xx, yy, zz, xy, xz, yz
double symmetric_part(const double *m, int k)
{
  constexpr int index[6][2] = {{0, 0}, {1, 1}, {2, 2}, {0, 1}, {0, 2}, {1, 2}};
  const int a = index[k][0], b = index[k][1];
  return 0.5 * (m[3 * a + b] + m[3 * b + a]);
}

// Lengths of the three box vectors a, b, c (triclinic boxes included)
std::array<double, 3> box_vector_lengths(const Domain &domain)
{
  return {domain.xprd, std::sqrt(domain.xy * domain.xy + domain.yprd * domain.yprd),
          std::sqrt(domain.xz * domain.xz + domain.yz * domain.yz + domain.zprd * domain.zprd)};
}

bool valid_device_name(const std::string &name)
{
  if (name == "cpu" || name == "cuda") return true;
  if (name.rfind("cuda:", 0) != 0 || name.size() == 5) return false;
  for (std::size_t i = 5; i < name.size(); ++i)
    if (name[i] < '0' || name[i] > '9') return false;
  return true;
}

}    // namespace

/* ---------------------------------------------------------------------- */

PairMLSurrogate::PairMLSurrogate(LAMMPS *lmp) : Pair(lmp)
{
  single_enable = 0;
  restartinfo = 0;
  one_coeff = 1;
  manybody_flag = 1;
  no_virial_fdotr_compute = 1;    // the virial needs grid points, not f.r of atoms
  nextra = static_cast<int>(extras.size());
  pvector = extras.data();
  reset_settings();
}

PairMLSurrogate::~PairMLSurrogate()
{
  if (copymode) return;
  if (allocated) {
    memory->destroy(setflag);
    memory->destroy(cutsq);
  }
}

void PairMLSurrogate::reset_settings()
{
  model_file.clear();
  grid[0] = grid[1] = grid[2] = 0;
  spacing = 0.0;
  device = "cpu";
  nthreads = 0;
  batch = 0;
  ionion = true;
  cutmax = 0.0;
  model.reset();
}

void PairMLSurrogate::allocate()
{
  allocated = 1;
  const int n = atom->ntypes + 1;
  memory->create(setflag, n, n, "pair:setflag");
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) setflag[i][j] = 0;
  memory->create(cutsq, n, n, "pair:cutsq");
  type_element.assign(n, std::string());
}

/* ----------------------------------------------------------------------
   pair_style mlsurrogate model.pt [keyword values ...]
------------------------------------------------------------------------- */

void PairMLSurrogate::settings(int narg, char **arg)
{
  reset_settings();

  if (narg < 1)
    error->all(FLERR, "pair_style mlsurrogate: missing model file name. Usage: {}", USAGE);
  model_file = arg[0];
  if (is_keyword(model_file))
    error->all(FLERR,
               "pair_style mlsurrogate: missing model file name (the first argument is the "
               "keyword '{}'). Usage: {}",
               model_file, USAGE);

  bool have_grid = false, have_spacing = false, have_device = false, have_threads = false,
       have_batch = false, have_ionion = false;
  int iarg = 1;
  while (iarg < narg) {
    const std::string kw = arg[iarg];
    bool *seen = nullptr;
    int nvalues = 1;
    if (kw == "grid") {
      seen = &have_grid;
      nvalues = 3;
    } else if (kw == "spacing") {
      seen = &have_spacing;
    } else if (kw == "device") {
      seen = &have_device;
    } else if (kw == "threads") {
      seen = &have_threads;
    } else if (kw == "batch") {
      seen = &have_batch;
    } else if (kw == "ionion") {
      seen = &have_ionion;
    } else {
      error->all(FLERR,
                 "pair_style mlsurrogate: unknown keyword '{}'. Valid keywords: grid, spacing, "
                 "device, threads, batch, ionion. Usage: {}",
                 kw, USAGE);
    }
    if (*seen) error->all(FLERR, "pair_style mlsurrogate: keyword '{}' is given twice", kw);
    *seen = true;
    if (iarg + nvalues >= narg)
      error->all(FLERR, "pair_style mlsurrogate: keyword '{}' needs {} value{}. Usage: {}", kw,
                 nvalues, nvalues > 1 ? "s" : "", USAGE);

    if (kw == "grid") {
      for (int d = 0; d < 3; ++d)
        if (!parse_positive_int(arg[iarg + 1 + d], grid[d]))
          error->all(FLERR,
                     "pair_style mlsurrogate: grid needs three positive integers nx ny nz, "
                     "got '{} {} {}'",
                     arg[iarg + 1], arg[iarg + 2], arg[iarg + 3]);
    } else if (kw == "spacing") {
      if (!parse_positive_double(arg[iarg + 1], spacing))
        error->all(FLERR,
                   "pair_style mlsurrogate: spacing needs a positive length (distance units), "
                   "got '{}'",
                   arg[iarg + 1]);
    } else if (kw == "device") {
      device = arg[iarg + 1];
      if (!valid_device_name(device))
        error->all(FLERR, "pair_style mlsurrogate: device must be cpu, cuda or cuda:N, got '{}'",
                   device);
    } else if (kw == "threads") {
      if (!parse_positive_int(arg[iarg + 1], nthreads))
        error->all(FLERR, "pair_style mlsurrogate: threads needs a positive integer, got '{}'",
                   arg[iarg + 1]);
    } else if (kw == "ionion") {
      const std::string value = arg[iarg + 1];
      if (value != "on" && value != "off")
        error->all(FLERR, "pair_style mlsurrogate: ionion must be on or off, got '{}'", value);
      ionion = value == "on";
    } else if (kw == "batch") {
      if (!parse_positive_int(arg[iarg + 1], batch))
        error->all(FLERR,
                   "pair_style mlsurrogate: batch needs a positive integer (grid points per "
                   "network call), got '{}'",
                   arg[iarg + 1]);
    }
    iarg += 1 + nvalues;
  }
  if (have_grid && have_spacing)
    error->all(FLERR,
               "pair_style mlsurrogate: give either 'grid nx ny nz' or 'spacing h', not both");

  // The model: the file must exist and load as TorchScript on the device.

  if (!platform::file_is_readable(model_file))
    error->all(FLERR, "pair_style mlsurrogate: cannot open model file '{}': {}", model_file,
               utils::getsyserror());

  std::string problem = mlsurrogate::TorchModel::check_device(device);
  if (!problem.empty()) error->all(FLERR, "pair_style mlsurrogate: {}", problem);
  if (device == "cuda") {
    // one GPU per rank: the node-local rank picks the device
    MPI_Comm node;
    MPI_Comm_split_type(world, MPI_COMM_TYPE_SHARED, comm->me, MPI_INFO_NULL, &node);
    int local_rank = 0;
    MPI_Comm_rank(node, &local_rank);
    MPI_Comm_free(&node);
    device = fmt::format("cuda:{}", local_rank % mlsurrogate::TorchModel::cuda_device_count());
  }

  // One thread per rank unless told otherwise: libtorch's default (all cores in every
  // rank) oversubscribes MPI runs.
  mlsurrogate::TorchModel::set_num_threads(std::max(nthreads, 1));

  try {
    model = std::make_unique<mlsurrogate::TorchModel>(model_file, device);
    cutmax = model->number_attr("cutoff", 0.0);
  } catch (const std::exception &e) {
    problem = e.what();
    model.reset();
  }
  if (!problem.empty())
    error->all(FLERR, "pair_style mlsurrogate: cannot load TorchScript model '{}': {}", model_file,
               problem);
}

/* ----------------------------------------------------------------------
   pair_coeff * * Elem_1 ... Elem_ntypes
------------------------------------------------------------------------- */

void PairMLSurrogate::coeff(int narg, char **arg)
{
  if (!allocated) allocate();

  const int ntypes = atom->ntypes;
  if (narg != 2 + ntypes)
    error->all(FLERR,
               "pair_coeff for mlsurrogate: expected '* * Elem_1 ... Elem_{}' (one element per "
               "atom type), got {} argument(s)",
               ntypes, narg);
  if (strcmp(arg[0], "*") != 0 || strcmp(arg[1], "*") != 0)
    error->all(FLERR,
               "pair_coeff for mlsurrogate: the first two arguments must be '* *', got '{} {}'",
               arg[0], arg[1]);

  std::vector<std::string> known;    // elements the model was trained on, if it says
  std::string problem;
  if (model) {
    try {
      known = model->string_list_attr("elements");
    } catch (const std::exception &e) {
      problem = e.what();
    }
  }
  if (!problem.empty())
    error->all(FLERR, "pair_coeff for mlsurrogate: model '{}': {}", model_file, problem);

  for (int i = 1; i <= ntypes; ++i) {
    const std::string elem = arg[1 + i];
    if (elem == "NULL")
      error->all(FLERR,
                 "pair_coeff for mlsurrogate: atom type {} is NULL; every atom type needs an "
                 "element (all atoms enter the electronic structure)",
                 i);
    if (!known.empty()) {
      bool found = false;
      for (const auto &k : known) found = found || (k == elem);
      if (!found)
        error->all(FLERR,
                   "pair_coeff for mlsurrogate: element '{}' (atom type {}) is not in model "
                   "'{}', which knows: {}",
                   elem, i, model_file, utils::join_words(known, " "));
    }
    type_element[i] = elem;
  }

  for (int i = 1; i <= ntypes; ++i)
    for (int j = i; j <= ntypes; ++j) setflag[i][j] = 1;
}

/* ---------------------------------------------------------------------- */

void PairMLSurrogate::init_style()
{
  if (!model) error->all(FLERR, "pair_style mlsurrogate: no model loaded");
  if (force->newton_pair == 0) error->all(FLERR, "pair_style mlsurrogate requires newton pair on");
  if (strcmp(update->unit_style, "metal") != 0)
    error->all(FLERR,
               "pair_style mlsurrogate needs 'units metal' (eV, Angstrom), the units of the "
               "model; got 'units {}'",
               update->unit_style);
  if (domain->dimension != 3 || !domain->xperiodic || !domain->yperiodic || !domain->zperiodic)
    error->all(FLERR, "pair_style mlsurrogate needs a 3d box periodic in x, y and z");

  std::string problem;
  try {
    model->num_energies();  // needs the network and functional submodules
    const std::vector<std::string> elements = model->string_list_attr("elements");
    const std::vector<double> charges = model->number_list_attr("valence_charges");
    mlsurrogate::BispectrumSettings settings;
    settings.rcutfac = model->number_attr("rcutfac", 0.0);
    settings.rfac0 = model->number_attr("rfac0", 0.0);
    settings.twojmax = static_cast<int>(model->number_attr("twojmax", -1));
    settings.radius = model->number_list_attr("radius");
    settings.weight = model->number_list_attr("weight");
    settings.rmin0 = model->number_attr("rmin0", 0.0);
    settings.switchflag = model->bool_attr("switchflag");
    settings.bzeroflag = model->bool_attr("bzeroflag");
    settings.quadraticflag = model->bool_attr("quadraticflag");
    settings.bnormflag = model->bool_attr("bnormflag");
    settings.wselfallflag = model->bool_attr("wselfallflag");
    if (model->bool_attr("chemflag"))
      for (std::size_t e = 0; e < elements.size(); ++e) settings.chem_map.push_back((int) e);
    settings.validate();
    kernel = std::make_unique<mlsurrogate::GridDescriptors>(settings, std::max(nthreads, 1));
    type_index.assign(atom->ntypes + 1, -1);
    type_charge.assign(atom->ntypes + 1, 0.0);
    for (int t = 1; t <= atom->ntypes; ++t) {
      const auto found = std::find(elements.begin(), elements.end(), type_element[t]);
      type_index[t] = static_cast<int>(found - elements.begin());
      type_charge[t] = charges.at(type_index[t]);
    }
  } catch (const std::exception &e) {
    problem = e.what();
  }
  if (!problem.empty())
    error->all(FLERR, "pair_style mlsurrogate: model '{}' is not a usable mlsurrogate model: {}",
               model_file, problem);
  check_ion_ion();
  // Ghost atoms within the descriptor cutoff are what the kernel needs; it bins them
  // itself, so the neighbor list is not used.
  neighbor->add_request(this, NeighConst::REQ_FULL);
}

/* ----------------------------------------------------------------------
   The total free energy needs E_ii, the Ewald energy of the valence charges: LAMMPS's
   own coul/long + kspace, with every atom's charge equal to its valence charge.
------------------------------------------------------------------------- */

void PairMLSurrogate::check_ion_ion()
{
  if (!ionion) {
    if (comm->me == 0)
      error->warning(FLERR,
                     "pair_style mlsurrogate: ionion off: energies and forces lack the ion-ion "
                     "term E_ii");
    return;
  }
  std::string charges;
  for (int t = 1; t <= atom->ntypes; ++t)
    charges += fmt::format("set type {} charge {}; ", t, type_charge[t]);
  const bool have_coulomb = force->pair_match("coul/long", 0) != nullptr;
  if (!have_coulomb || force->kspace == nullptr)
    error->all(FLERR,
               "pair_style mlsurrogate: the ion-ion energy E_ii is missing. Use 'pair_style "
               "hybrid/overlay mlsurrogate {} ... coul/long <cutoff>' with 'pair_coeff * * "
               "coul/long', 'kspace_style ewald 1e-10' (or pppm), atom_style charge and "
               "'{}'; or add 'ionion off' to pair_style mlsurrogate to run without E_ii",
               model_file, charges);
  if (!atom->q_flag)
    error->all(FLERR,
               "pair_style mlsurrogate: E_ii needs atom charges (atom_style charge) set to the "
               "valence charges: {}",
               charges);
  int wrong = 0;
  for (int i = 0; i < atom->nlocal; ++i)
    if (std::fabs(atom->q[i] - type_charge[atom->type[i]]) > 1e-10) wrong = atom->type[i];
  MPI_Allreduce(MPI_IN_PLACE, &wrong, 1, MPI_INT, MPI_MAX, world);
  if (wrong)
    error->all(FLERR,
               "pair_style mlsurrogate: atoms of type {} ({}) carry a charge other than the "
               "model's valence charge {}; set them with: {}",
               wrong, type_element[wrong], type_charge[wrong], charges);
}

/* ---------------------------------------------------------------------- */

void PairMLSurrogate::finish()
{
  std::array<double, 6> slowest{};
  MPI_Reduce(seconds.data(), slowest.data(), (int) seconds.size(), MPI_DOUBLE, MPI_MAX, 0, world);
  if (comm->me != 0) return;
  const char *names[] = {"descriptors", "inference", "functional", "back-propagation",
                         "force contraction", "communication"};
  double total = 0.0;
  for (const double t : slowest) total += t;
  std::string text = "pair_style mlsurrogate timing (slowest rank, seconds):\n";
  for (std::size_t k = 0; k < slowest.size(); ++k)
    text += fmt::format("  {:<18} {:12.4f} {:6.1f}%\n", names[k], slowest[k],
                        total > 0.0 ? 100.0 * slowest[k] / total : 0.0);
  utils::logmesg(lmp, text);
}

double PairMLSurrogate::init_one(int i, int j)
{
  if (setflag[i][j] == 0) error->all(FLERR, "All pair coeffs are not set");
  if (cutmax <= 0.0)
    error->all(FLERR,
               "pair_style mlsurrogate: model '{}' defines no cutoff (expected a positive "
               "TorchScript attribute 'cutoff')",
               model_file);
  return cutmax;
}

/* ----------------------------------------------------------------------
   grid points per box vector: the grid keyword, or the spacing keyword, or the model's
   training grid spacing
------------------------------------------------------------------------- */

void PairMLSurrogate::grid_shape(int shape[3]) const
{
  if (grid[0] > 0) {
    for (int d = 0; d < 3; ++d) shape[d] = grid[d];
    return;
  }
  const double h = spacing > 0.0 ? spacing : model->number_attr("grid_spacing", 0.0);
  if (h <= 0.0)
    error->all(FLERR,
               "pair_style mlsurrogate: no grid size: give 'grid nx ny nz' or 'spacing h' (the "
               "model has no grid_spacing)");
  const std::array<double, 3> lengths = box_vector_lengths(*domain);
  for (int d = 0; d < 3; ++d) shape[d] = std::max(1, static_cast<int>(std::lround(lengths[d] / h)));
}

/* ----------------------------------------------------------------------
   The grid must resolve what the descriptors see: a spacing beyond half the descriptor
   cutoff samples each atom's neighbourhood with a handful of points (an error); beyond
   3x the training spacing the LDOS integrals lose accuracy (for the bundled model 3.75x
   moved the energy by 23 meV/atom, README "Grid for MD"): a warning.
------------------------------------------------------------------------- */

void PairMLSurrogate::check_grid_spacing(const int shape[3])
{
  const std::array<double, 3> lengths = box_vector_lengths(*domain);
  int coarsest = 0;
  for (int d = 1; d < 3; ++d)
    if (lengths[d] / shape[d] > lengths[coarsest] / shape[coarsest]) coarsest = d;
  const double h = lengths[coarsest] / shape[coarsest];
  const double trained = model->number_attr("grid_spacing", 0.0);
  const std::string fix = fmt::format(
      "use more grid points (grid nx ny nz) or 'spacing h'{}",
      trained > 0.0 ? fmt::format("; the model was trained at {:.3f} A", trained) : "");
  if (h > 0.5 * cutmax)
    error->all(FLERR,
               "pair_style mlsurrogate: grid spacing {:.3f} A along box vector {} is more than "
               "half the descriptor cutoff {:.3f} A ({} points for {:.3f} A): {}",
               h, coarsest + 1, cutmax, shape[coarsest], lengths[coarsest], fix);
  if (trained > 0.0 && h > 3.0 * trained && comm->me == 0)
    error->warning(FLERR,
                   "pair_style mlsurrogate: grid spacing {:.3f} A along box vector {} is more "
                   "than 3x the training spacing {:.3f} A: energies and forces lose accuracy "
                   "(see benchmarks/grid_convergence.py); {}",
                   h, coarsest + 1, trained, fix);
}

/* ----------------------------------------------------------------------
   An atom exactly on a grid point is left out of that point's descriptors (as in
   compute sna/grid: its direction is undefined), so the energy jumps as it moves off.
   Perfect lattices commensurate with the grid start that way: say so at setup.
------------------------------------------------------------------------- */

void PairMLSurrogate::warn_atoms_on_grid_points(const int shape[3])
{
  int count = 0;
  for (int i = 0; i < atom->nlocal; ++i) {
    double lamda[3];
    if (domain->triclinic)
      domain->x2lamda(atom->x[i], lamda);
    else
      for (int d = 0; d < 3; ++d) lamda[d] = (atom->x[i][d] - domain->boxlo[d]) / domain->prd[d];
    bool on_point = true;
    for (int d = 0; d < 3 && on_point; ++d) {
      const double steps = lamda[d] * shape[d];
      on_point = std::abs(steps - std::round(steps)) * domain->prd[d] / shape[d] < 1e-10;
    }
    count += on_point ? 1 : 0;
  }
  int total = 0;
  MPI_Allreduce(&count, &total, 1, MPI_INT, MPI_SUM, world);
  if (total > 0 && comm->me == 0)
    error->warning(FLERR,
                   "pair_style mlsurrogate: {} atoms sit exactly on grid points and are left out "
                   "of those points' descriptors (as in compute sna/grid), so the energy jumps "
                   "when they move off; displace them slightly first (e.g. displace_atoms all "
                   "random 0.01 0.01 0.01 <seed>)",
                   total);
}

/* ---------------------------------------------------------------------- */

void PairMLSurrogate::compute(int eflag, int vflag)
{
  ev_init(eflag, vflag);

  double **x = atom->x;
  double **f = atom->f;
  const int *type = atom->type;
  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;

  mlsurrogate::Cell cell;
  cell.h = {domain->xprd, 0.0, 0.0, domain->xy, domain->yprd, 0.0,
            domain->xz,   domain->yz, domain->zprd};
  int shape[3];
  grid_shape(shape);
  if (update->setupflag) {
    check_grid_spacing(shape);
    warn_atoms_on_grid_points(shape);
  }
  mlsurrogate::GridBlock block;
  for (int d = 0; d < 3; ++d) {
    const double lo = domain->triclinic ? domain->sublo_lamda[d]
                                        : (domain->sublo[d] - domain->boxlo[d]) / domain->prd[d];
    const double hi = domain->triclinic ? domain->subhi_lamda[d]
                                        : (domain->subhi[d] - domain->boxlo[d]) / domain->prd[d];
    const auto range = mlsurrogate::owned_grid_range(shape[d], lo, hi);
    block.shape[d] = shape[d];
    block.lo[d] = range.first;
    block.hi[d] = range.second;
  }
  const int npoints = static_cast<int>(block.num_points());
  const std::size_t ngrid = (std::size_t) shape[0] * shape[1] * shape[2];
  const double voxel = domain->xprd * domain->yprd * domain->zprd / (double) ngrid;

  // positions relative to the box origin: grid point (i, j, k) sits at (i/nx, j/ny, k/nz)
  std::vector<double> pos(3 * (std::size_t) nall);
  std::vector<int> kind(nall);
  for (int i = 0; i < nall; ++i) {
    for (int d = 0; d < 3; ++d) pos[3 * i + d] = x[i][d] - domain->boxlo[d];
    kind[i] = type_index[type[i]];
  }
  const mlsurrogate::AtomsView atoms{pos.data(), kind.data(), (std::size_t) nall};
  const int nfeatures = kernel->num_descriptors();
  const int nenergies = model->num_energies();

  enum Stage { DESCRIPTORS, INFERENCE, FUNCTIONAL, BACKPROP, CONTRACTION, COMMUNICATION };
  auto timed = [this](Stage stage, auto &&work) {
    const double start = platform::walltime();
    work();
    seconds[stage] += platform::walltime() - start;
  };
  auto allreduce = [&](double *data, int count) {
    timed(COMMUNICATION,
          [&] { MPI_Allreduce(MPI_IN_PLACE, data, count, MPI_DOUBLE, MPI_SUM, world); });
  };
  // Model errors (e.g. a predicted LDOS holding fewer than N_val electrons) become
  // LAMMPS errors; steps after a reduction fail identically on every rank.
  std::string problem;
  auto guarded = [&](auto &&work) {
    try {
      work();
    } catch (const std::exception &e) {
      problem = e.what();
    }
  };

  // 1. local: descriptors, LDOS and the partial DOS of the owned grid points
  std::vector<double> descriptors((std::size_t) npoints * nfeatures);
  std::vector<double> ldos;
  std::vector<double> dos(nenergies, 0.0);
  guarded([&] {
    if (npoints == 0) return;
    timed(DESCRIPTORS, [&] { kernel->compute(cell, block, atoms, descriptors.data()); });
    timed(INFERENCE, [&] {
      const int step = batch > 0 ? batch : npoints;
      for (int first = 0; first < npoints; first += step) {
        const int count = std::min(step, npoints - first);
        const std::vector<double> part = model->predict_ldos(
            descriptors.data() + (std::size_t) first * nfeatures, count, nfeatures);
        ldos.insert(ldos.end(), part.begin(), part.end());
      }
    });
    timed(FUNCTIONAL, [&] { dos = model->dos(ldos, voxel); });
  });
  if (!problem.empty()) error->one(FLERR, "pair_style mlsurrogate: {}", problem);
  allreduce(dos.data(), nenergies);

  double electrons = 0.0;
  for (int i = 0; i < nlocal; ++i) electrons += type_charge[type[i]];
  allreduce(&electrons, 1);

  // 2. global: Fermi level; density gathered on the full grid on every rank.
  // owned[p]: full-grid index of the p-th owned point (block order, last index fastest)
  std::vector<std::size_t> owned;
  owned.reserve(npoints);
  for (int i = block.lo[0]; i < block.hi[0]; ++i)
    for (int j = block.lo[1]; j < block.hi[1]; ++j)
      for (int k = block.lo[2]; k < block.hi[2]; ++k)
        owned.push_back(((std::size_t) i * shape[1] + j) * shape[2] + k);
  double mu = 0.0;
  std::vector<double> density(ngrid, 0.0);
  guarded([&] {
    timed(FUNCTIONAL, [&] {
      mu = model->fermi_level(dos, electrons);
      if (npoints == 0) return;
      const std::vector<double> local = model->density(ldos, mu);
      for (int p = 0; p < npoints; ++p) density[owned[p]] = local[p];
    });
  });
  if (!problem.empty()) error->all(FLERR, "pair_style mlsurrogate: {}", problem);
  allreduce(density.data(), (int) ngrid);

  mlsurrogate::TorchModel::GlobalTerms global;
  std::vector<double> phi_local(npoints);
  double fermi_shift = 0.0;
  guarded([&] {
    timed(FUNCTIONAL, [&] {
      global = model->global_terms(dos, density, shape, cell.h.data(), mu);
      for (int p = 0; p < npoints; ++p) phi_local[p] = global.phi[owned[p]];
      if (npoints > 0) fermi_shift = model->fermi_shift_part(ldos, mu, phi_local);
    });
  });
  if (!problem.empty()) error->all(FLERR, "pair_style mlsurrogate: {}", problem);
  allreduce(&fermi_shift, 1);

  // 3. local: dA/dLDOS, back-propagation to dA/dB, adjoint contraction to forces
  const bool per_atom = eflag_atom || vflag_atom;
  std::vector<double> dE_dR(3 * (std::size_t) nall, 0.0), dE_dstrain(9, 0.0);
  std::vector<double> strain_per_atom(vflag_atom ? 9 * (std::size_t) nall : 0);
  std::vector<double> strain_per_point(vflag_atom ? 9 * (std::size_t) npoints : 0);
  std::vector<double> band_points, potential_points;
  guarded([&] {
    if (per_atom)
      timed(FUNCTIONAL, [&] {
        potential_points = model->potential_points(density, shape, cell.h.data());
        if (npoints > 0) band_points = model->band_free_points(ldos, mu, voxel);
      });
    if (npoints == 0) return;
    std::vector<double> dA_dldos, beta;
    timed(FUNCTIONAL,
          [&] { dA_dldos = model->ldos_gradient(mu, phi_local, dos, fermi_shift, voxel); });
    timed(BACKPROP, [&] {
      beta = model->descriptor_gradient(descriptors.data(), npoints, nfeatures, dA_dldos);
    });
    timed(CONTRACTION, [&] {
      kernel->gradient(cell, block, atoms, beta.data(), dE_dR.data(), dE_dstrain.data(),
                       vflag_atom ? strain_per_atom.data() : nullptr,
                       vflag_atom ? strain_per_point.data() : nullptr);
    });
  });
  if (!problem.empty()) error->one(FLERR, "pair_style mlsurrogate: {}", problem);
  for (int i = 0; i < nall; ++i)
    for (int d = 0; d < 3; ++d) f[i][d] -= dE_dR[3 * i + d];

  std::map<std::string, double> terms(global.terms.begin(), global.terms.end());
  // compute pair sums pvector over ranks: the replicated values go on rank 0 only
  extras.fill(0.0);
  if (comm->me == 0)
    extras = {terms["band"], terms["entropy"],   terms["fermi_level"], terms["hartree"],
              terms["xc"],   terms["electrons"], terms["electronic"]};
  if (eflag_global && comm->me == 0) eng_vdwl += terms["electronic"];

  // virial = -dA/dstrain (symmetric part): the descriptor part of the grid points, the
  // band term (D scales with the voxel volume: (E_band - TS) I) and the rest of the
  // explicit cell dependence, replicated on every rank (see mlsurrogate.physics): mu
  // keeps N_val, Phi[n; cell], and the background term below
  std::array<double, 9> explicit_rest{};
  if (vflag_either) {
    const double c = terms["edos_at_mu"] + fermi_shift;
    for (int a = 0; a < 3; ++a)
      for (int b = 0; b < 3; ++b)
        explicit_rest[3 * a + b] =
            0.5 * (global.phi_strain[3 * a + b] + global.phi_strain[3 * b + a]);
    double isotropic_rest = -c * electrons / terms["dos_at_mu"];
    // LAMMPS's Ewald and PPPM put the neutralizing-background energy of a charged cell,
    // -pi Q^2 k_e / (2 g^2 V), into the energy but not into the virial. Our cell of ions
    // (Q = N_val) is charged by design, so its partner E_ii needs that term: it scales
    // as 1/V, so W_aa gains it once.
    if (ionion && force->kspace) {
      const double g = force->kspace->g_ewald;
      const double pi = std::acos(-1.0);
      isotropic_rest += pi * electrons * electrons * force->qqrd2e /
          (2.0 * g * g * domain->xprd * domain->yprd * domain->zprd);
    }
    for (int a = 0; a < 3; ++a) explicit_rest[4 * a] += isotropic_rest;
  }
  if (vflag_global)
    for (int k = 0; k < 6; ++k) {
      double strain = symmetric_part(dE_dstrain.data(), k);
      if (comm->me == 0)
        strain += symmetric_part(explicit_rest.data(), k) + (k < 3 ? terms["band_free"] : 0.0);
      virial[k] -= strain;
    }
  if (per_atom)
    tally_per_atom(cell, block, atoms, owned, band_points, potential_points, strain_per_atom,
                   strain_per_point, explicit_rest, electrons);
}

/* ----------------------------------------------------------------------
   Per-atom energy and virial: a convention, since the grid energy belongs to no atom.
   Each grid point's share of A - E_ii (band_free_points + potential_points) goes to the
   atoms by Becke's fuzzy Voronoi cells (GridDescriptors::partition). Each (point, atom)
   term of the descriptor virial goes half to the atom and half to the point's owners
   (LAMMPS's many-body rule with the point as the centre); the band term follows the
   point's owners; the explicit cell terms, and points with no atom within the cutoff,
   are shared by valence charge. Ghost atoms' shares return to their owners through
   LAMMPS's reverse communication (newton on).
------------------------------------------------------------------------- */

void PairMLSurrogate::tally_per_atom(const mlsurrogate::Cell &cell,
                                     const mlsurrogate::GridBlock &block,
                                     const mlsurrogate::AtomsView &atoms,
                                     const std::vector<std::size_t> &owned,
                                     const std::vector<double> &band_points,
                                     const std::vector<double> &potential_points,
                                     const std::vector<double> &strain_per_atom,
                                     const std::vector<double> &strain_per_point,
                                     const std::array<double, 9> &explicit_rest, double electrons)
{
  constexpr int WIDTH = 8;    // energy, band energy, six virial components
  const std::size_t npoints = owned.size();
  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;
  std::vector<double> values(WIDTH * npoints, 0.0), share(WIDTH * (std::size_t) nall, 0.0);
  for (std::size_t p = 0; p < npoints; ++p) {
    double *v = &values[WIDTH * p];
    v[0] = band_points[p] + potential_points[owned[p]];
    v[1] = band_points[p];
    if (vflag_atom)
      for (int k = 0; k < 6; ++k) v[2 + k] = 0.5 * symmetric_part(&strain_per_point[9 * p], k);
  }
  std::vector<double> unclaimed;
  std::string problem;
  try {
    unclaimed = kernel->partition(cell, block, atoms, values.data(), WIDTH, share.data());
  } catch (const std::exception &e) {
    problem = e.what();
  }
  if (!problem.empty()) error->one(FLERR, "pair_style mlsurrogate: {}", problem);
  MPI_Allreduce(MPI_IN_PLACE, unclaimed.data(), WIDTH, MPI_DOUBLE, MPI_SUM, world);

  for (int i = 0; i < nall; ++i) {
    const double by_charge = i < nlocal ? type_charge[atom->type[i]] / electrons : 0.0;
    const double *s = &share[WIDTH * (std::size_t) i];
    if (eflag_atom) eatom[i] += s[0] + by_charge * unclaimed[0];
    if (!vflag_atom) continue;
    for (int k = 0; k < 6; ++k) {
      const double band = k < 3 ? s[1] + by_charge * unclaimed[1] : 0.0;
      const double strain = 0.5 * symmetric_part(&strain_per_atom[9 * (std::size_t) i], k) +
          s[2 + k] + band + by_charge * (unclaimed[2 + k] + symmetric_part(explicit_rest.data(), k));
      vatom[i][k] -= strain;
    }
  }
}
