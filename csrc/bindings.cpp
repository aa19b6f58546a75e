// pybind11 bindings of the C++ core: module engine._core (numpy in, numpy out; no torch headers here).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "hessforge/core.h"

namespace py = pybind11;
using namespace pybind11::literals;
using ArrayD = py::array_t<double, py::array::c_style | py::array::forcecast>;
using ArrayL = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using ArrayB = py::array_t<bool, py::array::c_style | py::array::forcecast>;

namespace {

void check_shape(const py::array& a, std::initializer_list<py::ssize_t> shape, const char* name) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  size_t k = 0;
  for (py::ssize_t s : shape) {
    if (ok && s >= 0 && a.shape(k) != s) ok = false;
    ++k;
  }
  if (!ok) throw hessforge::Error(std::string("wrong shape for ") + name);
}

py::dict to_dict(const hessforge::Result& r, int64_t n, bool atom_virial) {
  ArrayD forces({n, int64_t(3)});
  ArrayD node_energy({n});
  ArrayD virial({int64_t(3), int64_t(3)});
  std::copy(r.forces.begin(), r.forces.end(), forces.mutable_data());
  std::copy(r.node_energy.begin(), r.node_energy.end(), node_energy.mutable_data());
  std::copy(r.virial, r.virial + 9, virial.mutable_data());
  py::dict out("energy"_a = r.energy, "forces"_a = forces, "node_energy"_a = node_energy, "virial"_a = virial,
               "num_edges"_a = r.num_edges);
  if (atom_virial) {
    ArrayD per_atom({n, int64_t(3), int64_t(3)});
    std::copy(r.atom_virial.begin(), r.atom_virial.end(), per_atom.mutable_data());
    out["atom_virial"] = per_atom;
  }
  return out;
}

// positions [N, 3], numbers [N], edge_index [2, E] of an explicit graph: N
int64_t check_graph_shapes(const ArrayD& positions, const ArrayL& numbers, const ArrayL& edge_index) {
  check_shape(positions, {-1, 3}, "positions (expected [N, 3])");
  const int64_t n = positions.shape(0);
  check_shape(numbers, {n}, "numbers (expected [N])");
  check_shape(edge_index, {2, -1}, "edge_index (expected [2, E])");
  return n;
}

// explicit graphs skip the core's own element check (Model::compute_graph trusts its caller): done here
void check_elements(const hessforge::Model& model, const ArrayL& numbers) {
  for (int64_t k = 0; k < numbers.shape(0); ++k)
    if (!model.knows(static_cast<int>(numbers.data()[k])))
      throw hessforge::Error("unknown element Z=" + std::to_string(numbers.data()[k]) + " at atom " +
                             std::to_string(k));
}

hessforge::AtomVirial atom_virial_kind(const std::string& kind) {
  if (kind.empty()) return hessforge::AtomVirial::kNone;
  if (kind == "split") return hessforge::AtomVirial::kSplit;
  if (kind == "exact") return hessforge::AtomVirial::kExact;
  throw hessforge::Error("atom_virial must be None, 'split' or 'exact', got '" + kind + "'");
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "hessforge C++ core: exported-model inference and an O(N) cell-list neighbor list";
  py::object base = py::module_::import("engine.errors").attr("HessforgeError");
  py::register_exception<hessforge::Error>(m, "CoreError", base);
  m.attr("FORMAT_VERSION") = hessforge::kFormatVersion;

  m.def(
      "neighbor_list",
      [](ArrayD positions, ArrayD cell, ArrayB pbc, double cutoff) {
        check_shape(positions, {-1, 3}, "positions (expected [N, 3])");
        check_shape(cell, {3, 3}, "cell (expected [3, 3])");
        check_shape(pbc, {3}, "pbc (expected [3])");
        hessforge::NeighborList nl;
        {
          py::gil_scoped_release release;
          nl = hessforge::neighbor_list(positions.data(), positions.shape(0), cell.data(), pbc.data(), cutoff);
        }
        const int64_t e = static_cast<int64_t>(nl.size());
        ArrayL edge_index({int64_t(2), e});
        ArrayL shifts({e, int64_t(3)});
        std::copy(nl.receivers.begin(), nl.receivers.end(), edge_index.mutable_data());
        std::copy(nl.senders.begin(), nl.senders.end(), edge_index.mutable_data() + e);
        std::copy(nl.shifts.begin(), nl.shifts.end(), shifts.mutable_data());
        return py::make_tuple(edge_index, shifts);
      },
      "positions"_a, "cell"_a, "pbc"_a, "cutoff"_a,
      "Edges (edge_index [2, E], integer shifts [E, 3]) with r_ij = x_j - x_i + S @ cell, |r_ij| < cutoff.");

  m.def("atomic_number", &hessforge::atomic_number, "symbol"_a);
  m.def("cpu_feature", &hessforge::cpu_feature, "feature"_a,
        "1: this CPU has the x86 feature (GCC __builtin_cpu_supports name), 0: not, -1: unknown to the core");
  m.def("keep_freed_memory", &hessforge::keep_freed_memory,
        "glibc: large allocations from the heap, freed memory kept for reuse (process-wide, once)");
  m.def("set_jit_optimize", &hessforge::set_jit_optimize, "on"_a,
        "TorchScript profiling executor on/off (process-wide; the LAMMPS plugin runs with it off)");

  py::class_<hessforge::Model>(m, "Model")
      .def(py::init([](const std::string& path, int num_threads) {
             py::gil_scoped_release release;  // loading checks the compiled programs with autograd (no GIL)
             return std::make_unique<hessforge::Model>(path, num_threads);
           }),
           "path"_a, "num_threads"_a = 0)
      .def_property_readonly("metadata_json", [](const hessforge::Model& self) { return self.metadata().json; })
      .def_property_readonly("cutoff", [](const hessforge::Model& self) { return self.metadata().cutoff; })
      .def_property_readonly("species", [](const hessforge::Model& self) { return self.metadata().species; })
      .def_property_readonly("num_layers", [](const hessforge::Model& self) { return self.metadata().num_layers; })
      .def_property_readonly("force_mode", [](const hessforge::Model& self) { return self.metadata().force_mode; })
      .def_property_readonly("has_atom_virial", &hessforge::Model::has_atom_virial)
      .def_property_readonly("compiled", &hessforge::Model::compiled)
      .def_property_readonly("compiled_note", &hessforge::Model::compiled_note)
      .def(
          "compute",
          [](const hessforge::Model& self, ArrayD positions, ArrayL numbers, ArrayD cell, ArrayB pbc,
             const std::string& atom_virial) {
            check_shape(positions, {-1, 3}, "positions (expected [N, 3])");
            const int64_t n = positions.shape(0);
            check_shape(numbers, {n}, "numbers (expected [N])");
            check_shape(cell, {3, 3}, "cell (expected [3, 3])");
            check_shape(pbc, {3}, "pbc (expected [3])");
            const hessforge::AtomVirial kind = atom_virial_kind(atom_virial);
            hessforge::Result r;
            {
              py::gil_scoped_release release;
              self.compute(positions.data(), numbers.data(), n, cell.data(), pbc.data(), r, kind);
            }
            return to_dict(r, n, !atom_virial.empty());
          },
          "positions"_a, "numbers"_a, "cell"_a, "pbc"_a, "atom_virial"_a = "")
      .def(
          "compute_graph",
          [](const hessforge::Model& self, ArrayD positions, ArrayL numbers, ArrayL edge_index, ArrayD shifts,
             int64_t nlocal, const std::string& atom_virial) {
            const int64_t n = check_graph_shapes(positions, numbers, edge_index);
            const int64_t e = edge_index.shape(1);
            check_shape(shifts, {e, 3}, "shifts (expected [E, 3])");
            for (int64_t k = 0; k < 2 * e; ++k)
              if (edge_index.data()[k] < 0 || edge_index.data()[k] >= n)
                throw hessforge::Error("edge_index holds an atom index out of range");
            check_elements(self, numbers);
            const hessforge::AtomVirial kind = atom_virial_kind(atom_virial);
            hessforge::Result r;
            {
              py::gil_scoped_release release;
              self.compute_graph(positions.data(), numbers.data(), n, nlocal, edge_index.data(),
                                 edge_index.data() + e, shifts.data(), e, r, kind);
            }
            return to_dict(r, n, !atom_virial.empty());
          },
          "positions"_a, "numbers"_a, "edge_index"_a, "shifts"_a, "nlocal"_a = -1, "atom_virial"_a = "")
      .def_property_readonly("has_halo", &hessforge::Model::has_halo)
      .def(
          "compute_halo",
          [](const hessforge::Model& self, ArrayD positions, ArrayL numbers, int64_t nlocal, ArrayL edge_index,
             ArrayL owner, const std::string& atom_virial) {
            const int64_t n = check_graph_shapes(positions, numbers, edge_index);
            if (nlocal < 0 || nlocal > n) throw hessforge::Error("nlocal must be in [0, N]");
            check_shape(owner, {n - nlocal}, "owner (expected one local atom per ghost atom, [N - nlocal])");
            check_elements(self, numbers);
            std::vector<int64_t> owners(owner.data(), owner.data() + (n - nlocal));
            for (int64_t o : owners)
              if (o < 0 || o >= nlocal) throw hessforge::Error("owner holds an index that is not a local atom");
            const hessforge::AtomVirial kind = atom_virial_kind(atom_virial);
            const int64_t e = edge_index.shape(1);
            hessforge::OwnerExchange exchange(owners, nlocal);
            hessforge::Result r;
            {
              py::gil_scoped_release release;
              self.compute_halo(positions.data(), numbers.data(), n, nlocal, edge_index.data(),
                                edge_index.data() + e, e, exchange, r, kind);
            }
            return to_dict(r, n, !atom_virial.empty());
          },
          "positions"_a, "numbers"_a, "nlocal"_a, "edge_index"_a, "owner"_a, "atom_virial"_a = "",
          "Layer-wise halo exchange on one process: atoms [0, nlocal) local, atom nlocal + g a copy (periodic "
          "image) of local atom owner[g]; edges' receivers local. Forces on ghost rows belong to their owners.");
}
