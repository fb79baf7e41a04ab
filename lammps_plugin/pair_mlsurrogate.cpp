#include "pair_mlsurrogate.h"

#include "electronic_step.h"
#include "torch_model.h"

#include "grid_descriptors.hpp"

#include "atom.h"
#include "comm.h"
#include "domain.h"
#include "error.h"
#include "force.h"
#include "kspace.h"
#include "memory.h"
#include "platform.h"
#include "update.h"
#include "utils.h"

#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <exception>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <numeric>
#include <string>

using namespace LAMMPS_NS;

namespace {

const char *const USAGE =
    "pair_style mlsurrogate model.pt [grid nx ny nz | spacing h] [device cpu|cuda|cuda:N] "
    "[threads N] [batch M] [ionion on|off] [uncertainty N [dropout T [seed S]] [file FILE] "
    "[warn F]]";

// the table of ensemble deviations, by default (deepmd-kit's name)
const char *const DEFAULT_DEVIATION_FILE = "model_devi.out";

// atoms named by the force-deviation warning
constexpr int WORST_ATOMS = 5;

// two atoms closer than this (A) have no defined descriptors or Becke cells
constexpr double COINCIDENT_DISTANCE = 1e-8;

bool is_keyword(const std::string &word)
{
  return word == "grid" || word == "spacing" || word == "device" || word == "threads" ||
      word == "batch" || word == "ionion" || word == "uncertainty" || word == "dropout" ||
      word == "seed" || word == "file" || word == "warn";
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

// Memory this process may still use (bytes): MemAvailable of /proc/meminfo, else the
// physical memory
double available_memory()
{
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  double kib = 0.0;
  while (meminfo >> key >> kib) {
    if (key == "MemAvailable:") return 1024.0 * kib;
    meminfo.ignore(std::numeric_limits<std::streamsize>::max(), '\n');
  }
  return static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGESIZE));
}

// The payload of the rank with the lowest key (no key: +infinity), on every rank;
// false if no rank has one. For reporting the first bad atom found on any rank.
template <std::size_t N>
bool lowest_report(MPI_Comm world, double key, std::array<double, N> &payload)
{
  int me = 0;
  MPI_Comm_rank(world, &me);
  struct {
    double key;
    int rank;
  } mine{key, me}, lowest{};
  MPI_Allreduce(&mine, &lowest, 1, MPI_DOUBLE_INT, MPI_MINLOC, world);
  if (std::isinf(lowest.key)) return false;
  MPI_Bcast(payload.data(), static_cast<int>(N), MPI_DOUBLE, lowest.rank, world);
  return true;
}

// Standard deviation over the members (population, as numpy.std and deepmd-kit)
double spread(const std::vector<double> &values)
{
  const double n = static_cast<double>(values.size());
  const double mean = std::accumulate(values.begin(), values.end(), 0.0) / n;
  double sum = 0.0;
  for (const double v : values) sum += (v - mean) * (v - mean);
  return std::sqrt(sum / n);
}

// Runs the electronic step `work`; a failure ends the run with its message, through
// error->all when every rank has it alike, else error->one.
template <class Work>
auto electronic_or_error(Error *error, Work &&work) -> decltype(work())
{
  decltype(work()) result;
  std::string problem;
  bool collective = false;
  try {
    result = work();
  } catch (const mlsurrogate::StepError &e) {
    problem = e.what();
    collective = e.collective();
  } catch (const std::exception &e) {
    problem = e.what();
  }
  if (!problem.empty()) {
    if (collective) error->all(FLERR, "pair_style mlsurrogate: {}", problem);
    error->one(FLERR, "pair_style mlsurrogate: {}", problem);
  }
  return result;
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
  uncertainty_every = 0;
  dropout_passes = 0;
  dropout_seed = 0;
  uncertainty_networks.clear();
  deviation_file = DEFAULT_DEVIATION_FILE;
  warn_force = 0.0;
  if (deviation_out.is_open()) deviation_out.close();
  member_forces.clear();
  atom_deviation.clear();
  max_force_deviation = energy_deviation = 0.0;
  comm_reverse = 0;
  electronic.reset();
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

// A positive integer value of a keyword, with LAMMPS's parser; `meaning` says what it is.
int PairMLSurrogate::positive_int(const std::string &keyword, const char *word,
                                  const char *meaning)
{
  const int value = utils::is_integer(word) ? utils::inumeric(FLERR, word, false, lmp) : 0;
  if (value <= 0)
    error->all(FLERR, "pair_style mlsurrogate: {} needs {}, got '{}'", keyword, meaning, word);
  return value;
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

  std::vector<std::string> seen;
  int iarg = 1;
  while (iarg < narg) {
    const std::string kw = arg[iarg];
    if (!is_keyword(kw))
      error->all(FLERR,
                 "pair_style mlsurrogate: unknown keyword '{}'. Valid keywords: grid, spacing, "
                 "device, threads, batch, ionion, uncertainty, dropout, seed, file, warn. "
                 "Usage: {}",
                 kw, USAGE);
    if (std::find(seen.begin(), seen.end(), kw) != seen.end())
      error->all(FLERR, "pair_style mlsurrogate: keyword '{}' is given twice", kw);
    seen.push_back(kw);
    const int nvalues = kw == "grid" ? 3 : 1;
    if (iarg + nvalues >= narg)
      error->all(FLERR, "pair_style mlsurrogate: keyword '{}' needs {} value{}. Usage: {}", kw,
                 nvalues, nvalues > 1 ? "s" : "", USAGE);
    const char *value = arg[iarg + 1];

    if (kw == "grid") {
      for (int d = 0; d < 3; ++d)
        grid[d] = positive_int(kw, arg[iarg + 1 + d], "three positive integers nx ny nz");
    } else if (kw == "spacing") {
      spacing = utils::is_double(value) ? utils::numeric(FLERR, value, false, lmp) : 0.0;
      if (!std::isfinite(spacing) || spacing <= 0.0)
        error->all(FLERR,
                   "pair_style mlsurrogate: spacing needs a positive length (distance units), "
                   "got '{}'",
                   value);
    } else if (kw == "device") {
      device = value;
      if (!valid_device_name(device))
        error->all(FLERR, "pair_style mlsurrogate: device must be cpu, cuda or cuda:N, got '{}'",
                   device);
    } else if (kw == "threads") {
      nthreads = positive_int(kw, value, "a positive integer");
    } else if (kw == "ionion") {
      ionion = utils::logical(FLERR, value, false, lmp) == 1;
    } else if (kw == "batch") {
      batch = positive_int(kw, value, "a positive integer (grid points per network call)");
    } else if (kw == "uncertainty") {
      uncertainty_every = positive_int(kw, value, "a positive integer (steps between evaluations)");
    } else if (kw == "dropout") {
      dropout_passes = positive_int(kw, value, "a number of passes >= 2 (sampled networks)");
      if (dropout_passes < 2)
        error->all(FLERR,
                   "pair_style mlsurrogate: dropout needs at least 2 passes (one sampled network "
                   "has no spread), got '{}'",
                   value);
    } else if (kw == "seed") {
      dropout_seed = utils::is_integer(value) ? utils::inumeric(FLERR, value, false, lmp) : -1;
      if (dropout_seed < 0)
        error->all(FLERR,
                   "pair_style mlsurrogate: seed needs an integer 0 ... 2147483647, got '{}'",
                   value);
    } else if (kw == "file") {
      deviation_file = value;
    } else if (kw == "warn") {
      warn_force = utils::is_double(value) ? utils::numeric(FLERR, value, false, lmp) : 0.0;
      if (!std::isfinite(warn_force) || warn_force <= 0.0)
        error->all(FLERR,
                   "pair_style mlsurrogate: warn needs a positive force deviation (eV/A), "
                   "got '{}'",
                   value);
    }
    iarg += 1 + nvalues;
  }
  if (grid[0] > 0 && spacing > 0.0)
    error->all(FLERR,
               "pair_style mlsurrogate: give either 'grid nx ny nz' or 'spacing h', not both");
  const auto given = [&](const char *keyword) {
    return std::find(seen.begin(), seen.end(), keyword) != seen.end();
  };
  for (const char *needs_uncertainty : {"dropout", "seed", "file", "warn"})
    if (uncertainty_every == 0 && given(needs_uncertainty))
      error->all(FLERR,
                 "pair_style mlsurrogate: keyword '{}' belongs to uncertainty: add "
                 "'uncertainty N' (steps between uncertainty evaluations) before it",
                 needs_uncertainty);
  if (given("seed") && dropout_passes == 0)
    error->all(FLERR,
               "pair_style mlsurrogate: keyword 'seed' belongs to dropout: add 'dropout T' "
               "(MC-dropout passes) before it");

  // The model: the file must exist and load as an mlsurrogate model on the device.

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
  } catch (const std::exception &e) {
    problem = e.what();
  }
  if (!problem.empty()) error->all(FLERR, "pair_style mlsurrogate: {}", problem);

  if (uncertainty_every > 0) {
    const int members = model->ensemble_size();
    if (dropout_passes > 0) {
      if (members > 1)
        error->all(FLERR,
                   "pair_style mlsurrogate: dropout samples one network, but '{}' is an "
                   "ensemble of {} networks, whose uncertainty is the members' spread: drop "
                   "'dropout {}'",
                   model_file, members, dropout_passes);
      if (model->contract().dropout_probability == 0.0)
        error->all(FLERR,
                   "pair_style mlsurrogate: dropout needs a network trained with dropout, but "
                   "'{}' has none: train with dropout > 0 (training config key 'dropout'), or "
                   "use an ensemble model without 'dropout'",
                   model_file);
      for (int t = 0; t < dropout_passes; ++t)
        uncertainty_networks.push_back(mlsurrogate::NetworkChoice::sampled(dropout_seed, t));
    } else {
      if (members < 2)
        error->all(FLERR,
                   "pair_style mlsurrogate: uncertainty needs an ensemble model, but '{}' has "
                   "one network: export several checkpoints together (mlsurrogate export "
                   "A.ckpt B.ckpt ... -o model.pt), add 'dropout T' for a network trained "
                   "with dropout, or drop the uncertainty keyword",
                   model_file);
      for (int m = 0; m < members; ++m)
        uncertainty_networks.push_back(mlsurrogate::NetworkChoice::member(m));
    }
    // each network's forces on ghost atoms go to their owners
    comm_reverse = 3 * static_cast<int>(uncertainty_networks.size());
    atom_deviation.assign(std::max(atom->nmax, 1), 0.0);
    open_deviation_file();
  }
}

/* ----------------------------------------------------------------------
   The deviation table, written by rank 0 (deepmd-kit's model_devi.out layout, forces
   and energies only): opened, and truncated, when pair_style is given, before any run
------------------------------------------------------------------------- */

void PairMLSurrogate::open_deviation_file()
{
  int opened = 1;
  if (comm->me == 0) {
    deviation_out.open(deviation_file, std::ios::out | std::ios::trunc);
    opened = deviation_out.is_open() ? 1 : 0;
    if (opened)
      deviation_out << fmt::format("# {:>10} {:>18} {:>18} {:>18} {:>18} {:>18}\n", "step",
                                   "max_devi_f", "min_devi_f", "avg_devi_f", "devi_e", "devi_mu")
                    << std::flush;
  }
  MPI_Bcast(&opened, 1, MPI_INT, 0, world);
  if (!opened)
    error->all(FLERR,
               "pair_style mlsurrogate: cannot write the uncertainty file '{}': check that its "
               "directory exists and is writable, or name another with 'file FILE'",
               deviation_file);
}

/* ----------------------------------------------------------------------
   fix ID group pair N mlsurrogate devi_f 0: each local atom's force deviation (eV/A)
   of the last evaluation
------------------------------------------------------------------------- */

void *PairMLSurrogate::extract_peratom(const char *name, int &ncol)
{
  ncol = 0;
  if (uncertainty_every > 0 && strcmp(name, "devi_f") == 0) return atom_deviation.data();
  return nullptr;
}

int PairMLSurrogate::pack_reverse_comm(int n, int first, double *buf)
{
  const std::size_t width = comm_reverse;
  int m = 0;
  for (int i = first; i < first + n; ++i)
    for (std::size_t k = 0; k < width; ++k) buf[m++] = member_forces[width * i + k];
  return m;
}

void PairMLSurrogate::unpack_reverse_comm(int n, int *list, double *buf)
{
  const std::size_t width = comm_reverse;
  int m = 0;
  for (int i = 0; i < n; ++i)
    for (std::size_t k = 0; k < width; ++k) member_forces[width * list[i] + k] += buf[m++];
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
  if (!model) error->all(FLERR, "pair_coeff for mlsurrogate: no model loaded (pair_style first)");

  const mlsurrogate::ModelContract &contract = model->contract();
  for (int i = 1; i <= ntypes; ++i) {
    const std::string elem = arg[1 + i];
    if (elem == "NULL")
      error->all(FLERR,
                 "pair_coeff for mlsurrogate: atom type {} is NULL; every atom type needs an "
                 "element (all atoms enter the electronic structure)",
                 i);
    if (contract.element_index(elem) < 0)
      error->all(FLERR,
                 "pair_coeff for mlsurrogate: element '{}' (atom type {}) is not in model "
                 "'{}', which knows: {}",
                 elem, i, model_file, utils::join_words(contract.elements, " "));
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

  const mlsurrogate::ModelContract &contract = model->contract();
  type_index.assign(atom->ntypes + 1, -1);
  type_charge.assign(atom->ntypes + 1, 0.0);
  for (int t = 1; t <= atom->ntypes; ++t) {
    type_index[t] = contract.element_index(type_element[t]);
    type_charge[t] = contract.valence_charges.at(type_index[t]);
  }
  std::string problem;
  try {
    electronic = std::make_unique<mlsurrogate::ElectronicStep>(*model, std::max(nthreads, 1),
                                                               batch, world);
  } catch (const std::exception &e) {
    problem = e.what();
  }
  if (!problem.empty()) error->all(FLERR, "pair_style mlsurrogate: {}", problem);
  check_ion_ion();
  // No neighbor list: the kernel bins local and ghost atoms itself (LAMMPS still
  // communicates ghosts out to the cutoff of init_one).
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
  if (!electronic) return;
  const auto &seconds = electronic->seconds();
  std::array<double, mlsurrogate::ElectronicStep::kNumStages> slowest{};
  MPI_Reduce(seconds.data(), slowest.data(), (int) seconds.size(), MPI_DOUBLE, MPI_MAX, 0, world);
  if (comm->me != 0) return;
  double total = 0.0;
  for (const double t : slowest) total += t;
  std::string text = "pair_style mlsurrogate timing (slowest rank, seconds):\n";
  for (std::size_t k = 0; k < slowest.size(); ++k)
    text += fmt::format("  {:<18} {:12.4f} {:6.1f}%\n",
                        mlsurrogate::ElectronicStep::kStageNames[k], slowest[k],
                        total > 0.0 ? 100.0 * slowest[k] / total : 0.0);
  utils::logmesg(lmp, text);
}

double PairMLSurrogate::init_one(int i, int j)
{
  if (setflag[i][j] == 0) error->all(FLERR, "All pair coeffs are not set");
  return model->contract().cutoff;
}

/* ----------------------------------------------------------------------
   grid points per box vector: the grid keyword, or the spacing keyword, or the model's
   training grid spacing, by mlsurrogate::grid_points_for_spacing
------------------------------------------------------------------------- */

void PairMLSurrogate::grid_shape(int shape[3]) const
{
  if (grid[0] > 0) {
    for (int d = 0; d < 3; ++d) shape[d] = grid[d];
    return;
  }
  const double h = spacing > 0.0 ? spacing : model->contract().grid_spacing;
  const std::array<double, 3> lengths = box_vector_lengths(*domain);
  std::string problem;
  try {
    for (int d = 0; d < 3; ++d) shape[d] = mlsurrogate::grid_points_for_spacing(lengths[d], h);
  } catch (const std::exception &e) {
    problem = e.what();
  }
  if (!problem.empty()) error->all(FLERR, "pair_style mlsurrogate: {}", problem);
}

// The grid points this rank owns: the compute sna/grid/local rule on its subdomain
mlsurrogate::GridBlock PairMLSurrogate::owned_block(const int shape[3]) const
{
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
  return block;
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
  const double trained = model->contract().grid_spacing;
  const double cutoff = model->contract().cutoff;
  const std::string fix = fmt::format(
      "use more grid points (grid nx ny nz) or 'spacing h'; the model was trained at {:.3f} A",
      trained);
  if (h > 0.5 * cutoff)
    error->all(FLERR,
               "pair_style mlsurrogate: grid spacing {:.3f} A along box vector {} is more than "
               "half the descriptor cutoff {:.3f} A ({} points for {:.3f} A): {}",
               h, coarsest + 1, cutoff, shape[coarsest], lengths[coarsest], fix);
  if (h > 3.0 * trained && comm->me == 0)
    error->warning(FLERR,
                   "pair_style mlsurrogate: grid spacing {:.3f} A along box vector {} is more "
                   "than 3x the training spacing {:.3f} A: energies and forces lose accuracy "
                   "(see benchmarks/grid_convergence.py); {}",
                   h, coarsest + 1, trained, fix);
}

/* ----------------------------------------------------------------------
   A grid too large for a rank's memory would fail deep inside an allocation: estimate
   what the largest rank holds and compare with what its node has free per rank.
------------------------------------------------------------------------- */

void PairMLSurrogate::check_grid_memory(const mlsurrogate::GridBlock &block)
{
  const std::size_t ngrid = static_cast<std::size_t>(block.shape[0]) * block.shape[1] * block.shape[2];
  const double spacing_now = box_vector_lengths(*domain)[0] / block.shape[0];
  if (ngrid > static_cast<std::size_t>(INT_MAX))
    error->all(FLERR,
               "pair_style mlsurrogate: the grid {} x {} x {} has {} points, more than the {} "
               "one MPI reduction carries: use a coarser grid (spacing h; now {:.3f} A)",
               block.shape[0], block.shape[1], block.shape[2], ngrid, INT_MAX, spacing_now);
  MPI_Comm node;
  MPI_Comm_split_type(world, MPI_COMM_TYPE_SHARED, comm->me, MPI_INFO_NULL, &node);
  int node_ranks = 1;
  MPI_Comm_size(node, &node_ranks);
  MPI_Comm_free(&node);
  double need = static_cast<double>(electronic->bytes_needed(block.num_points(), ngrid));
  double have = available_memory() / node_ranks;
  MPI_Allreduce(MPI_IN_PLACE, &need, 1, MPI_DOUBLE, MPI_MAX, world);
  MPI_Allreduce(MPI_IN_PLACE, &have, 1, MPI_DOUBLE, MPI_MIN, world);
  if (need > have) {
    constexpr double GIB = 1024.0 * 1024.0 * 1024.0;
    error->all(FLERR,
               "pair_style mlsurrogate: the grid {} x {} x {} ({} points) needs about {:.3g} GiB "
               "on the largest of {} ranks, but {:.3g} GiB are free per rank: use more ranks or "
               "a coarser grid (spacing h; now {:.3f} A, the model was trained at {:.3f} A)",
               block.shape[0], block.shape[1], block.shape[2], ngrid, need / GIB, comm->nprocs,
               have / GIB, spacing_now, model->contract().grid_spacing);
  }
}

void PairMLSurrogate::report_grid(const int shape[3])
{
  if (comm->me != 0) return;
  const std::array<double, 3> lengths = box_vector_lengths(*domain);
  const mlsurrogate::ModelContract &contract = model->contract();
  utils::logmesg(lmp,
                 "pair_style mlsurrogate: grid {} {} {} ({} points, spacing {:.4f} {:.4f} "
                 "{:.4f} A; trained at {:.4f} A), model '{}': {} descriptors, {} energies, "
                 "{} network, cutoff {:.4f} A\n",
                 shape[0], shape[1], shape[2], (std::size_t) shape[0] * shape[1] * shape[2],
                 lengths[0] / shape[0], lengths[1] / shape[1], lengths[2] / shape[2],
                 contract.grid_spacing, model_file, electronic->num_descriptors(),
                 contract.num_energies, contract.network_dtype, contract.cutoff);
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

/* ----------------------------------------------------------------------
   Positions the descriptors cannot use: a NaN or infinite coordinate, and two atoms (or
   an atom and a periodic image of another) at the same place. Every rank checks its
   own atoms; the one with the lowest atom id is reported by all.
------------------------------------------------------------------------- */

void PairMLSurrogate::check_positions(const mlsurrogate::AtomsView &atoms)
{
  const tagint *tag = atom->tag;
  double **x = atom->x;
  const auto nonfinite = mlsurrogate::find_non_finite_atom(atoms, atom->nlocal);
  std::array<double, 4> bad{};
  if (nonfinite) bad = {(double) tag[*nonfinite], x[*nonfinite][0], x[*nonfinite][1], x[*nonfinite][2]};
  if (lowest_report(world, nonfinite ? bad[0] : INFINITY, bad))
    error->all(FLERR,
               "pair_style mlsurrogate: atom {} has a non-finite position ({}, {}, {}); check "
               "the input (data file, set or displace commands) or the previous steps (a "
               "too-long timestep makes atoms fly off)",
               (tagint) bad[0], bad[1], bad[2], bad[3]);

  const auto pair = mlsurrogate::find_coincident_atoms(atoms, atom->nlocal, COINCIDENT_DISTANCE);
  std::array<double, 8> both{};
  if (pair) {
    const std::size_t i = pair->first, j = pair->second;
    both = {(double) tag[i], (double) tag[j], x[i][0], x[i][1], x[i][2], x[j][0], x[j][1], x[j][2]};
  }
  if (lowest_report(world, pair ? both[0] : INFINITY, both))
    error->all(FLERR,
               "pair_style mlsurrogate: atoms {} and {} (or one and a periodic image of the "
               "other) are closer than {} A, at ({}, {}, {}) and ({}, {}, {}): remove the duplicate atom (e.g. "
               "create_atoms twice, or a data file listing it twice; delete_atoms overlap "
               "can remove it)",
               (tagint) both[0], (tagint) both[1], COINCIDENT_DISTANCE, both[2], both[3], both[4],
               both[5], both[6], both[7]);
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

  // positions relative to the box origin: grid point (i, j, k) sits at (i/nx, j/ny, k/nz)
  std::vector<double> pos(3 * (std::size_t) nall);
  std::vector<int> kind(nall);
  std::vector<double> charge(nlocal);
  for (int i = 0; i < nall; ++i) {
    for (int d = 0; d < 3; ++d) pos[3 * i + d] = x[i][d] - domain->boxlo[d];
    kind[i] = type_index[type[i]];
  }
  for (int i = 0; i < nlocal; ++i) charge[i] = type_charge[type[i]];
  const mlsurrogate::AtomsView atoms{pos.data(), kind.data(), (std::size_t) nall};
  check_positions(atoms);

  int shape[3];
  grid_shape(shape);
  const mlsurrogate::GridBlock block = owned_block(shape);
  if (update->setupflag) {
    check_grid_spacing(shape);
    check_grid_memory(block);
    report_grid(shape);
    warn_atoms_on_grid_points(shape);
  }

  mlsurrogate::ElectronicInput in;
  in.cell.h = {domain->xprd, 0.0, 0.0, domain->xy, domain->yprd, 0.0,
               domain->xz,   domain->yz, domain->zprd};
  in.block = block;
  in.atoms = atoms;
  in.nlocal = nlocal;
  in.charges = charge.data();
  in.virial = vflag_global;
  in.energy_per_atom = eflag_atom;
  in.virial_per_atom = vflag_atom;
  // LAMMPS's Ewald and PPPM put the neutralizing-background energy of a charged cell,
  // -pi Q^2 k_e / (2 g^2 V), into the energy but not into the virial. Our cell of ions
  // (Q = N_val) is charged by design, so its partner E_ii needs that term: it scales as
  // 1/V, so each W_aa gains it once (Q^2 times this; the step knows Q).
  if (ionion && force->kspace) {
    const double g = force->kspace->g_ewald;
    in.background_strain_per_charge2 = std::acos(-1.0) * force->qqrd2e /
        (2.0 * g * g * domain->xprd * domain->yprd * domain->zprd);
  }

  mlsurrogate::ElectronicResult result =
      electronic_or_error(error, [&] { return electronic->run(in); });

  for (int i = 0; i < nall; ++i)
    for (int d = 0; d < 3; ++d) f[i][d] -= result.dE_dR[3 * i + d];
  std::map<std::string, double> &terms = result.terms;
  // compute pair sums pvector over ranks: the replicated values go on rank 0 only
  if (uncertainty_every > 0) {
    // fix pair reads nlocal values on any step; they are filled on evaluation steps
    if (atom_deviation.size() < static_cast<std::size_t>(nlocal))
      atom_deviation.resize(nlocal, 0.0);
    if (update->setupflag || update->ntimestep % uncertainty_every == 0) ensemble_deviations(in);
  }
  extras.fill(0.0);
  if (comm->me == 0)
    extras = {terms["band"],      terms["entropy"],    terms["fermi_level"],
              terms["hartree"],   terms["xc"],         terms["electrons"],
              terms["electronic"], max_force_deviation, energy_deviation};
  if (eflag_global && comm->me == 0) eng_vdwl += terms["electronic"];
  if (vflag_global)
    for (int k = 0; k < 6; ++k) virial[k] -= result.dE_dstrain[k];
  if (eflag_atom)
    for (int i = 0; i < nall; ++i) eatom[i] += result.atom_energy[i];
  if (vflag_atom)
    for (int i = 0; i < nall; ++i)
      for (int k = 0; k < 6; ++k) vatom[i][k] -= result.atom_strain[6 * i + k];
}

/* ----------------------------------------------------------------------
   Every network of the uncertainty (ensemble members, or MC dropout's sampled networks:
   the same T networks at every evaluation) through the whole electronic step on its own,
   and the spread of their predictions as in deepmd-kit's model deviation (Zhang et al.,
   Phys. Rev. Materials 3, 023804 (2019)): per atom sqrt(<|F_i - <F_i>|^2>) over members, then its
   max, min and mean over atoms; the standard deviation of A/N and of the Fermi level.
   E_ii is the same for every member, so it leaves the spread unchanged and is left out.
------------------------------------------------------------------------- */

void PairMLSurrogate::ensemble_deviations(const mlsurrogate::ElectronicInput &in)
{
  mlsurrogate::ElectronicInput forces_only = in;
  forces_only.virial = forces_only.energy_per_atom = forces_only.virial_per_atom = false;
  std::vector<mlsurrogate::ElectronicResult> results = electronic_or_error(
      error, [&] { return electronic->run_networks(forces_only, uncertainty_networks); });

  const std::size_t members = results.size();
  const std::size_t width = 3 * members;
  const int nlocal = atom->nlocal;
  const std::size_t nall = in.atoms.n;
  member_forces.assign(width * nall, 0.0);
  for (std::size_t m = 0; m < members; ++m)
    for (std::size_t i = 0; i < nall; ++i)
      for (int d = 0; d < 3; ++d) member_forces[width * i + 3 * m + d] = -results[m].dE_dR[3 * i + d];
  comm->reverse_comm(this);

  double local[3] = {0.0, INFINITY, 0.0};    // max, min, sum over this rank's atoms
  for (int i = 0; i < nlocal; ++i) {
    const double *f = &member_forces[width * i];
    double mean[3] = {0.0, 0.0, 0.0};
    for (std::size_t m = 0; m < members; ++m)
      for (int d = 0; d < 3; ++d) mean[d] += f[3 * m + d] / static_cast<double>(members);
    double squares = 0.0;
    for (std::size_t m = 0; m < members; ++m)
      for (int d = 0; d < 3; ++d) squares += (f[3 * m + d] - mean[d]) * (f[3 * m + d] - mean[d]);
    atom_deviation[i] = std::sqrt(squares / static_cast<double>(members));
    local[0] = std::max(local[0], atom_deviation[i]);
    local[1] = std::min(local[1], atom_deviation[i]);
    local[2] += atom_deviation[i];
  }
  double max_f = 0.0, min_f = 0.0, sum_f = 0.0;
  MPI_Allreduce(&local[0], &max_f, 1, MPI_DOUBLE, MPI_MAX, world);
  MPI_Allreduce(&local[1], &min_f, 1, MPI_DOUBLE, MPI_MIN, world);
  MPI_Allreduce(&local[2], &sum_f, 1, MPI_DOUBLE, MPI_SUM, world);

  std::vector<double> energies, fermi_levels;
  for (const mlsurrogate::ElectronicResult &r : results) {
    energies.push_back(r.terms.at("electronic"));
    fermi_levels.push_back(r.terms.at("fermi_level"));
  }
  const double natoms = static_cast<double>(atom->natoms);
  max_force_deviation = max_f;
  energy_deviation = spread(energies) / natoms;
  if (comm->me == 0) {
    deviation_out << fmt::format("{:>12} {:18.10e} {:18.10e} {:18.10e} {:18.10e} {:18.10e}\n",
                                 update->ntimestep, max_f, min_f, sum_f / natoms,
                                 energy_deviation, spread(fermi_levels))
                  << std::flush;
  }
  if (warn_force > 0.0 && max_f > warn_force) warn_deviating_atoms(nlocal);
}

/* ----------------------------------------------------------------------
   Rank 0 names the atoms whose force deviation exceeds `warn`, the worst first
------------------------------------------------------------------------- */

void PairMLSurrogate::warn_deviating_atoms(int nlocal)
{
  std::vector<std::pair<double, tagint>> above;
  for (int i = 0; i < nlocal; ++i)
    if (atom_deviation[i] > warn_force) above.emplace_back(atom_deviation[i], atom->tag[i]);
  const auto keep = std::min<std::size_t>(above.size(), WORST_ATOMS);
  std::partial_sort(above.begin(), above.begin() + keep, above.end(), std::greater<>());
  std::array<double, 2 * WORST_ATOMS> mine;
  mine.fill(-1.0);    // no atom: below any deviation
  for (std::size_t k = 0; k < keep; ++k) {
    mine[2 * k] = above[k].first;
    mine[2 * k + 1] = static_cast<double>(above[k].second);
  }
  double count = static_cast<double>(above.size()), total = 0.0;
  MPI_Reduce(&count, &total, 1, MPI_DOUBLE, MPI_SUM, 0, world);
  std::vector<double> all(comm->me == 0 ? mine.size() * comm->nprocs : 0);
  MPI_Gather(mine.data(), (int) mine.size(), MPI_DOUBLE, all.data(), (int) mine.size(),
             MPI_DOUBLE, 0, world);
  if (comm->me != 0) return;
  std::vector<std::pair<double, tagint>> worst;
  for (std::size_t k = 0; k < all.size(); k += 2)
    if (all[k] >= 0.0) worst.emplace_back(all[k], static_cast<tagint>(all[k + 1]));
  std::sort(worst.begin(), worst.end(), std::greater<>());
  if (worst.size() > WORST_ATOMS) worst.resize(WORST_ATOMS);
  std::string names;
  for (const auto &atom_devi : worst)
    names += fmt::format("{}{} ({:.4g} eV/A)", names.empty() ? "" : ", ", atom_devi.second,
                         atom_devi.first);
  error->warning(FLERR,
                 "pair_style mlsurrogate: step {}: {} atoms have an {} force deviation above {} "
                 "eV/A; the worst, by atom id: {}. The structure may be outside the model's "
                 "training data",
                 update->ntimestep, static_cast<long>(total),
                 dropout_passes > 0 ? "MC-dropout" : "ensemble", warn_force, names);
}
