// hessforge C++ core: loads an exported model (engine/export.py) with its metadata, maps elements, builds an
// O(N) cell-list neighbor list (periodic, triclinic, cells smaller than the cutoff) and returns energy,
// forces, virial and per-atom energies. Used by the pybind11 module (csrc/bindings.cpp) and by the LAMMPS
// plugin (lammps_plugin/). This header does not include torch, so its users compile fast.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace hessforge {

// Errors a user can cause (missing file, newer format, unknown element...): one clear message.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// An exported model file's zip records against their stored CRC-32s (csrc/archive.cpp); Error if damaged.
void check_archive(const std::string& path);

constexpr int kFormatVersion = 1;  // newest exported-model format this core reads (engine.export.EXPORT_VERSION)
// Atoms closer than this are one atom written twice (engine.graph.MIN_ATOM_DISTANCE): refused, since the model
// would return finite nonsense for them.
constexpr double kMinAtomDistance = 0.01;  // Å

struct Metadata {
  int format_version = 0;
  std::string architecture;
  double cutoff = 0.0;            // Å
  std::vector<int> species;       // atomic numbers the model knows
  int num_layers = 0;             // message-passing layers
  double interaction_range = 0.0; // num_layers * cutoff: how far ghost atoms must reach
  int halo_width = 0;             // node state width of layer-wise halo exchange (0: a file from before it)
  std::string force_mode;         // "gradient" or "direct"
  bool virial = false;            // the model gives a virial (gradient forces)
  std::string dtype;              // "float32" or "float64"
  std::vector<double> reference_energies;  // eV, per species (same order): constants inside each atom energy;
                                           // empty in files exported before they were recorded
  std::string json;               // the whole metadata document
};

// Per-atom virials (engine/export.py with_atom_virial): kSplit halves each edge's -r_e (x) dE/dr_e between its
// two atoms (any graph); kExact gives W_j = sum_i (x_i - x_j) (x) dU_i/dx_j over the local energies (the exact
// heat flux of a many-body model), which needs periodic images as explicit atoms (no shifts).
enum class AtomVirial { kNone, kSplit, kExact };

struct Result {
  double energy = 0.0;               // eV, sum of the first nlocal per-atom energies
  std::vector<double> forces;        // [N*3] eV/Å (ghost rows hold reaction forces in ghost mode)
  std::vector<double> node_energy;   // [N] eV
  double virial[9] = {0};            // eV, row-major 3x3: W = -sum_e r_e (x) dE/dr_e (zero for direct forces)
  // [N*9] eV, row-major 3x3 per atom (W_ab = sum r_a F_b, not symmetrized; sums to the virial), only when asked
  // for (AtomVirial); empty otherwise.
  std::vector<double> atom_virial;
  int64_t num_edges = 0;
};

// Neighbor list with the convention of engine/neighbors.py: for an edge (i, j) with integer shift S,
// r_ij = x_j - x_i + S @ cell (cell rows are lattice vectors), |r_ij| < cutoff, no self pair with S = 0,
// every pair in both directions. Edges are sorted by receiver i.
struct NeighborList {
  std::vector<int64_t> receivers, senders;
  std::vector<int64_t> shifts;  // [E*3] integer cell shifts
  size_t size() const { return receivers.size(); }
};

// positions [n*3]; cell [9] row-major (ignored where pbc is false; must be invertible if any pbc).
NeighborList neighbor_list(const double* positions, int64_t n, const double* cell, const bool* pbc,
                           double cutoff);

// Atomic number of an element symbol ("H", "Cu"); 0 if unknown.
int atomic_number(const std::string& symbol);
std::string element_symbol(int z);
// Standard atomic weight of element z in amu (0 if unknown).
double standard_atomic_mass(int z);

// An x86 CPU feature as GCC's __builtin_cpu_supports names it ("avx512f", "x86-64-v4"): 1 this CPU has it, 0 it
// has not, -1 a name this core cannot ask about (a compiled export naming it runs on TorchScript).
int cpu_feature(const std::string& feature);

// TorchScript's profiling graph executor (process-wide switch, torch's default: on). It re-specialises the
// graph whenever input shapes change (the edge count changes every MD step) and fuses nothing on the CPU;
// the LAMMPS plugin turns it off unless HESSFORGE_JIT_OPTIMIZE=1.
void set_jit_optimize(bool on);

// Layer-wise halo exchange (Model::compute_halo): how the caller moves node states between the processes of a
// domain decomposition. Rows [0, nlocal) are this process's atoms, rows [nlocal, n) ghost atoms (copies of atoms
// owned here or by another process), each row `width` doubles.
class HaloExchange {
 public:
  virtual ~HaloExchange() = default;
  // Rows [0, nlocal) are set: fill each ghost row from its owner's row.
  virtual void forward(double* rows, int64_t width) = 0;
  // Add each ghost row into its owner's row (the gradient of a copy goes to the original); after this, rows
  // [0, nlocal) hold the totals (ghost rows are then unspecified).
  virtual void reverse(double* rows, int64_t width) = 0;
};

// Every atom on one process: ghost row nlocal + g is a copy of row owner[g] (periodic images as explicit atoms).
class OwnerExchange : public HaloExchange {
 public:
  OwnerExchange(std::vector<int64_t> owner, int64_t nlocal) : owner_(std::move(owner)), nlocal_(nlocal) {}
  void forward(double* rows, int64_t width) override;
  void reverse(double* rows, int64_t width) override;

 private:
  std::vector<int64_t> owner_;
  int64_t nlocal_;
};

// glibc: serve large allocations from the heap and keep freed memory for reuse (M_MMAP_MAX 0, trim threshold
// 1 GiB; process-wide, once; engine/allocator.py says why: a model's large per-edge tensors otherwise cost a page
// fault per 4 KiB on every call, 2-4x the force call on ~1000 atoms). HESSFORGE_MALLOC=system leaves glibc's
// defaults. Called by the Model constructor; returns whether the settings are in effect.
bool keep_freed_memory();

class Model {
 public:
  // Loads the TorchScript file and its metadata. num_threads > 0 sets torch's intra-op threads.
  explicit Model(const std::string& path, int num_threads = 0);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const Metadata& metadata() const;
  const std::string& path() const;
  bool knows(int z) const;  // is this atomic number in the model's species?
  // Is the AOTInductor-compiled forward (`hessforge export --compiled`) loaded? compute_graph then runs it
  // instead of TorchScript where it can (no per-atom virials, >= 2 atoms and 2 edges), and compute_halo its
  // compiled layer programs (where the file has them; >= 2 atoms, local atoms and edges).
  bool compiled() const;
  // One line for logs: which forward runs, or why the compiled one does not (not in the file, this CPU lacks
  // its instructions, another torch, HESSFORGE_COMPILED=off).
  const std::string& compiled_note() const;
  // Can this file give per-atom virials (a gradient-force model exported with with_atom_virial)?
  bool has_atom_virial() const;

  // Explicit graph: positions [n*3], atomic numbers [n], edges (receiver, sender) with Cartesian shift
  // vectors [E*3] (nullptr: all zero, as with explicit ghost atoms); only the first nlocal atoms' energies
  // are summed (nlocal < 0: all). Numbers are not checked here (the caller maps elements once).
  // atom_virial: also fill out.atom_virial (Error if the file cannot: has_atom_virial(); kExact with shifts).
  void compute_graph(const double* positions, const int64_t* numbers, int64_t n, int64_t nlocal,
                     const int64_t* receivers, const int64_t* senders, const double* shifts,
                     int64_t num_edges, Result& out, AtomVirial atom_virial = AtomVirial::kNone) const;

  // Can this file run layer by layer (compute_halo: halo_* methods, exported since they existed)?
  bool has_halo() const;

  // Layer-wise halo exchange: atoms [0, nlocal) local, [nlocal, n) ghost atoms (explicit positions, no shifts)
  // reaching one cutoff beyond the local ones; every edge's receiver is local. The layers run one at a time with
  // exchange.forward between them (ghost states from their owners) and, in the backward pass, exchange.reverse
  // (ghost gradients to their owners). Energies, forces (ghost rows: forces on the ghost atoms, to be added to
  // their owners), the virial and per-atom virials of this process's part, as compute_graph gives them for its
  // local energies; over all processes they sum to the system's. node_energy of ghosts is 0. Per-atom virials:
  // kSplit, or kExact (W_j = sum_i (x_i - x_j) (x) dU_i/dx_j over every process's energies, the exact heat flux:
  // three moment gradients travel back with the energy's, so exchange.reverse moves 4 x halo_width per row).
  void compute_halo(const double* positions, const int64_t* numbers, int64_t n, int64_t nlocal,
                    const int64_t* receivers, const int64_t* senders, int64_t num_edges, HaloExchange& exchange,
                    Result& out, AtomVirial atom_virial = AtomVirial::kNone) const;

  // One structure: own cell list, then compute_graph. Checks the elements. Per-atom virials: kSplit (periodic
  // images are shifts here), or kExact for a structure without periodic directions.
  void compute(const double* positions, const int64_t* numbers, int64_t n, const double* cell,
               const bool* pbc, Result& out, AtomVirial atom_virial = AtomVirial::kNone) const;

 private:
  // The compiled programs against the TorchScript methods on a small graph at load; disabled if they differ.
  void check_compiled();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace hessforge
