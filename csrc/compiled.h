// The AOTInductor-compiled forward of an exported model (`hessforge export --compiled`, engine/aoti.py). Internal
// to the core (includes ATen); Model::compute_graph runs it instead of TorchScript where it can.
#pragma once

#include <ATen/Tensor.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace torch::inductor {
class AOTIModelPackageLoader;
}

namespace hessforge {

class CompiledForward {
 public:
  // Loads the builds named by the metadata (the JSON document of the archive at `path`). A file exported without
  // them, a CPU without the instructions they use, another torch version or HESSFORGE_COMPILED=off leave it
  // unloaded (loaded() false, note() says why): the TorchScript forward then runs, so this never refuses a file
  // a machine can otherwise run. Error for a malformed "compiled" entry (an edited file).
  CompiledForward(const std::string& path, const std::string& metadata_json);
  ~CompiledForward();

  bool loaded() const { return serial_ != nullptr; }
  // One line for logs: which build runs, or why TorchScript does.
  const std::string& note() const { return note_; }
  // Sizes 0 and 1 are specialised by tracing: smaller graphs take the TorchScript forward.
  bool can_run(int64_t num_atoms, int64_t num_edges) const {
    return loaded() && num_atoms >= min_atoms_ && num_edges >= min_edges_;
  }
  // forward's outputs (energy [], node_energy [N], forces [N, 3], virial [3, 3]) of (positions, numbers,
  // edge_index, shifts, nlocal [] int64); the build for the current thread count.
  std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs) const;
  // The given build, whatever the thread count (the load-time check of both builds).
  std::vector<at::Tensor> run_build(bool threaded, const std::vector<at::Tensor>& inputs) const;
  // Stop using the compiled programs (the TorchScript methods run); note says why.
  void disable(const std::string& note);

  // The layer-wise halo programs (engine/aoti.py HALO_INTERFACE: edges, layer<k>, readout and their _vjp), single-
  // thread build; absent in files of students without halo methods.
  bool has_halo() const { return !halo_.empty(); }
  std::vector<at::Tensor> run_halo(const std::string& program, const std::vector<at::Tensor>& inputs) const;

 private:
  // shared between models loaded from the same bytes: a package's library cannot be unloaded (glibc keeps
  // libraries with unique symbols), so each new load would grow the process by its size
  std::shared_ptr<torch::inductor::AOTIModelPackageLoader> serial_, threaded_;
  std::map<std::string, std::shared_ptr<torch::inductor::AOTIModelPackageLoader>> halo_;
  std::string note_;
  std::string choice_;  // HESSFORGE_COMPILED: "auto", "serial" or "threaded"
  int64_t min_atoms_ = 2, min_edges_ = 2;
};

}  // namespace hessforge
