// Registers the pair style `mlsurrogate` with LAMMPS (plugin entry point).
#include "pair_mlsurrogate.h"
#include "plugin_api.h"

using namespace LAMMPS_NS;

namespace {

Pair *create_pair_mlsurrogate(LAMMPS *lmp) { return new PairMLSurrogate(lmp); }

}  // namespace

extern "C" void lammpsplugin_init(void *lmp, void *handle, void *regfunc) {
  auto register_style = reinterpret_cast<mlsurrogate_plugin_register_fn>(regfunc);

  mlsurrogate_plugin_record record{};
  record.version = MLSURROGATE_LAMMPS_VERSION;
  record.style = "pair";
  record.name = "mlsurrogate";
  record.info = "mlsurrogate: ML surrogate for Kohn-Sham DFT (grid LDOS model, TorchScript)";
  record.author = "mlsurrogate developers";
  record.creator.v1 = reinterpret_cast<mlsurrogate_plugin_factory1 *>(&create_pair_mlsurrogate);
  record.handle = handle;
  register_style(&record, lmp);
}
