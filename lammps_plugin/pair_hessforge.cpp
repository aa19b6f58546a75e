/* pair_style hessforge: see pair_hessforge.h and README.md.

   Two ways of handing periodic images to the model, both exact:
   - FOLD (default on one MPI rank): every ghost atom is a periodic image of a local atom; edges to ghosts
     become edges to the owner with a Cartesian shift, so the model runs on the local atoms only and ghost
     atoms only need to reach the model cutoff. Forces land on local atoms directly.
   - HALO (default on several ranks, for files that can): ghost atoms reach the model cutoff only; the model
     runs one message-passing layer at a time on the local atoms and, between layers, the ghosts' node states
     come from their owners by LAMMPS forward communication (their gradients go back by reverse communication
     in the backward pass: the C++ core's compute_halo). Forces on ghosts are reverse-communicated (newton on).
   - GHOST (on several ranks for files exported before HALO existed): the model runs on local + ghost atoms (ghosts out to
     num_layers x cutoff + skin, set through comm_modify cutoff), only local energies are summed, forces on
     ghosts are -dE_local/dx_ghost and are reverse-communicated (newton on). Ghosts more than num_layers hops
     away from every local atom are pruned before the model call.
   The global virial is the model's W = -sum_e r_e (x) dE/dr_e (equal to virial_fdotr_compute()'s sum x.f
   over local + ghost atoms in GHOST mode, and the only correct one in FOLD mode). Per-atom virials (stress/atom,
   centroid/stress/atom): in GHOST and HALO mode the exact W_j = sum_i (x_i - x_j) (x) dU_i/dx_j (exact heat
   flux; HALO: three moment gradients go back through the exchanges with the energy's, hessforge::Model::
   compute_halo), in FOLD mode each edge's share of the virial halved between its two nodes (periodic images are
   shifts there, so x_i - x_j of an image is not at hand). */

#include "pair_hessforge.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <cstdlib>
#include <cstring>

#include "atom.h"
#include "comm.h"
#include "compute.h"
#include "error.h"
#include "fix.h"
#include "force.h"
#include "hessforge/core.h"
#include "memory.h"
#include "modify.h"
#include "neigh_list.h"
#include "neighbor.h"
#include "update.h"
#include "utils.h"

using namespace LAMMPS_NS;

namespace {
// Ghost mode raises LAMMPS' communication cutoff (comm_modify cutoff) to L x cutoff + skin. Once no hessforge
// style of that LAMMPS instance runs in ghost mode any more (pair_style re-issued in halo or fold mode), the
// value from before comes back: otherwise halo mode would keep ~6x the ghosts it needs (measured on 2 ranks).
struct RaisedCutoff {
  double before;  // comm->cutghostuser before the first raise
  double raised;  // what ghost mode set it to
};
std::map<const LAMMPS *, RaisedCutoff> &raised_cutoffs()
{
  static std::map<const LAMMPS *, RaisedCutoff> record;
  return record;
}
}  // namespace

PairHessforge::PairHessforge(LAMMPS *lmp) :
    Pair(lmp), mode_setting(AUTO), mode(FOLD), num_threads(0), reference_energies(true), cutoff(0.0),
    result(new hessforge::Result),
    warned_virial(false), warned_atom_virial(false), checked_special(false), checked_masses(false)
{
  single_enable = 0;
  restartinfo = 0;
  one_coeff = 1;
  manybody_flag = 1;
  no_virial_fdotr_compute = 1;  // the model's virial is used in both modes
  // per-atom virials (see the top): asymmetric (centroid/stress/atom) and symmetrized (stress/atom)
  centroidstressflag = CENTROID_AVAIL;
}

PairHessforge::~PairHessforge()
{
  if (allocated) {
    memory->destroy(setflag);
    memory->destroy(cutsq);
    memory->destroy(cutghost);
  }
}

void PairHessforge::allocate()
{
  allocated = 1;
  const int n = atom->ntypes;
  memory->create(setflag, n + 1, n + 1, "pair:setflag");
  memory->create(cutsq, n + 1, n + 1, "pair:cutsq");
  memory->create(cutghost, n + 1, n + 1, "pair:cutghost");
  for (int i = 1; i <= n; i++)
    for (int j = i; j <= n; j++) setflag[i][j] = 0;
}

/* pair_style hessforge [mode auto|fold|halo|ghost] [threads N] [reference_energies on|off] */
void PairHessforge::settings(int narg, char **arg)
{
  // re-issuing pair_style on the same style calls settings() again: start from the defaults
  mode_setting = AUTO;
  reference_energies = true;
  const int threads_before = num_threads;
  num_threads = 0;
  int iarg = 0;
  while (iarg < narg) {
    const std::string key = arg[iarg];
    if (key != "mode" && key != "threads" && key != "reference_energies")
      error->all(FLERR, "pair_style hessforge: unknown keyword '{}' (expected mode, threads or "
                        "reference_energies; the cutoff comes from the model file)", key);
    if (iarg + 1 >= narg) error->all(FLERR, "pair_style hessforge: keyword '{}' needs a value", key);
    const std::string value = arg[iarg + 1];
    if (key == "mode") {
      if (value == "auto") mode_setting = AUTO;
      else if (value == "fold") mode_setting = FOLD;
      else if (value == "ghost") mode_setting = GHOST;
      else if (value == "halo") mode_setting = HALO;
      else error->all(FLERR, "pair_style hessforge: mode must be auto, fold, halo or ghost, got '{}'", value);
    } else if (key == "reference_energies") {
      if (value != "on" && value != "off")
        error->all(FLERR, "pair_style hessforge: reference_energies must be on or off, got '{}'", value);
      reference_energies = value == "on";
    } else if (key == "threads") {
      num_threads = utils::inumeric(FLERR, value, false, lmp);
      if (num_threads < 0) error->all(FLERR, "pair_style hessforge: threads must be >= 0");
    }
    iarg += 2;
  }
  if (model && num_threads != threads_before && comm->me == 0)
    error->warning(FLERR, "pair_style hessforge: threads {} takes effect at the next pair_coeff (the model "
                          "is loaded with its threads)", num_threads);
}

/* pair_coeff * * model.pt El1 El2 ... (one element per atom type; NULL under hybrid/overlay or hybrid/scaled:
   atoms of that type are left to the other styles, the model never sees them) */
void PairHessforge::coeff(int narg, char **arg)
{
  if (!allocated) allocate();
  const int ntypes = atom->ntypes;
  if (narg < 3 || strcmp(arg[0], "*") != 0 || strcmp(arg[1], "*") != 0)
    error->all(FLERR, "pair_coeff for pair_style hessforge must be: pair_coeff * * model.pt "
                      "<one element per atom type>");
  // Load and check everything before touching the running model: a failed pair_coeff (in the Python module,
  // where the run can go on) leaves the previous model and its type map in place.
  const std::string path = arg[2];
  std::unique_ptr<hessforge::Model> loaded;
  try {
    const char *optimize = std::getenv("HESSFORGE_JIT_OPTIMIZE");
    hessforge::set_jit_optimize(optimize != nullptr && std::string(optimize) == "1");
    loaded.reset(new hessforge::Model(path, num_threads));
  } catch (const std::exception &err) {
    error->all(FLERR, std::string("pair_style hessforge: ") + err.what());
  }
  const hessforge::Metadata &meta = loaded->metadata();
  std::string known;
  for (int z : meta.species) known += " " + hessforge::element_symbol(z);
  if (narg - 3 != ntypes)
    error->all(FLERR,
               "pair_coeff * * {}: {} element(s) given for {} atom type(s); give one element per atom type "
               "(the model knows:{})",
               path, narg - 3, ntypes, known);
  std::vector<int64_t> z_of_type(ntypes + 1, 0);
  // a sub-style of hybrid/overlay or hybrid/scaled (plain hybrid is refused in init_style)
  const bool sub_style = utils::strmatch(force->pair_style, "^hybrid");
  int mapped = 0;
  for (int t = 1; t <= ntypes; t++) {
    const std::string symbol = arg[2 + t];
    if (symbol == "NULL") {
      if (!sub_style)
        error->all(FLERR, "pair_coeff * * {}: atom type {} is NULL, but no other pair style handles its atoms; "
                          "NULL types need pair_style hybrid/overlay (or hybrid/scaled) with a style for them",
                   path, t);
      continue;  // z_of_type[t] = 0: not a model atom
    }
    const int z = hessforge::atomic_number(symbol);
    if (z == 0) {
      const std::string capitalized = utils::uppercase(symbol.substr(0, 1)) + symbol.substr(1);
      error->all(FLERR, "pair_coeff * * {}: '{}' (atom type {}) is not an element symbol{}", path, symbol, t,
                 hessforge::atomic_number(capitalized) > 0
                     ? " (symbols are case-sensitive: " + capitalized + "?)" : std::string());
    }
    if (!loaded->knows(z))
      error->all(FLERR, "pair_coeff * * {}: element {} (atom type {}) is not known to the model; it knows:{}",
                 path, symbol, t, known);
    z_of_type[t] = z;
    mapped++;
  }
  if (mapped == 0)
    error->all(FLERR, "pair_coeff * * {}: every atom type is NULL; give an element for the atoms the model "
                      "handles", path);
  std::vector<double> reference(ntypes + 1, 0.0);
  for (int t = 1; t <= ntypes; t++)
    for (size_t k = 0; k < meta.reference_energies.size(); k++)
      if (meta.species[k] == z_of_type[t]) reference[t] = meta.reference_energies[k];
  model = std::move(loaded);
  model_path = path;
  type_to_z = z_of_type;
  reference_of_type = reference;
  checked_masses = false;
  cutoff = meta.cutoff;
  // pairs with a NULL type are not this style's: pair_style hybrid/overlay then skips them in its neighbor list
  for (int i = 1; i <= ntypes; i++)
    for (int j = i; j <= ntypes; j++) setflag[i][j] = (type_to_z[i] != 0 && type_to_z[j] != 0) ? 1 : 0;
  if (comm->me == 0)
    utils::logmesg(lmp,
                   "pair_style hessforge: {} ({} {}-force, {}, cutoff {} A, {} message-passing layers, "
                   "format version {})\n",
                   model_path, meta.architecture, meta.force_mode, meta.dtype, meta.cutoff, meta.num_layers,
                   meta.format_version);
  // the compiled forward serves fold and ghost mode's energy/force calls (not halo mode, not per-atom virials)
  if (comm->me == 0) utils::logmesg(lmp, "pair_style hessforge: {}\n", model->compiled_note());
}

void PairHessforge::init_style()
{
  if (strcmp(update->unit_style, "metal") != 0)
    error->all(FLERR, "pair_style hessforge requires 'units metal' (eV, Angstrom), not 'units {}'",
               update->unit_style);
  if (force->newton_pair == 0)
    error->all(FLERR, "pair_style hessforge requires newton pair on: forces on ghost atoms are "
                      "reverse-communicated (use 'newton on')");
  if (!model) error->all(FLERR, "pair_style hessforge: no model loaded (pair_coeff * * model.pt ...)");
  if (!reference_energies && model->metadata().reference_energies.empty())
    error->all(FLERR, "pair_style hessforge: reference_energies off needs the model's per-element reference "
                      "energies, which {} does not record (exported before they were); export it again", model_path);
  if (atom->tag_enable == 0) error->all(FLERR, "pair_style hessforge requires atom IDs");
  // The model needs every pair within its cutoff; these LAMMPS settings take pairs out of its neighbor list.
  if (utils::strmatch(force->pair_style, "^hybrid$"))
    error->all(FLERR, "pair_style hessforge cannot be a sub-style of pair_style hybrid, which gives each type "
                      "pair one style and so takes those pairs out of the model's neighbor list: use "
                      "pair_style hybrid/overlay (or hybrid/scaled)");
  if (neighbor->nex_type + neighbor->nex_group + neighbor->nex_mol > 0)  // set by neigh_modify itself
    error->all(FLERR, "pair_style hessforge: neigh_modify exclude takes pairs out of the model's neighbor list "
                      "(the model needs every pair within its cutoff); remove the exclusion");
  if (neighbor->includegroup)  // fold mode would pass the model only the group's pairs, ghost mode is refused
    error->all(FLERR, "pair_style hessforge: neigh_modify include leaves atoms outside the group without "
                      "neighbors (the model needs every pair within its cutoff); remove it");
  checked_special = false;  // neighbor->special_flag is set after this (Neighbor::init): checked in compute()
  if (!checked_masses) {
    checked_masses = true;
    warn_unlikely_masses();
  }
  if (!model->metadata().virial)
    for (const auto *fix : modify->get_fix_list()) {
      const std::string style = fix->style;
      // by name (npt, nph, box/relax, press/berendsen, press/langevin, deform/pressure, msst, bocs, ...), and
      // by LAMMPS' convention that a pressure-controlling fix creates its pressure compute as <fix ID>_press
      bool controls = false;
      for (const char *name : {"npt", "nph", "box/relax", "press", "msst", "bocs"})
        controls = controls || style.find(name) != std::string::npos;
      const Compute *own = modify->get_compute_by_id(std::string(fix->id) + "_press");
      // (the box change too: LAMMPS' own thermo_press would otherwise match a fix named "thermo")
      controls = controls || (own != nullptr && own->pressflag && fix->box_change != 0);
      if (controls)
        error->all(FLERR, "pair_style hessforge: fix {} ({}) controls the pressure, but {} is a direct-force "
                          "model without a virial; export a gradient-force model for NPT or box relaxation",
                   fix->id, style, model_path);
    }

  mode = resolved_mode();
  if (mode == FOLD && comm->nprocs > 1)
    error->all(FLERR, "pair_style hessforge mode fold runs on one MPI rank only; use mode halo, ghost or auto");
  if (mode == HALO && !model->has_halo())
    error->all(FLERR, "pair_style hessforge mode halo: {} was exported before layer-wise halo exchange existed; "
                      "export the checkpoint again, or use mode ghost", model_path);
  if (mode == GHOST && mode_setting == AUTO && comm->me == 0)
    error->warning(FLERR, "pair_style hessforge: {} was exported before layer-wise halo exchange existed, so "
                          "ghost atoms must reach {} layers x cutoff (mode ghost); export it again for mode halo",
                   model_path, model->metadata().num_layers);
  // HALO: a node state per atom forward (and its gradient reverse) communicated between layers
  halo_width = mode == HALO ? model->metadata().halo_width : 0;
  comm_forward = halo_width;
  // + 3 moments on steps with exact per-atom virials: buffers that wide only where a compute asks for them
  comm_reverse = model->metadata().virial && per_atom_virials_computed() ? 4 * halo_width : halo_width;
  if (force->pair != this) {  // a sub-style of hybrid/overlay: LAMMPS sizes its buffers by the parent's sizes
    force->pair->comm_forward = std::max(force->pair->comm_forward, comm_forward);
    force->pair->comm_reverse = std::max(force->pair->comm_reverse, comm_reverse);
  }

  if (mode == GHOST) {
    if (comm->mode != Comm::SINGLE)
      error->all(FLERR, "pair_style hessforge mode ghost requires comm_modify mode single");
    // message passing: L layers of cutoff r reach L*r; ghosts must cover that after atoms move by skin/2
    const double need = model->metadata().interaction_range + neighbor->skin;
    if (comm->cutghostuser < need) {
      auto found = raised_cutoffs().find(lmp);
      const bool ours = found != raised_cutoffs().end() && comm->cutghostuser == found->second.raised;
      raised_cutoffs()[lmp] = RaisedCutoff{ours ? found->second.before : comm->cutghostuser, need};
      comm->cutghostuser = need;
      if (comm->me == 0)
        utils::logmesg(lmp,
                       "pair_style hessforge: ghost atoms to {:.6g} A ({} layers x {:.6g} A cutoff + {:.6g} A "
                       "skin)\n",
                       need, model->metadata().num_layers, cutoff, neighbor->skin);
    }
    ghostneigh = 1;
    neighbor->add_request(this, NeighConst::REQ_FULL | NeighConst::REQ_GHOST);
  } else {
    ghostneigh = 0;
    neighbor->add_request(this, NeighConst::REQ_FULL);
    restore_communication_cutoff();
  }
  if (comm->me == 0)
    utils::logmesg(lmp, "pair_style hessforge: {} mode on {} MPI rank(s)\n",
                   mode == FOLD ? "fold" : mode == HALO ? "halo" : "ghost", comm->nprocs);
}

/* What mode_setting resolves to (init_style: AUTO is fold on one rank, halo on several for files that can) */
int PairHessforge::resolved_mode() const
{
  if (mode_setting != AUTO) return mode_setting;
  const bool halo = model && model->has_halo();
  // one rank: fold, unless per-atom virials are computed (heat flux): halo gives the exact ones, as on several
  // ranks, so the flux does not depend on the number of ranks
  if (comm->nprocs == 1) return halo && per_atom_virials_computed() ? HALO : FOLD;
  return halo ? HALO : GHOST;
}

/* Does any compute ask pair styles for per-atom virials (stress/atom, centroid/stress/atom, hence heat/flux)? */
bool PairHessforge::per_atom_virials_computed() const
{
  for (const Compute *compute : modify->get_compute_list())
    if (compute->pressatomflag) return true;
  return false;
}

/* The communication cutoff from before ghost mode raised it, once no hessforge style here runs in ghost mode */
void PairHessforge::restore_communication_cutoff()
{
  auto found = raised_cutoffs().find(lmp);
  if (found == raised_cutoffs().end()) return;
  std::set<Pair *> styles{force->pair_match("hessforge", 1)};  // this style alone, or one of hybrid's
  for (int k = 1; k <= 64; k++) styles.insert(force->pair_match("hessforge", 1, k));
  for (Pair *style : styles)
    if (style != nullptr && static_cast<PairHessforge *>(style)->resolved_mode() == GHOST) return;
  if (comm->cutghostuser == found->second.raised) {  // not changed by the user since
    comm->cutghostuser = found->second.before;
    if (comm->me == 0)
      utils::logmesg(lmp, "pair_style hessforge: communication cutoff back to {:.6g} A (ghost mode had raised it "
                          "to {:.6g} A)\n", found->second.before, found->second.raised);
  }
  raised_cutoffs().erase(found);
}

double PairHessforge::init_one(int i, int j)
{
  if (setflag[i][j] == 0) error->all(FLERR, "pair_style hessforge: pair_coeff * * model.pt ... is missing");
  cutghost[i][j] = cutghost[j][i] = cutoff;
  return cutoff;
}

/* Elements given in another order than the atom types (pair_coeff * * model.pt O H C for types H C O) run
   without complaint and give nonsense: a type whose mass is far from its element's standard atomic weight is
   named once per pair_coeff (a warning only: isotopes and repartitioned hydrogen masses are deliberate). */
void PairHessforge::warn_unlikely_masses()
{
  if (comm->me != 0 || atom->rmass_flag || atom->mass == nullptr) return;  // per-atom masses: not by type
  for (int t = 1; t <= atom->ntypes; t++) {
    const int z = static_cast<int>(type_to_z[t]);
    if (z == 0 || !atom->mass_setflag[t]) continue;
    const double standard = hessforge::standard_atomic_mass(z);
    if (std::fabs(atom->mass[t] - standard) > 0.1 * standard)
      error->warning(FLERR, "pair_style hessforge: atom type {} has mass {:.4g} but pair_coeff makes it {} ({:.4g}): "
                            "elements in another order than the atom types? (ignore this for isotopes or "
                            "repartitioned masses)", t, atom->mass[t], hessforge::element_symbol(z), standard);
  }
}

/* Atoms on top of each other (read_data with an atom twice, create_atoms random without overlap): one error
   naming their IDs; the model would give finite nonsense. */
void PairHessforge::check_apart(int i, int j, double d2)
{
  if (d2 >= hessforge::kMinAtomDistance * hessforge::kMinAtomDistance) return;
  error->one(FLERR, "pair_style hessforge: atoms {} and {} are {:.3g} Angstrom apart: overlapping atoms (an atom "
             "written twice?)", atom->tag[i], atom->tag[j], std::sqrt(d2));
}

/* Calls visit(j) for each neighbor j of atom i (LAMMPS' full list) that the model sees: not of a NULL type, closer
   than the model cutoff; atoms on top of each other are refused. */
template <typename Visit>
void PairHessforge::for_each_model_neighbor(int i, Visit visit)
{
  double **x = atom->x;
  const int *type = atom->type;
  const double cutsq_model = cutoff * cutoff;
  const int *jlist = list->firstneigh[i];
  const int jnum = list->numneigh[i];
  for (int jj = 0; jj < jnum; jj++) {
    const int j = jlist[jj] & NEIGHMASK;
    if (type_to_z[type[j]] == 0) continue;  // hybrid/overlay's skip list leaves NULL types out already
    const double dx = x[j][0] - x[i][0], dy = x[j][1] - x[i][1], dz = x[j][2] - x[i][2];
    const double d2 = dx * dx + dy * dy + dz * dz;
    if (d2 >= cutsq_model) continue;
    check_apart(i, j, d2);
    visit(j);
  }
}

/* FOLD: nodes = local atoms; an edge to a ghost j becomes an edge to its local owner o with the shift
   x_j - x_o, so r_ij = x_o - x_i + shift. */
void PairHessforge::build_fold_graph()
{
  double **x = atom->x;
  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;
  pos.clear();
  numbers.clear();
  recv.clear();
  send.clear();
  shifts.clear();
  if (nlocal == 0) return;
  if (neighbor->ago == 0 || static_cast<int>(owner.size()) != nall) {
    tagint *tag = atom->tag;
    // a hash map: atom IDs may be sparse up to 2^31 (delete_atoms, fix deposit), an array by ID would not fit
    tag_to_local.clear();
    tag_to_local.reserve(nlocal);
    for (int i = 0; i < nlocal; i++) tag_to_local.emplace(tag[i], i);
    owner.resize(nall);
    for (int j = 0; j < nall; j++) {
      const tagint t = tag[j];
      const auto found = tag_to_local.find(t);
      if (found == tag_to_local.end())
        error->one(FLERR, "pair_style hessforge mode fold: ghost atom {} has no local owner", t);
      owner[j] = found->second;
    }
  }
  const int inum = list->inum;
  const int *ilist = list->ilist;
  const int *type = atom->type;
  // nodes: the local atoms of model (not NULL) types, in order
  node_of.assign(nlocal, -1);
  atom_of_node.clear();
  for (int i = 0; i < nlocal; i++)
    if (type_to_z[type[i]] != 0) {
      node_of[i] = static_cast<int>(atom_of_node.size());
      atom_of_node.push_back(i);
    }
  recv.clear();
  send.clear();
  shifts.clear();
  for (int ii = 0; ii < inum; ii++) {
    const int i = ilist[ii];
    if (node_of[i] < 0) continue;  // NULL type
    for_each_model_neighbor(i, [&](int j) {
      const int o = owner[j];  // of the same type as j: a model atom
      recv.push_back(node_of[i]);
      send.push_back(node_of[o]);
      shifts.push_back(x[j][0] - x[o][0]);
      shifts.push_back(x[j][1] - x[o][1]);
      shifts.push_back(x[j][2] - x[o][2]);
    });
  }
  local_nodes = static_cast<int>(atom_of_node.size());
  gather_nodes();
}

/* Positions and atomic numbers of the graph's nodes (atom_of_node) */
void PairHessforge::gather_nodes()
{
  double **x = atom->x;
  const int *type = atom->type;
  const int nnodes = static_cast<int>(atom_of_node.size());
  pos.resize(3 * static_cast<size_t>(nnodes));
  numbers.resize(nnodes);
  for (int k = 0; k < nnodes; k++) {
    const int i = atom_of_node[k];
    pos[3 * k] = x[i][0];
    pos[3 * k + 1] = x[i][1];
    pos[3 * k + 2] = x[i][2];
    numbers[k] = type_to_z[type[i]];
  }
}

/* GHOST: nodes = local model atoms (in order) then the ghosts within num_layers hops of them; edges whose
   receiver is within num_layers - 1 hops (only those change a local energy). */
void PairHessforge::build_ghost_graph()
{
  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;
  const int inum = list->inum + list->gnum;
  const int *ilist = list->ilist;
  const int layers = model->metadata().num_layers;
  const int *type = atom->type;
  numbers.clear();
  atom_of_node.clear();
  local_nodes = 0;
  if (nlocal == 0) return;

  // all edges within the model cutoff, grouped by receiver (LAMMPS atom indices)
  recv.clear();
  send.clear();
  edge_begin.assign(nall, 0);
  edge_end.assign(nall, 0);
  for (int ii = 0; ii < inum; ii++) {
    const int i = ilist[ii];
    edge_begin[i] = static_cast<int64_t>(send.size());
    if (type_to_z[type[i]] != 0) for_each_model_neighbor(i, [&](int j) { send.push_back(j); });
    edge_end[i] = static_cast<int64_t>(send.size());
  }
  // breadth-first hops from the local model atoms (nodes 0..local_nodes-1)
  hop.assign(nall, -1);
  frontier.clear();
  for (int i = 0; i < nlocal; i++) {
    if (type_to_z[type[i]] == 0) continue;
    hop[i] = 0;
    frontier.push_back(i);
    atom_of_node.push_back(i);
  }
  local_nodes = static_cast<int>(atom_of_node.size());
  for (int level = 1; level <= layers; level++) {
    next_frontier.clear();
    for (int i : frontier)
      for (int64_t e = edge_begin[i]; e < edge_end[i]; e++) {
        const int j = static_cast<int>(send[e]);
        if (hop[j] < 0) {
          hop[j] = level;
          next_frontier.push_back(j);
          atom_of_node.push_back(j);
        }
      }
    frontier.swap(next_frontier);
  }
  const int nnodes = static_cast<int>(atom_of_node.size());
  node_of.assign(nall, -1);
  for (int k = 0; k < nnodes; k++) node_of[atom_of_node[k]] = k;
  // edges of receivers within layers - 1 hops, renumbered to nodes
  std::vector<int64_t> &r = recv;
  std::vector<int64_t> s;
  s.reserve(send.size());
  for (int k = 0; k < nnodes; k++) {
    const int i = atom_of_node[k];
    if (hop[i] > layers - 1) continue;
    for (int64_t e = edge_begin[i]; e < edge_end[i]; e++) {
      r.push_back(k);
      s.push_back(node_of[send[e]]);
    }
  }
  send.swap(s);
  gather_nodes();
  shifts.clear();
}

/* HALO: nodes = local model atoms (in order) then the ghost atoms they have edges to; edges of local receivers
   only (a ghost's own neighbours are its owner's, whose state arrives by forward communication). */
void PairHessforge::build_halo_graph()
{
  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;
  const int *type = atom->type;
  recv.clear();
  send.clear();
  shifts.clear();
  atom_of_node.clear();
  node_of.assign(nall, -1);
  for (int i = 0; i < nlocal; i++)
    if (type_to_z[type[i]] != 0) {
      node_of[i] = static_cast<int>(atom_of_node.size());
      atom_of_node.push_back(i);
    }
  local_nodes = static_cast<int>(atom_of_node.size());
  for (int ii = 0; ii < list->inum; ii++) {
    const int i = list->ilist[ii];
    if (node_of[i] < 0) continue;  // NULL type
    for_each_model_neighbor(i, [&](int j) {
      if (node_of[j] < 0) {  // a ghost atom, first seen
        node_of[j] = static_cast<int>(atom_of_node.size());
        atom_of_node.push_back(j);
      }
      recv.push_back(node_of[i]);
      send.push_back(node_of[j]);
    });
  }
  gather_nodes();
}

/* HALO exchange through LAMMPS' own communication of per-atom data (comm->forward_comm / reverse_comm with this
   pair's pack/unpack): halo_rows holds one state per LAMMPS atom, since LAMMPS forwards ghosts of ghosts in
   stages (x, then y, then z swaps) from rows it unpacked before. */
void PairHessforge::halo_forward(double *rows, int width)
{
  exchange_width = width;
  const int nall = atom->nlocal + atom->nghost;
  const size_t w = static_cast<size_t>(width);
  halo_rows.assign(static_cast<size_t>(nall) * w, 0.0);
  for (int k = 0; k < local_nodes; k++)
    std::memcpy(&halo_rows[atom_of_node[k] * w], rows + k * w, w * sizeof(double));
  comm->forward_comm(this, width);
  const int nnodes = static_cast<int>(atom_of_node.size());
  for (int k = local_nodes; k < nnodes; k++)
    std::memcpy(rows + k * w, &halo_rows[atom_of_node[k] * w], w * sizeof(double));
}

void PairHessforge::halo_reverse(double *rows, int width)
{
  exchange_width = width;
  const int nall = atom->nlocal + atom->nghost;
  const size_t w = static_cast<size_t>(width);
  halo_rows.assign(static_cast<size_t>(nall) * w, 0.0);
  const int nnodes = static_cast<int>(atom_of_node.size());
  for (int k = 0; k < nnodes; k++) std::memcpy(&halo_rows[atom_of_node[k] * w], rows + k * w, w * sizeof(double));
  comm->reverse_comm(this, width);
  for (int k = 0; k < local_nodes; k++)
    std::memcpy(rows + k * w, &halo_rows[atom_of_node[k] * w], w * sizeof(double));
}

int PairHessforge::pack_forward_comm(int n, int *list, double *buf, int /*pbc_flag*/, int * /*pbc*/)
{
  const size_t w = static_cast<size_t>(exchange_width);
  for (int i = 0; i < n; i++) std::memcpy(buf + i * w, &halo_rows[list[i] * w], w * sizeof(double));
  return n * exchange_width;
}

void PairHessforge::unpack_forward_comm(int n, int first, double *buf)
{
  const size_t w = static_cast<size_t>(exchange_width);
  std::memcpy(&halo_rows[first * w], buf, n * w * sizeof(double));
}

int PairHessforge::pack_reverse_comm(int n, int first, double *buf)
{
  const size_t w = static_cast<size_t>(exchange_width);
  std::memcpy(buf, &halo_rows[first * w], n * w * sizeof(double));
  return n * exchange_width;
}

void PairHessforge::unpack_reverse_comm(int n, int *list, double *buf)
{
  const size_t w = static_cast<size_t>(exchange_width);
  for (int i = 0; i < n; i++) {
    double *row = &halo_rows[list[i] * w];
    for (size_t c = 0; c < w; c++) row[c] += buf[i * w + c];
  }
}

namespace {
// The core's HaloExchange as the pair style's forward and reverse communication.
class LammpsExchange : public hessforge::HaloExchange {
 public:
  explicit LammpsExchange(PairHessforge *pair) : pair_(pair) {}
  void forward(double *rows, int64_t width) override { pair_->halo_forward(rows, static_cast<int>(width)); }
  void reverse(double *rows, int64_t width) override { pair_->halo_reverse(rows, static_cast<int>(width)); }

 private:
  PairHessforge *pair_;
};
}  // namespace

void PairHessforge::compute(int eflag, int vflag)
{
  ev_init(eflag, vflag);
  const bool atom_virial = vflag_atom || cvflag_atom;
  if (atom_virial && !model->has_atom_virial())
    error->all(FLERR, model->metadata().virial
                          ? "pair_style hessforge: " + model_path + " was exported before per-atom virials "
                            "existed (compute stress/atom, centroid/stress/atom, heat/flux); export the "
                            "checkpoint again"
                          : "pair_style hessforge: " + model_path + " is a direct-force model without a "
                            "virial, per atom or total (compute stress/atom, centroid/stress/atom, heat/flux); "
                            "export a gradient-force model");
  if (atom_virial && mode == FOLD && !warned_atom_virial) {
    warned_atom_virial = true;
    if (comm->me == 0)
      error->warning(FLERR, "pair_style hessforge: fold mode gives per-atom virials as the edge split (each edge's "
                            "virial halved between its atoms): exact sums, but for a many-body model only an "
                            "approximate heat flux; pair_style hessforge mode halo (or ghost) gives the exact "
                            "per-atom virials (compute heat/flux)");
  }

  if (!checked_special) {
    // LAMMPS drops 1-2/1-3/1-4 pairs from neighbor lists where both special factors are 0 (its default with
    // bonds) unless kspace or some pair styles keep them (flag 2: kept with special bits, stripped below)
    checked_special = true;
    if (atom->molecular != Atom::ATOMIC && atom->maxspecial > 0)  // atoms have 1-2.. neighbor lists
      for (int k = 1; k <= 3; k++)
        if (neighbor->special_flag[k] == 0)
          error->all(FLERR, "pair_style hessforge: special_bonds factors of 0 (LAMMPS' default with bonds) take "
                            "bonded 1-{} pairs out of the model's neighbor list; the model needs them: add "
                            "'special_bonds lj/coul 1.0 1.0 1.0' (or use kspace, which keeps them)",
                     k + 1);
  }
  if (mode == FOLD) build_fold_graph();
  else if (mode == HALO) build_halo_graph();
  else build_ghost_graph();

  const int64_t nnodes = static_cast<int64_t>(numbers.size());
  const int64_t nedges = static_cast<int64_t>(send.size());
  const hessforge::AtomVirial kind = !atom_virial ? hessforge::AtomVirial::kNone
                                     : mode == FOLD ? hessforge::AtomVirial::kSplit : hessforge::AtomVirial::kExact;
  if (mode == HALO && atom_virial && comm_reverse < 4 * halo_width)  // no compute asked at init (cannot happen)
    error->all(FLERR, "pair_style hessforge mode halo: per-atom virials asked for without a compute that "
                      "announced them at init; please report this");
  // a rank without (model) atoms contributes nothing, but in HALO mode still takes part in every exchange
  if ((atom->nlocal == 0 || local_nodes == 0) && mode != HALO) return;
  try {
    if (mode == HALO) {
      LammpsExchange exchange(this);
      model->compute_halo(pos.data(), numbers.data(), nnodes, local_nodes, recv.data(), send.data(), nedges,
                          exchange, *result, kind);
    } else {
      model->compute_graph(pos.data(), numbers.data(), nnodes, local_nodes, recv.data(), send.data(),
                           mode == FOLD ? shifts.data() : nullptr, nedges, *result, kind);
    }
  } catch (const std::exception &err) {
    error->one(FLERR, std::string("pair_style hessforge: ") + err.what());
  }

  double **f = atom->f;
  const double *fr = result->forces.data();
  for (int64_t k = 0; k < nnodes; k++) {
    const int i = atom_of_node[k];
    f[i][0] += fr[3 * k];
    f[i][1] += fr[3 * k + 1];
    f[i][2] += fr[3 * k + 2];
  }
  if (eflag_global) {
    eng_vdwl += result->energy;
    if (!reference_energies)
      for (int k = 0; k < local_nodes; k++) eng_vdwl -= reference_of_type[atom->type[atom_of_node[k]]];
  }
  if (eflag_atom)
    for (int k = 0; k < local_nodes; k++) {
      const int i = atom_of_node[k];
      eatom[i] += result->node_energy[k] - (reference_energies ? 0.0 : reference_of_type[atom->type[i]]);
    }
  if (atom_virial) {
    // nodes are local atoms (fold) or local + ghost atoms (halo, ghost: compute stress/atom reverse-communicates
    // the ghosts' share to their owners, newton on, as heat/flux wants: a ghost moves with its owner)
    const double *w = result->atom_virial.data();
    for (int64_t k = 0; k < nnodes; k++, w += 9) {
      const int i = atom_of_node[k];
      if (vflag_atom) {  // xx yy zz xy xz yz of the symmetric part
        vatom[i][0] += w[0];
        vatom[i][1] += w[4];
        vatom[i][2] += w[8];
        vatom[i][3] += 0.5 * (w[1] + w[3]);
        vatom[i][4] += 0.5 * (w[2] + w[6]);
        vatom[i][5] += 0.5 * (w[5] + w[7]);
      }
      if (cvflag_atom) {  // xx yy zz xy xz yz yx zx zy, W_ab = sum r_a F_b
        cvatom[i][0] += w[0];
        cvatom[i][1] += w[4];
        cvatom[i][2] += w[8];
        cvatom[i][3] += w[1];
        cvatom[i][4] += w[2];
        cvatom[i][5] += w[5];
        cvatom[i][6] += w[3];
        cvatom[i][7] += w[6];
        cvatom[i][8] += w[7];
      }
    }
  }
  if (vflag_global) {
    if (model->metadata().virial) {
      const double *w = result->virial;
      virial[0] += w[0];
      virial[1] += w[4];
      virial[2] += w[8];
      virial[3] += w[1];
      virial[4] += w[2];
      virial[5] += w[5];
    } else if (!warned_virial) {
      warned_virial = true;
      if (comm->me == 0)
        error->warning(FLERR, "pair_style hessforge: a direct-force model has no virial; pressure and stress "
                              "exclude this pair style's contribution (do not use barostats)");
    }
  }
}
