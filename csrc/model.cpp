// The model half of the core: the only translation unit that includes torch.
#include <ATen/Parallel.h>
#include <malloc.h>
#include <caffe2/serialize/inline_container.h>
#include <sys/stat.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/script.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "compiled.h"
#include "hessforge/core.h"
#include "json_lite.h"

namespace hessforge {

namespace {

const char* kMetadataRecord = "extra/hessforge.json";

std::string first_line(const std::string& text) {
  const size_t end = text.find('\n');
  return end == std::string::npos ? text : text.substr(0, end);
}

// Backtrace lines and markers (AOTInductor's errors end with them; a c10::Error raised inside a compiled
// program starts with "<omitting python frames>"): not the line that names a failure. `line` is trimmed.
bool is_backtrace_line(const std::string& line) {
  return line.rfind("frame #", 0) == 0 || line.rfind("Exception raised from", 0) == 0 ||
         line.rfind("<omitting", 0) == 0;
}

// The non-empty lines of an error that are not backtrace lines, trimmed.
std::vector<std::string> message_lines(const std::string& text) {
  std::istringstream lines(text);
  std::vector<std::string> kept;
  std::string line;
  while (std::getline(lines, line)) {
    const size_t start = line.find_first_not_of(' ');
    if (start == std::string::npos) continue;
    const std::string trimmed = line.substr(start, line.find_last_not_of(' ') + 1 - start);
    if (!is_backtrace_line(trimmed)) kept.push_back(trimmed);
  }
  return kept;
}

// The line that names the failure in a TorchScript interpreter error: its last non-empty line (the first one
// only says "The following operation failed in the TorchScript interpreter." before a source traceback).
std::string failure_line(const std::string& text) {
  const std::vector<std::string> lines = message_lines(text);
  return lines.empty() ? text : lines.back();
}

// The first line of an error that is not a backtrace line (a c10::Error's message).
std::string reason_line(const std::string& text) {
  const std::vector<std::string> lines = message_lines(text);
  return lines.empty() ? first_line(text) : lines.front();
}

void check_file(const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) throw Error("model file not found: " + path);
    throw Error("cannot read model file " + path + ": " + std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) throw Error("model path is not a file: " + path);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot read model file " + path + ": " + std::strerror(errno));
  char magic[2] = {0, 0};
  in.read(magic, 2);
  if (!in || magic[0] != 'P' || magic[1] != 'K')
    throw Error(path + ": not a hessforge exported model (not a TorchScript archive)");
}

std::string read_metadata_json(const std::string& path) {
  try {
    caffe2::serialize::PyTorchStreamReader reader(path);
    if (!reader.hasRecord(kMetadataRecord)) {
      if (reader.hasRecord("data.pkl"))  // torch.save's archive: a trainer checkpoint, most likely
        throw Error(path + ": a PyTorch file (a trainer checkpoint?), not an exported model: export it first with "
                    "`hessforge export " + path + " -o model.pt`");
      throw Error(path + ": not a hessforge exported model (no hessforge.json metadata inside)");
    }
    auto record = reader.getRecord(kMetadataRecord);
    const at::DataPtr& data = std::get<0>(record);
    return std::string(static_cast<const char*>(data.get()), std::get<1>(record));
  } catch (const c10::Error& err) {
    throw Error(path + ": not a hessforge exported model (unreadable archive: " + first_line(err.what_without_backtrace()) + ")");
  }
}

const json::Value& need(const json::Value& doc, const std::string& key, json::Value::Type type,
                        const std::string& path) {
  const json::Value* v = doc.get(key);
  if (v == nullptr || v->type != type) throw Error(path + ": exported model metadata lacks a valid '" + key + "'");
  return *v;
}

// An integer-valued JSON number (the metadata's version, layer count and atomic numbers): 1.5 is refused as the
// Python loader refuses it, rather than truncated.
int need_int(const json::Value& doc, const std::string& key, const std::string& path) {
  const double x = need(doc, key, json::Value::Number, path).number;
  if (!(std::isfinite(x) && x == std::floor(x) && std::fabs(x) < 1e9))
    throw Error(path + ": exported model metadata '" + key + "' is not an integer");
  return static_cast<int>(x);
}

Metadata parse_metadata(const std::string& text, const std::string& path) {
  json::Value doc;
  try {
    doc = json::parse(text);
  } catch (const Error& err) {
    throw Error(path + ": " + err.what());
  }
  const json::Value* format = doc.get("format");
  if (format == nullptr || format->type != json::Value::String || format->string != "hessforge-exported")
    throw Error(path + ": not a hessforge exported model (metadata format is not 'hessforge-exported')");
  Metadata meta;
  meta.json = text;
  meta.format_version = need_int(doc, "format_version", path);
  if (meta.format_version > kFormatVersion) {
    std::ostringstream msg;
    msg << path << ": exported model format version " << meta.format_version
        << " is newer than this hessforge supports (" << kFormatVersion << "); upgrade hessforge and rebuild";
    throw Error(msg.str());
  }
  meta.cutoff = need(doc, "cutoff", json::Value::Number, path).number;
  meta.num_layers = need_int(doc, "num_layers", path);
  const json::Value* range = doc.get("interaction_range");
  meta.interaction_range = range == nullptr ? meta.num_layers * meta.cutoff
                           : need(doc, "interaction_range", json::Value::Number, path).number;
  const json::Value* halo = doc.get("halo_width");  // absent or null: a student without layer-wise methods
  if (halo != nullptr && halo->type != json::Value::Null) meta.halo_width = need_int(doc, "halo_width", path);
  meta.force_mode = need(doc, "force_mode", json::Value::String, path).string;
  meta.dtype = need(doc, "dtype", json::Value::String, path).string;
  const json::Value* arch = doc.get("architecture");
  meta.architecture = (arch && arch->type == json::Value::String) ? arch->string : "";
  const json::Value* virial = doc.get("virial");
  meta.virial = virial ? (virial->type == json::Value::Bool && virial->boolean) : meta.force_mode == "gradient";
  for (const json::Value& z : need(doc, "species", json::Value::Array, path).array) {
    if (z.type != json::Value::Number || z.number < 1 || z.number > 118 || z.number != std::floor(z.number))
      throw Error(path + ": exported model metadata has an invalid species entry");
    for (int known : meta.species)
      if (known == static_cast<int>(z.number)) throw Error(path + ": exported model metadata lists a species twice");
    meta.species.push_back(static_cast<int>(z.number));
  }
  const json::Value* refs = doc.get("reference_energies");
  if (refs != nullptr && refs->type != json::Value::Null) {
    if (refs->type != json::Value::Array || refs->array.size() != meta.species.size())
      throw Error(path + ": exported model metadata 'reference_energies' is not one number per species");
    for (const json::Value& e : refs->array) {
      if (e.type != json::Value::Number || !std::isfinite(e.number))
        throw Error(path + ": exported model metadata 'reference_energies' is not one number per species");
      meta.reference_energies.push_back(e.number);
    }
  }
  if (!(meta.cutoff > 0 && std::isfinite(meta.cutoff)))
    throw Error(path + ": exported model metadata has no positive finite cutoff");
  if (meta.num_layers < 1 || !(meta.interaction_range >= meta.cutoff && std::isfinite(meta.interaction_range)))
    throw Error(path + ": exported model metadata has invalid num_layers / interaction_range");
  if (meta.species.empty()) throw Error(path + ": exported model metadata lists no species");
  if (meta.dtype != "float32" && meta.dtype != "float64")
    throw Error(path + ": exported model dtype '" + meta.dtype + "' is not float32 or float64");
  if (meta.force_mode != "gradient" && meta.force_mode != "direct")
    throw Error(path + ": exported model force_mode '" + meta.force_mode + "' is not gradient or direct");
  return meta;
}

// The metadata's species must be the ones the weights embed (the students' z_to_index buffer: -1 for an
// element they do not know): an element only in the metadata would pass the type check and be looked up at
// index -1, another element's weights. Modules without that buffer are taken at their metadata's word.
void check_species_match(const std::vector<int>& species, const torch::jit::Module& module, const std::string& path) {
  for (const auto& buffer : module.named_buffers(/*recurse=*/true)) {
    const std::string& name = buffer.name;
    if (name != "z_to_index" && (name.size() < 11 || name.compare(name.size() - 11, 11, ".z_to_index") != 0)) continue;
    const torch::Tensor table = buffer.value.to(torch::kCPU, torch::kLong).contiguous();
    std::vector<int> embedded;
    for (int64_t z = 0; z < table.numel(); ++z)
      if (table.data_ptr<int64_t>()[z] >= 0) embedded.push_back(static_cast<int>(z));
    std::vector<int> listed(species);
    std::sort(listed.begin(), listed.end());
    if (listed != embedded) {
      std::ostringstream msg;
      msg << path << ": exported model metadata lists species";
      for (int z : listed) msg << " " << z;
      msg << " but its weights embed";
      for (int z : embedded) msg << " " << z;
      msg << " (metadata edited after export?); export the model again";
      throw Error(msg.str());
    }
    return;
  }
}

// A damaged weights file (or a blown-up geometry) gives NaN: an error, not a run that carries on with it.
void check_finite(const Result& out, const std::string& path) {
  bool finite = std::isfinite(out.energy);
  for (size_t k = 0; finite && k < out.forces.size(); ++k) finite = std::isfinite(out.forces[k]);
  for (size_t k = 0; finite && k < out.atom_virial.size(); ++k) finite = std::isfinite(out.atom_virial[k]);
  if (!finite)
    throw Error(path + ": the model returned NaN or Inf energy/forces/virials (a damaged model file, or "
                "atoms on top of each other)");
}

// The explicit-graph interface's inputs as tensors: positions [n, 3] (float64) and atomic numbers [n] view the
// caller's memory, which the model only reads; the edges are copied into one edge_index [2, E].
struct GraphInputs {
  torch::Tensor positions, numbers, edge_index;
};

GraphInputs graph_inputs(const double* positions, const int64_t* numbers, int64_t n, const int64_t* receivers,
                         const int64_t* senders, int64_t num_edges) {
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  const auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  GraphInputs in;
  in.positions = torch::from_blob(const_cast<double*>(positions), {n, 3}, f64);
  in.numbers = torch::from_blob(const_cast<int64_t*>(numbers), {n}, i64);
  in.edge_index = torch::empty({2, num_edges}, i64);
  if (num_edges > 0) {
    std::memcpy(in.edge_index.data_ptr<int64_t>(), receivers, sizeof(int64_t) * num_edges);
    std::memcpy(in.edge_index.data_ptr<int64_t>() + num_edges, senders, sizeof(int64_t) * num_edges);
  }
  return in;
}

// The TorchScript forward (or with_atom_virial) on graph tensors: forward's outputs[, atom_virial].
std::vector<torch::Tensor> scripted_forward(torch::jit::Module& module, bool direct_forces, const torch::Tensor& pos,
                                            const torch::Tensor& z, const torch::Tensor& edge_index,
                                            const torch::Tensor& shift, int64_t nlocal, AtomVirial atom_virial) {
  std::vector<torch::jit::IValue> inputs{pos, z, edge_index, shift, nlocal};
  c10::intrusive_ptr<c10::ivalue::Tuple> result;
  if (direct_forces) {
    torch::NoGradGuard no_grad;
    result = module.forward(inputs).toTuple();
  } else {  // forces by autograd: on even when the caller (Python under torch.no_grad) turned it off
    torch::AutoGradMode enable_grad(true);
    if (atom_virial == AtomVirial::kNone) {
      result = module.forward(inputs).toTuple();
    } else {
      inputs.emplace_back(atom_virial == AtomVirial::kExact);
      result = module.get_method("with_atom_virial")(inputs).toTuple();
    }
  }
  std::vector<torch::Tensor> outputs;
  for (const auto& element : result->elements()) outputs.push_back(element.toTensor());
  return outputs;
}

}  // namespace

struct Model::Impl {
  std::string path;
  Metadata meta;
  torch::jit::Module module;
  torch::Dtype dtype = torch::kFloat64;
  std::vector<bool> known = std::vector<bool>(119, false);
  std::unique_ptr<CompiledForward> compiled;  // export --compiled: forward without TorchScript where it can
  bool use_compiled = true;                    // off while check_compiled computes the TorchScript reference
};

Model::Model(const std::string& path, int num_threads) : impl_(new Impl) {
  keep_freed_memory();
  impl_->path = path;
  check_file(path);
  check_archive(path);  // a flipped byte in a weight record would otherwise load and give wrong energies
  impl_->meta = parse_metadata(read_metadata_json(path), path);
  try {
    impl_->module = torch::jit::load(path, torch::kCPU);
  } catch (const c10::Error& err) {
    throw Error(path + ": cannot load the TorchScript module (" + first_line(err.what_without_backtrace()) + ")");
  } catch (const std::exception& err) {  // a TorchScript compile error (damaged code record) is not a c10::Error
    throw Error(path + ": cannot load the TorchScript module (" + first_line(err.what()) + ")");
  }
  impl_->module.eval();
  check_species_match(impl_->meta.species, impl_->module, path);
  impl_->dtype = impl_->meta.dtype == "float32" ? torch::kFloat32 : torch::kFloat64;
  for (int z : impl_->meta.species) impl_->known[z] = true;
  impl_->compiled = std::make_unique<CompiledForward>(path, impl_->meta.json);
  check_compiled();
  if (num_threads > 0) at::set_num_threads(num_threads);
}

void Model::check_compiled() {
  CompiledForward& compiled = *impl_->compiled;
  if (!compiled.loaded()) return;
  // The compiled programs must be this file's model (records copied from another file, a damaged build or a
  // miscompile would otherwise give finite wrong numbers): both builds and the halo programs against the
  // TorchScript methods on a small graph: atoms on a helix (neighbours 1.33 Å apart, closer for a cutoff below
  // 3.3 Å) cycling through every species, the last two ghosts.
  const Metadata& meta = impl_->meta;
  const int64_t n = std::max<int64_t>(7, static_cast<int64_t>(meta.species.size()) + 2), nlocal = n - 2;
  const double scale = std::min(1.0, 0.4 * meta.cutoff / 1.33);
  std::vector<double> positions(3 * n);
  std::vector<int64_t> numbers(n);
  for (int64_t k = 0; k < n; ++k) {
    positions[3 * k] = scale * 1.2 * std::cos(1.1 * k);
    positions[3 * k + 1] = scale * 1.2 * std::sin(1.1 * k);
    positions[3 * k + 2] = scale * 0.45 * k;
    numbers[k] = meta.species[k % meta.species.size()];
  }
  std::vector<int64_t> receivers, senders, local_receivers, local_senders;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double d2 = 0.0;
      for (int a = 0; a < 3; ++a) d2 += std::pow(positions[3 * j + a] - positions[3 * i + a], 2);
      if (i == j || d2 >= meta.cutoff * meta.cutoff) continue;
      receivers.push_back(i), senders.push_back(j);
      if (i < nlocal) local_receivers.push_back(i), local_senders.push_back(j);
    }
  if (local_receivers.size() < 2) {  // cannot happen with neighbours at 0.4 x cutoff; never run unchecked
    compiled.disable("TorchScript forward: the compiled programs could not be checked on a test graph");
    return;
  }
  const double tol = meta.dtype == "float32" ? 1e-3 : 1e-8;  // float32 rounding vs a wrong build's O(1) (aoti.py)
  double worst = 0.0;  // largest relative difference of any output
  auto compare = [&worst](const torch::Tensor& a, const torch::Tensor& b) {
    const torch::Tensor x = a.to(torch::kFloat64), y = b.to(torch::kFloat64);
    const double scale = y.numel() == 0 ? 1.0 : y.abs().max().item<double>() + 1e-6;
    const double diff = x.numel() == 0 ? 0.0 : (x - y).abs().max().item<double>() / scale;
    worst = std::max(worst, std::isfinite(diff) ? diff : INFINITY);
  };
  try {
    c10::InferenceMode not_inference(false);
    const GraphInputs in = graph_inputs(positions.data(), numbers.data(), n, receivers.data(), senders.data(),
                                        static_cast<int64_t>(receivers.size()));
    const torch::Tensor shifts = torch::zeros({in.edge_index.size(1), 3}, torch::kFloat64);
    const std::vector<torch::Tensor> reference = scripted_forward(
        impl_->module, meta.force_mode == "direct", in.positions, in.numbers, in.edge_index, shifts, nlocal,
        AtomVirial::kNone);
    for (bool threaded : {false, true}) {
      torch::NoGradGuard no_grad;
      const std::vector<torch::Tensor> got = compiled.run_build(
          threaded, {in.positions, in.numbers, in.edge_index, shifts, torch::scalar_tensor(nlocal, torch::kLong)});
      for (size_t k = 0; k < 4; ++k) compare(got.at(k), reference.at(k));
    }
    if (compiled.has_halo() && has_halo()) {  // the local atoms' edges, the other two atoms as ghosts of none
      OwnerExchange none({0, 1}, nlocal);     // (the ghosts copy atoms 0, 1: any owner serves a comparison)
      const AtomVirial kind = has_atom_virial() ? AtomVirial::kExact : AtomVirial::kNone;
      Result results[2];
      for (int use : {0, 1}) {
        impl_->use_compiled = use == 1;
        compute_halo(positions.data(), numbers.data(), n, nlocal, local_receivers.data(), local_senders.data(),
                     static_cast<int64_t>(local_receivers.size()), none, results[use], kind);
      }
      impl_->use_compiled = true;
      auto tensor = [](const std::vector<double>& v) { return torch::tensor(v, torch::kFloat64); };
      compare(torch::tensor(results[1].energy), torch::tensor(results[0].energy));
      compare(tensor(results[1].forces), tensor(results[0].forces));
      compare(tensor(results[1].atom_virial), tensor(results[0].atom_virial));
    }
  } catch (const std::exception& err) {
    impl_->use_compiled = true;
    compiled.disable("TorchScript forward: the compiled programs failed on a test graph (" + failure_line(err.what()) +
                     "; a damaged file? export again with --compiled)");
    return;
  }
  if (!(worst <= tol)) {
    std::ostringstream msg;
    msg << "TorchScript forward: the compiled programs do not reproduce this file's TorchScript model on a test "
           "graph (relative difference " << worst << "; records from another file, or a damaged build? export "
           "again with --compiled)";
    compiled.disable(msg.str());
  }
}

void set_jit_optimize(bool on) { torch::jit::setGraphExecutorOptimize(on); }

bool keep_freed_memory() {
  // the setting as engine/allocator.py reads it: "heap" (unset, empty) or "system", case and spaces aside
  const char* raw = std::getenv("HESSFORGE_MALLOC");
  std::string setting;
  for (const char* c = raw; c != nullptr && *c != '\0'; ++c)
    if (!std::isspace(static_cast<unsigned char>(*c))) setting += static_cast<char>(std::tolower(*c));
  if (!setting.empty() && setting != "heap" && setting != "system")
    throw Error(std::string("HESSFORGE_MALLOC='") + raw + "': expected 'system' (glibc's defaults) or 'heap' "
                "(large freed blocks kept for reuse; the default)");
  static const bool tuned = [&setting] {
    if (setting == "system") return false;
#ifdef __GLIBC__
    return mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1;
#else
    return false;
#endif
  }();
  return tuned;
}

Model::~Model() = default;

const Metadata& Model::metadata() const { return impl_->meta; }
const std::string& Model::path() const { return impl_->path; }
bool Model::knows(int z) const { return z > 0 && z < 119 && impl_->known[z]; }
bool Model::compiled() const { return impl_->compiled->loaded(); }
const std::string& Model::compiled_note() const { return impl_->compiled->note(); }
bool Model::has_atom_virial() const {
  return impl_->meta.virial && impl_->module.find_method("with_atom_virial").has_value();
}

void Model::compute_graph(const double* positions, const int64_t* numbers, int64_t n, int64_t nlocal,
                          const int64_t* receivers, const int64_t* senders, const double* shifts,
                          int64_t num_edges, Result& out, AtomVirial atom_virial) const {
  if (nlocal < 0 || nlocal > n) nlocal = n;
  if (atom_virial != AtomVirial::kNone && !has_atom_virial())
    throw Error(impl_->path + (impl_->meta.virial
                ? ": this file was exported before per-atom virials existed; export the checkpoint again"
                : ": a direct-force model has no virial, per atom or total; export a gradient-force model"));
  if (atom_virial == AtomVirial::kExact && shifts != nullptr)
    for (int64_t k = 0; k < 3 * num_edges; ++k)
      if (shifts[k] != 0.0)
        throw Error(impl_->path + ": exact per-atom virials need periodic images as explicit (ghost) atoms, "
                    "not edge shifts");
  // Normal tensors even when the caller (Python under torch.inference_mode) is in inference mode: autograd
  // must be able to save them for the gradient models' backward.
  c10::InferenceMode not_inference(false);
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  // The exported interface is float64 whatever the model dtype (engine/export.py).
  const GraphInputs in = graph_inputs(positions, numbers, n, receivers, senders, num_edges);
  const torch::Tensor &pos = in.positions, &z = in.numbers, &edge_index = in.edge_index;
  torch::Tensor shift = shifts == nullptr ? torch::zeros({num_edges, 3}, f64)
                                         : torch::from_blob(const_cast<double*>(shifts), {num_edges, 3}, f64);
  std::vector<torch::Tensor> outputs;  // energy, node_energy, forces, virial[, atom_virial]
  try {
    if (impl_->use_compiled && atom_virial == AtomVirial::kNone && impl_->compiled->can_run(n, num_edges)) {
      torch::NoGradGuard no_grad;  // the compiled graph holds the backward's operations itself
      try {
        outputs = impl_->compiled->run({pos, z, edge_index, shift, torch::scalar_tensor(nlocal, torch::kLong)});
      } catch (const std::exception&) {
        outputs.clear();  // AOTInductor's errors name no cause (it prints one): TorchScript runs, and names it
      }
    }
    if (outputs.empty())
      outputs = scripted_forward(impl_->module, impl_->meta.force_mode == "direct", pos, z, edge_index, shift, nlocal,
                                 atom_virial);
  } catch (const Error&) {
    throw;
  } catch (const c10::Error& err) {
    throw Error(impl_->path + ": model evaluation failed (" + first_line(err.what_without_backtrace()) + ")");
  } catch (const std::exception& err) {  // torch::jit::JITException: an error raised inside the scripted model
    throw Error(impl_->path + ": model evaluation failed (" + failure_line(err.what()) + ")");
  }
  out.energy = outputs[0].to(torch::kFloat64).item<double>();
  torch::Tensor node_energy = outputs[1].to(torch::kFloat64).contiguous();
  torch::Tensor forces = outputs[2].to(torch::kFloat64).contiguous();
  torch::Tensor virial = outputs[3].to(torch::kFloat64).contiguous();
  out.node_energy.assign(node_energy.data_ptr<double>(), node_energy.data_ptr<double>() + n);
  out.forces.assign(forces.data_ptr<double>(), forces.data_ptr<double>() + 3 * n);
  std::memcpy(out.virial, virial.data_ptr<double>(), 9 * sizeof(double));
  out.atom_virial.clear();
  if (atom_virial != AtomVirial::kNone) {
    torch::Tensor per_atom = outputs[4].to(torch::kFloat64).contiguous();
    if (per_atom.numel() != 9 * n)
      throw Error(impl_->path + ": the model returned per-atom virials of the wrong shape (a damaged or edited "
                  "model file?); export it again");
    out.atom_virial.assign(per_atom.data_ptr<double>(), per_atom.data_ptr<double>() + 9 * n);
  }
  out.num_edges = num_edges;
  check_finite(out, impl_->path);
}


bool Model::has_halo() const {
  return impl_->meta.halo_width > 0 && impl_->module.find_method("halo_layer").has_value();
}

void OwnerExchange::forward(double* rows, int64_t width) {
  for (size_t g = 0; g < owner_.size(); ++g)
    std::memcpy(rows + (nlocal_ + g) * width, rows + owner_[g] * width, sizeof(double) * width);
}

void OwnerExchange::reverse(double* rows, int64_t width) {
  for (size_t g = 0; g < owner_.size(); ++g) {
    const double* ghost = rows + (nlocal_ + g) * width;
    double* own = rows + owner_[g] * width;
    for (int64_t c = 0; c < width; ++c) own[c] += ghost[c];
  }
}

namespace {

// The model calls of layer-wise halo exchange and their gradients, seed by seed (retain: more seeds follow):
// TorchScript methods with autograd graphs kept between the calls, or the compiled programs (explicit
// vector-Jacobian products that recompute their forward). compute_halo runs the same algorithm over either.
class HaloOps {
 public:
  virtual ~HaloOps() = default;
  virtual std::vector<torch::Tensor> edges(const torch::Tensor& vec) = 0;  // unit [E,3], rbf [E,K], fcut [E]
  virtual torch::Tensor layer(int k, const torch::Tensor& state) = 0;      // [nlocal, W]
  // (atomic energies [nlocal] f64, direct forces [nlocal, 3] f64 or [0, 3]) of the last layer's local states
  virtual std::vector<torch::Tensor> readout(const torch::Tensor& last) = 0;
  virtual torch::Tensor readout_grad(const torch::Tensor& g_energy, bool retain) = 0;  // d/d(last states)
  // (d/d state_k, d/d unit, d/d rbf, d/d fcut) for a gradient of layer k's output
  virtual std::vector<torch::Tensor> layer_grad(int k, const torch::Tensor& g_out, bool retain) = 0;
  virtual torch::Tensor edges_grad(const std::vector<torch::Tensor>& g_features, bool retain) = 0;  // d/d vec
};

torch::Tensor defined_or_zeros(const torch::Tensor& g, const torch::Tensor& like) {
  return g.defined() ? g : torch::zeros_like(like);
}

class ScriptedHalo : public HaloOps {
 public:
  ScriptedHalo(torch::jit::Module& module, bool direct, const torch::Tensor& z, const torch::Tensor& edge_index,
               int64_t nlocal)
      : module_(module), grad_(!direct), z_local_(z.narrow(0, 0, nlocal)), edge_index_(edge_index), nlocal_(nlocal) {}

  std::vector<torch::Tensor> edges(const torch::Tensor& vec) override {
    vec_ = vec.detach().requires_grad_(grad_);  // a leaf: forces are d/d(edge vectors)
    edge_out_.clear();
    edge_in_.clear();
    const auto features = module_.get_method("halo_edges")({vec_}).toTuple();  // held: elements() refers into it
    for (const auto& f : features->elements()) {
      edge_out_.push_back(f.toTensor());
      edge_in_.push_back(f.toTensor().detach().requires_grad_(grad_));  // detached leaves the layers read
    }
    return edge_in_;
  }
  // each layer on a detached input, so that its backward stops at the exchange
  torch::Tensor layer(int k, const torch::Tensor& state) override {
    layer_in_.push_back(state.detach().requires_grad_(grad_));
    layer_out_.push_back(module_.get_method("halo_layer")(
        {k, layer_in_.back(), edge_index_, edge_in_[0], edge_in_[1], edge_in_[2], nlocal_}).toTensor());
    return layer_out_.back();
  }
  std::vector<torch::Tensor> readout(const torch::Tensor& last) override {
    last_ = last.detach().requires_grad_(grad_);
    const auto out = module_.get_method("halo_readout")({z_local_, last_}).toTuple();
    energy_ = out->elements()[0].toTensor().to(torch::kFloat64);
    return {energy_, out->elements()[1].toTensor()};
  }
  torch::Tensor readout_grad(const torch::Tensor& g_energy, bool retain) override {
    return defined_or_zeros(torch::autograd::grad({energy_}, {last_}, {g_energy}, retain, false, true)[0], last_);
  }
  std::vector<torch::Tensor> layer_grad(int k, const torch::Tensor& g_out, bool retain) override {
    auto grads = torch::autograd::grad({layer_out_[k]}, {layer_in_[k], edge_in_[0], edge_in_[1], edge_in_[2]},
                                       {g_out}, retain, false, true);
    grads[0] = defined_or_zeros(grads[0], layer_in_[k]);
    for (int a = 0; a < 3; ++a) grads[a + 1] = defined_or_zeros(grads[a + 1], edge_in_[a]);
    return grads;
  }
  torch::Tensor edges_grad(const std::vector<torch::Tensor>& g_features, bool retain) override {
    return defined_or_zeros(torch::autograd::grad(edge_out_, {vec_}, g_features, retain, false, true)[0], vec_);
  }

 private:
  torch::jit::Module& module_;
  bool grad_;
  torch::Tensor z_local_, edge_index_, vec_, last_, energy_;
  int64_t nlocal_;
  std::vector<torch::Tensor> edge_out_, edge_in_, layer_in_, layer_out_;
};

class CompiledHalo : public HaloOps {
 public:
  CompiledHalo(const CompiledForward& compiled, torch::Dtype dtype, const torch::Tensor& z,
               const torch::Tensor& edge_index, int64_t nlocal)
      : compiled_(compiled), z_local_(z.narrow(0, 0, nlocal)), edge_index_(edge_index),
        marker_(torch::empty({nlocal, 0}, torch::TensorOptions().dtype(dtype))) {}

  std::vector<torch::Tensor> edges(const torch::Tensor& vec) override {
    vec_ = vec;
    features_ = compiled_.run_halo("edges", {vec_});
    return features_;
  }
  torch::Tensor layer(int k, const torch::Tensor& state) override {
    states_.push_back(state);
    return compiled_.run_halo("layer" + std::to_string(k), layer_inputs(k))[0];
  }
  std::vector<torch::Tensor> readout(const torch::Tensor& last) override {
    last_ = last;
    return compiled_.run_halo("readout", {z_local_, last_});
  }
  torch::Tensor readout_grad(const torch::Tensor& g_energy, bool) override {
    return compiled_.run_halo("readout_vjp", {z_local_, last_, g_energy})[0];
  }
  std::vector<torch::Tensor> layer_grad(int k, const torch::Tensor& g_out, bool) override {
    std::vector<torch::Tensor> inputs = layer_inputs(k);
    inputs.push_back(g_out);
    return compiled_.run_halo("layer" + std::to_string(k) + "_vjp", inputs);
  }
  torch::Tensor edges_grad(const std::vector<torch::Tensor>& g_features, bool) override {
    return compiled_.run_halo("edges_vjp", {vec_, g_features[0], g_features[1], g_features[2]})[0];
  }

 private:
  std::vector<torch::Tensor> layer_inputs(int k) const {
    return {states_[k], edge_index_, features_[0], features_[1], features_[2], marker_};
  }
  const CompiledForward& compiled_;
  torch::Tensor z_local_, edge_index_, marker_, vec_, last_;
  std::vector<torch::Tensor> features_, states_;
};

}  // namespace

void Model::compute_halo(const double* positions, const int64_t* numbers, int64_t n, int64_t nlocal,
                         const int64_t* receivers, const int64_t* senders, int64_t num_edges,
                         HaloExchange& exchange, Result& out, AtomVirial atom_virial) const {
  const std::string& path = impl_->path;
  if (!has_halo())
    throw Error(path + ": this file was exported before layer-wise halo exchange existed; export the checkpoint "
                "again (or use ghost atoms to num_layers x cutoff)");
  if (atom_virial != AtomVirial::kNone && !has_atom_virial())
    throw Error(path + ": a direct-force model has no virial, per atom or total; export a gradient-force model");
  if (nlocal < 0 || nlocal > n) throw Error("compute_halo: nlocal out of range");
  for (int64_t e = 0; e < num_edges; ++e)
    if (receivers[e] < 0 || receivers[e] >= nlocal || senders[e] < 0 || senders[e] >= n)
      throw Error("compute_halo: every edge's receiver must be a local atom and its sender an atom");
  const bool direct = impl_->meta.force_mode == "direct";
  const torch::Dtype dtype = impl_->dtype;
  torch::jit::Module& module = impl_->module;
  c10::InferenceMode not_inference(false);  // as in compute_graph
  torch::AutoGradMode grad_mode(!direct);
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  const GraphInputs in = graph_inputs(positions, numbers, n, receivers, senders, num_edges);
  const torch::Tensor &pos = in.positions, &z = in.numbers, &edge_index = in.edge_index;
  const torch::Tensor recv = edge_index[0], send = edge_index[1];
  const int layers = impl_->meta.num_layers;
  const int64_t width = impl_->meta.halo_width;
  // L layers need L - 1 exchanges each way: the last layer's states are read on the local atoms only, so its
  // ghosts' states are neither sent nor (in the backward pass) have a gradient to send back
  torch::Tensor rows = torch::zeros({n, width}, f64);
  out.energy = 0.0;
  out.node_energy.assign(n, 0.0);
  out.forces.assign(3 * n, 0.0);
  std::fill(out.virial, out.virial + 9, 0.0);
  out.atom_virial.assign(atom_virial == AtomVirial::kNone ? 0 : 9 * n, 0.0);
  out.num_edges = num_edges;
  // Exact per-atom virials: besides dE/d(.) three moment gradients dE_a/d(.), E_a = sum_i (x_i - c)_a U_i,
  // travel back through the layers (seeds 1..3); W_j = dE_a/dx_j - (x_j - c)_a dE/dx_j as in compute_graph.
  const int seeds = atom_virial == AtomVirial::kExact ? 4 : 1;
  if (n == 0) {  // a process without atoms contributes nothing, but takes part in every exchange
    for (int k = 0; k + 1 < layers; ++k) exchange.forward(rows.data_ptr<double>(), width);
    for (int k = 0; k + 1 < layers && !direct; ++k) exchange.reverse(rows.data_ptr<double>(), seeds * width);
    return;
  }
  // the compiled programs where the file has them and the sizes are ones they were traced for (>= 2)
  // (no TorchScript rerun of a failing compiled program here, unlike compute_graph: the exchanges have begun)
  const bool compiled = impl_->use_compiled && impl_->compiled->has_halo() && n >= 2 && nlocal >= 2 && num_edges >= 2;
  std::unique_ptr<HaloOps> ops;
  if (compiled)
    ops = std::make_unique<CompiledHalo>(*impl_->compiled, dtype, z, edge_index, nlocal);
  else
    ops = std::make_unique<ScriptedHalo>(module, direct, z, edge_index, nlocal);
  const std::string failed = compiled ? ": a compiled program failed (" : ": model evaluation failed (";
  const std::string more = compiled ? "; AOTInductor printed the cause on stderr; HESSFORGE_COMPILED=off runs "
                                      "TorchScript)"
                                    : ")";
  try {
    // edge vectors in float64 (large coordinates), then the model dtype
    const torch::Tensor vec64 = pos.index_select(0, send) - pos.index_select(0, recv);
    const torch::Tensor vec = vec64.to(dtype);
    const std::vector<torch::Tensor> features = ops->edges(vec);
    torch::Tensor state = module.get_method("halo_embed")({z}).toTensor();
    if (state.dim() != 2 || state.size(0) != n || state.size(1) != width)
      throw Error(path + ": the model's node states do not match its metadata's halo_width (a damaged or edited "
                  "model file?); export it again");
    // Each layer's backward stops at the exchange: the gradient of a ghost's state belongs to its owner
    // (exchange.reverse), possibly on another process.
    torch::Tensor last;
    for (int k = 0; k < layers; ++k) {
      last = ops->layer(k, state);
      if (k + 1 == layers) break;
      rows.narrow(0, 0, nlocal).copy_(last.detach());
      exchange.forward(rows.data_ptr<double>(), width);
      state = rows.to(dtype, /*non_blocking=*/false, /*copy=*/true);
    }
    auto readout = ops->readout(last.detach());  // [nlocal, W] -> energies
    const torch::Tensor local_energy = readout[0].to(torch::kFloat64);
    out.energy = local_energy.sum().item<double>();
    std::memcpy(out.node_energy.data(), local_energy.contiguous().data_ptr<double>(), sizeof(double) * nlocal);
    if (direct) {
      const torch::Tensor f = readout[1].to(torch::kFloat64).contiguous();
      std::memcpy(out.forces.data(), f.data_ptr<double>(), sizeof(double) * 3 * nlocal);
      check_finite(out, path);
      return;
    }
    // backward, last layer first
    // positions relative to the local atoms' centroid (the moments' origin; any origin gives the same W_j, but
    // float32 models keep more digits near it)
    const torch::Tensor centred = pos - pos.narrow(0, 0, nlocal).mean(0);
    const torch::Tensor local_centred = centred.narrow(0, 0, nlocal);  // float64, as the positions
    // d E_s / d (local states after the last layer), s = 0 (energy) and 1..3 (moments E_a = sum_i (x_i - c)_a U_i)
    std::vector<torch::Tensor> g_out;
    for (int seed = 0; seed < seeds; ++seed) {
      const torch::Tensor g_energy = seed == 0 ? torch::ones({nlocal}, f64) : local_centred.select(1, seed - 1);
      g_out.push_back(ops->readout_grad(g_energy.contiguous(), seed + 1 < seeds));
    }
    std::vector<std::vector<torch::Tensor>> g_edges(seeds);
    for (auto& per_seed : g_edges)
      for (const auto& feature : features) per_seed.push_back(torch::zeros_like(feature));
    torch::Tensor seed_rows = seeds == 1 ? rows : torch::zeros({n, seeds * width}, f64);
    for (int k = layers - 1; k >= 0; --k) {
      std::vector<torch::Tensor> g_in;
      for (int seed = 0; seed < seeds; ++seed) {
        auto grads = ops->layer_grad(k, g_out[seed], seed + 1 < seeds);
        for (int a = 0; a < 3; ++a) g_edges[seed][a] += grads[a + 1];
        g_in.push_back(grads[0]);
      }
      if (k == 0) break;  // the first layer's input (the embedding) does not depend on positions
      // A ghost state's gradients go to its owner (exchange.reverse), whose position may differ by a periodic
      // image shift S: the moments travel as g_a - (x_row - c)_a g_0 = sum_i (x_i - x_row)_a dU_i/d(state), which
      // does not depend on the frame, and come back as that + (x_owner - c')_a g_0 in the owner's.
      seed_rows.narrow(1, 0, width).copy_(g_in[0]);
      const torch::Tensor g_energy = seed_rows.narrow(1, 0, width);  // g_0 in float64
      for (int seed = 1; seed < seeds; ++seed)
        seed_rows.narrow(1, seed * width, width)
            .copy_(g_in[seed].to(torch::kFloat64) - centred.select(1, seed - 1).unsqueeze(1) * g_energy);
      exchange.reverse(seed_rows.data_ptr<double>(), seeds * width);
      const torch::Tensor local_rows = seed_rows.narrow(0, 0, nlocal);
      g_out[0] = local_rows.narrow(1, 0, width).to(dtype);
      for (int seed = 1; seed < seeds; ++seed)
        g_out[seed] = (local_rows.narrow(1, seed * width, width) +
                       local_centred.select(1, seed - 1).unsqueeze(1) * local_rows.narrow(1, 0, width)).to(dtype);
    }
    // through the edge features to the edge vectors: d E_s / d r_e
    std::vector<torch::Tensor> g_vec;
    for (int seed = 0; seed < seeds; ++seed)
      g_vec.push_back(num_edges == 0 ? torch::zeros({num_edges, 3}, f64)
                                     : ops->edges_grad(g_edges[seed], seed + 1 < seeds).to(torch::kFloat64));
    const torch::Tensor forces =
        torch::zeros({n, 3}, f64).index_add(0, recv, g_vec[0]).index_add(0, send, -g_vec[0]);
    std::memcpy(out.forces.data(), forces.contiguous().data_ptr<double>(), sizeof(double) * 3 * n);
    const torch::Tensor per_edge = -vec64.unsqueeze(2) * g_vec[0].unsqueeze(1);  // -r_e (x) dE/dr_e
    const torch::Tensor w = per_edge.sum(0);
    const torch::Tensor w_sym = (0.5 * (w + w.t())).contiguous();
    std::memcpy(out.virial, w_sym.data_ptr<double>(), 9 * sizeof(double));
    torch::Tensor per_atom;
    if (atom_virial == AtomVirial::kSplit) {
      const torch::Tensor half = 0.5 * per_edge;
      per_atom = torch::zeros({n, 3, 3}, f64).index_add(0, recv, half).index_add(0, send, half);
    } else if (atom_virial == AtomVirial::kExact) {
      std::vector<torch::Tensor> moment_rows;  // d E_a / d x_j [n, 3] (r_e = x_send - x_recv)
      for (int seed = 1; seed < seeds; ++seed)
        moment_rows.push_back(
            torch::zeros({n, 3}, f64).index_add(0, send, g_vec[seed]).index_add(0, recv, -g_vec[seed]));
      per_atom = torch::stack(moment_rows, 1) + centred.unsqueeze(2) * forces.unsqueeze(1);
    }
    if (per_atom.defined())
      std::memcpy(out.atom_virial.data(), per_atom.contiguous().data_ptr<double>(), sizeof(double) * 9 * n);
  } catch (const c10::Error& err) {
    throw Error(path + failed + reason_line(err.what_without_backtrace()) + more);
  } catch (const Error&) {
    throw;
  } catch (const std::exception& err) {  // torch::jit::JITException, or one from the caller's exchange
    throw Error(path + failed + failure_line(err.what()) + more);
  }
  check_finite(out, path);
}

void Model::compute(const double* positions, const int64_t* numbers, int64_t n, const double* cell,
                    const bool* pbc, Result& out, AtomVirial atom_virial) const {
  if (atom_virial == AtomVirial::kExact && (pbc[0] || pbc[1] || pbc[2]))
    throw Error(impl_->path + ": exact per-atom virials need periodic images as explicit atoms (LAMMPS ghost "
                "mode); this periodic structure's images are shifts: ask for the edge split");
  for (int64_t k = 0; k < n; ++k) {
    if (numbers[k] < 0 || numbers[k] > 1000 || !knows(static_cast<int>(numbers[k]))) {  // no int wrap-around
      std::ostringstream msg;
      const std::string symbol = numbers[k] > 0 && numbers[k] <= 1000 ? element_symbol(static_cast<int>(numbers[k]))
                                                                       : "Z=" + std::to_string(numbers[k]);
      msg << impl_->path << ": unknown element " << symbol;
      if (symbol.rfind("Z=", 0) != 0) msg << " (Z=" << numbers[k] << ")";  // "Z=0", not "Z=0 (Z=0)"
      msg << " at atom " << k << "; the model knows:";
      for (int z : impl_->meta.species) msg << " " << element_symbol(z);
      throw Error(msg.str());
    }
  }
  const NeighborList nl = neighbor_list(positions, n, cell, pbc, impl_->meta.cutoff);
  const int64_t e = static_cast<int64_t>(nl.size());
  std::vector<double> shift(3 * e);
  for (int64_t k = 0; k < e; ++k) {
    double d2 = 0.0;
    for (int d = 0; d < 3; ++d) {
      shift[3 * k + d] = nl.shifts[3 * k] * cell[d] + nl.shifts[3 * k + 1] * cell[3 + d] + nl.shifts[3 * k + 2] * cell[6 + d];
      const double r = positions[3 * nl.senders[k] + d] - positions[3 * nl.receivers[k] + d] + shift[3 * k + d];
      d2 += r * r;
    }
    if (d2 < kMinAtomDistance * kMinAtomDistance) {
      std::ostringstream msg;
      msg << impl_->path << ": atoms " << nl.receivers[k] << " and " << nl.senders[k] << " are " << std::sqrt(d2)
          << " Å apart: overlapping atoms (an atom written twice?)";
      throw Error(msg.str());
    }
  }
  compute_graph(positions, numbers, n, n, nl.receivers.data(), nl.senders.data(), shift.data(), e, out,
                atom_virial);
}

}  // namespace hessforge
