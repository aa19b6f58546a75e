/* pair_style hessforge: a hessforge exported model (TorchScript + metadata) in a stock LAMMPS, loaded with
   `plugin load hessforgeplugin.so` (or LAMMPS_PLUGIN_PATH). A thin adapter over the hessforge C++ core.

   pair_style hessforge [mode auto|fold|halo|ghost] [threads N] [reference_energies on|off]
   pair_coeff * * model.pt <element of type 1> <element of type 2> ...

   Requires units metal, newton on, atom IDs. See lammps_plugin/README.md. */

#ifndef LMP_PAIR_HESSFORGE_H
#define LMP_PAIR_HESSFORGE_H

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "pair.h"

namespace hessforge {
class Model;
struct Result;
}  // namespace hessforge

namespace LAMMPS_NS {

class PairHessforge : public Pair {
 public:
  PairHessforge(class LAMMPS *);
  ~PairHessforge() override;
  void compute(int, int) override;
  void settings(int, char **) override;
  void coeff(int, char **) override;
  void init_style() override;
  double init_one(int, int) override;
  int pack_forward_comm(int, int *, double *, int, int *) override;
  void unpack_forward_comm(int, int, double *) override;
  int pack_reverse_comm(int, int, double *) override;
  void unpack_reverse_comm(int, int *, double *) override;
  // HALO: node states [nodes, width] (graph order) to and from the other ranks, between the model's layers
  void halo_forward(double *rows, int width);
  void halo_reverse(double *rows, int width);

 protected:
  enum Mode { AUTO, FOLD, GHOST, HALO };
  int mode_setting;  // what the user asked for
  int mode;          // what runs: FOLD (one rank: periodic images folded onto their owners), HALO or GHOST
  int num_threads;
  bool reference_energies;  // energies include the model's per-element constants (keyword reference_energies)
  std::vector<double> reference_of_type;  // eV per atom type (1-based; 0 for NULL types)
  double cutoff;
  std::string model_path;
  std::unique_ptr<hessforge::Model> model;
  std::unique_ptr<hessforge::Result> result;
  std::vector<int64_t> type_to_z;  // atomic number of each atom type (1-based)
  bool warned_virial;
  bool warned_atom_virial;  // fold mode's per-atom virials are the edge split: said once
  bool checked_special;  // bonded pairs kept in the neighbor list (checked at the first compute after init)
  bool checked_masses;   // type masses compared with the elements (once per pair_coeff)

  // work arrays, reused between steps
  std::vector<double> pos, shifts;
  std::vector<int64_t> numbers, recv, send;
  std::vector<int> owner;         // FOLD: local owner of each ghost
  std::unordered_map<tagint, int> tag_to_local;  // FOLD: scratch for building `owner`
  // nodes of the model graph: atom_of_node[k] = LAMMPS index; the first local_nodes are local atoms of model
  // (not NULL) types, whose energies count; node_of: the inverse (-1 for atoms not in the graph)
  std::vector<int> node_of, atom_of_node;
  int local_nodes = 0;
  std::vector<int> hop, frontier, next_frontier;  // GHOST: pruning
  std::vector<int64_t> edge_begin, edge_end;
  std::vector<double> halo_rows;  // HALO: one node state per LAMMPS atom (local + ghost), what comm packs
  int halo_width = 0;
  int exchange_width = 0;  // doubles per atom in the exchange under way (states, or gradients and moments)

  void allocate();
  void check_apart(int i, int j, double d2);
  template <typename Visit> void for_each_model_neighbor(int i, Visit visit);
  void warn_unlikely_masses();
  void build_fold_graph();
  void build_ghost_graph();
  void build_halo_graph();
  int resolved_mode() const;
  bool per_atom_virials_computed() const;
  void restore_communication_cutoff();
  void gather_nodes();
};

}  // namespace LAMMPS_NS

#endif
