/* Entry point of hessforgeplugin.so: registers pair_style hessforge with the LAMMPS that loads it. */
#include "lammps.h"
#include "lammpsplugin.h"
#include "pair_hessforge.h"

using namespace LAMMPS_NS;

#ifndef HESSFORGE_LAMMPS_VERSION
#define HESSFORGE_LAMMPS_VERSION "22 Jul 2025"
#endif

static Pair *pair_hessforge_creator(LAMMPS *lmp)
{
  return new PairHessforge(lmp);
}

extern "C" __attribute__((visibility("default"))) void lammpsplugin_init(void *lmp, void *handle,
                                                                     void *regfunc)
{
  lammpsplugin_t plugin;
  auto register_plugin = (lammpsplugin_regfunc) regfunc;
  // LAMMPS prints a note when this differs from the version it runs (headers and binary must match)
  plugin.version = HESSFORGE_LAMMPS_VERSION;
  plugin.style = "pair";
  plugin.name = "hessforge";
  plugin.info = "hessforge exported-model pair style (TorchScript via the hessforge C++ core)";
  plugin.author = "hessforge";
  plugin.creator.v1 = (lammpsplugin_factory1 *) &pair_hessforge_creator;
  plugin.handle = handle;
  (*register_plugin)(&plugin, lmp);
}
