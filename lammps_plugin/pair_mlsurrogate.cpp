#include "pair_mlsurrogate.h"

#include "torch_model.h"

#include "atom.h"
#include "error.h"
#include "force.h"
#include "memory.h"
#include "neighbor.h"
#include "platform.h"
#include "utils.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

using namespace LAMMPS_NS;

namespace {

const char *const USAGE =
    "pair_style mlsurrogate model.pt [grid nx ny nz | spacing h] [device cpu|cuda|cuda:N] "
    "[threads N] [batch M]";

bool is_keyword(const std::string &word)
{
  return word == "grid" || word == "spacing" || word == "device" || word == "threads" ||
      word == "batch";
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
       have_batch = false;
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
    } else {
      error->all(FLERR,
                 "pair_style mlsurrogate: unknown keyword '{}'. Valid keywords: grid, spacing, "
                 "device, threads, batch. Usage: {}",
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

  if (nthreads > 0) mlsurrogate::TorchModel::set_num_threads(nthreads);

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
  // Placeholder request; the descriptor kernel decides what it needs.
  neighbor->add_request(this, NeighConst::REQ_FULL);
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

/* ---------------------------------------------------------------------- */

void PairMLSurrogate::compute(int eflag, int vflag)
{
  ev_init(eflag, vflag);
  error->all(FLERR, "pair_style mlsurrogate: compute not implemented yet");
}
