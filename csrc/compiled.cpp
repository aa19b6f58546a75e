#include "compiled.h"

#include <ATen/Parallel.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/headeronly/version.h>
#include <unistd.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <mutex>
#include <sstream>
#include <string_view>

#include "hessforge/core.h"
#include "json_lite.h"

namespace hessforge {

namespace {

bool cpu_supports(const std::string& feature) { return cpu_feature(feature) == 1; }

// "2.13.0+cpu" -> "2.13.0"
std::string release(const std::string& version) { return version.substr(0, version.find('+')); }

std::string this_torch() {
  std::ostringstream v;
  v << TORCH_VERSION_MAJOR << "." << TORCH_VERSION_MINOR << "." << TORCH_VERSION_PATCH;
  return v.str();
}

std::string setting() {
  const char* raw = std::getenv("HESSFORGE_COMPILED");
  std::string value;
  for (const char* c = raw; c != nullptr && *c != '\0'; ++c)
    if (!std::isspace(static_cast<unsigned char>(*c))) value += static_cast<char>(std::tolower(*c));
  if (value.empty()) return "auto";
  if (value != "auto" && value != "off" && value != "serial" && value != "threaded")
    throw Error(std::string("HESSFORGE_COMPILED='") + raw + "': expected auto (the default), serial, threaded or off");
  return value;
}

const std::string& string_field(const json::Value& entry, const std::string& key, const std::string& path) {
  const json::Value* v = entry.get(key);
  if (v == nullptr || v->type != json::Value::String || v->string.empty())
    throw Error(path + ": exported model metadata 'compiled' lacks a valid '" + key + "'");
  return v->string;
}

// An archive record (the package's bytes) in a private temporary file, which the loader unpacks; removed after.
// Loaders are kept per content for the life of the process (see compiled.h).
std::shared_ptr<torch::inductor::AOTIModelPackageLoader> load_record(caffe2::serialize::PyTorchStreamReader& reader,
                                                                     const std::string& record) {
  const std::string name = "extra/" + record;
  if (!reader.hasRecord(name)) throw Error("the record " + name + " is missing");
  auto data = reader.getRecord(name);
  const char* bytes = static_cast<const char*>(std::get<0>(data).get());
  const size_t size = std::get<1>(data);
  static std::mutex mutex;
  static std::map<std::string, std::shared_ptr<torch::inductor::AOTIModelPackageLoader>> loaded;
  const std::string key = std::to_string(size) + ":" + std::to_string(std::hash<std::string_view>{}({bytes, size}));
  std::lock_guard<std::mutex> lock(mutex);
  const auto found = loaded.find(key);
  if (found != loaded.end()) return found->second;
  const char* dir = std::getenv("TMPDIR");
  std::string tmp = std::string(dir != nullptr && *dir != '\0' ? dir : "/tmp") + "/hessforge-compiled-XXXXXX.pt2";
  const int fd = mkstemps(tmp.data(), 4);
  if (fd < 0) throw Error("cannot create a temporary file in " + tmp.substr(0, tmp.rfind('/')));
  size_t left = size;
  bool written = true;
  while (left > 0 && written) {
    const ssize_t w = ::write(fd, bytes, left);
    written = w > 0;
    if (written) bytes += w, left -= static_cast<size_t>(w);
  }
  ::close(fd);
  std::shared_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  try {
    if (!written) throw Error("cannot write the temporary file " + tmp);
    loader = std::make_shared<torch::inductor::AOTIModelPackageLoader>(tmp);
  } catch (...) {
    std::remove(tmp.c_str());
    throw;
  }
  std::remove(tmp.c_str());
  loaded[key] = loader;
  return loader;
}

}  // namespace

int cpu_feature(const std::string& feature) {
  // __builtin_cpu_supports takes a literal: the features Inductor's x86 builds name (engine/aoti.py records them)
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
#define HESSFORGE_FEATURE(name) \
  if (feature == name) return __builtin_cpu_supports(name) ? 1 : 0;
  HESSFORGE_FEATURE("x86-64-v3")
  HESSFORGE_FEATURE("x86-64-v4")
  HESSFORGE_FEATURE("avx2")
  HESSFORGE_FEATURE("fma")
  HESSFORGE_FEATURE("f16c")
  HESSFORGE_FEATURE("avx512f")
  HESSFORGE_FEATURE("avx512dq")
  HESSFORGE_FEATURE("avx512vl")
  HESSFORGE_FEATURE("avx512bw")
  HESSFORGE_FEATURE("avx512vnni")
  HESSFORGE_FEATURE("avx512bf16")
  HESSFORGE_FEATURE("amx-tile")
  HESSFORGE_FEATURE("amx-int8")
  HESSFORGE_FEATURE("amx-bf16")
#undef HESSFORGE_FEATURE
#endif
  return -1;  // a feature this core cannot ask about (or not x86-64): the compiled programs are not used
}

CompiledForward::CompiledForward(const std::string& path, const std::string& metadata_json) {
  const json::Value doc = json::parse(metadata_json);
  const json::Value* entry = doc.get("compiled");
  if (entry == nullptr || entry->type == json::Value::Null) {
    note_ = "TorchScript forward (exported without --compiled)";
    return;
  }
  if (entry->type != json::Value::Object) throw Error(path + ": exported model metadata 'compiled' is not an object");
  const json::Value* packages = entry->get("packages");
  if (packages == nullptr || packages->type != json::Value::Object)
    throw Error(path + ": exported model metadata 'compiled' lacks a valid 'packages'");
  const std::string serial = string_field(*packages, "serial", path);
  const std::string threaded = string_field(*packages, "threaded", path);
  const std::string march = string_field(*entry, "march", path);
  const std::string built_with = string_field(*entry, "torch_version", path);
  std::vector<std::string> features{march};
  const json::Value* listed = entry->get("cpu_features");
  if (listed == nullptr || listed->type != json::Value::Array)
    throw Error(path + ": exported model metadata 'compiled' lacks a valid 'cpu_features'");
  for (const json::Value& f : listed->array) {
    if (f.type != json::Value::String) throw Error(path + ": exported model metadata 'compiled' lacks a valid 'cpu_features'");
    features.push_back(f.string);
  }
  for (const char* key : {"min_atoms", "min_edges"}) {
    const json::Value* v = entry->get(key);
    if (v == nullptr || v->type != json::Value::Number || v->number < 0 || v->number != static_cast<int64_t>(v->number))
      throw Error(path + ": exported model metadata 'compiled' lacks a valid '" + key + "'");
    (std::string(key) == "min_atoms" ? min_atoms_ : min_edges_) = static_cast<int64_t>(v->number);
  }
  choice_ = setting();
  if (choice_ == "off") {
    note_ = "TorchScript forward (HESSFORGE_COMPILED=off)";
    return;
  }
  for (const std::string& feature : features)
    if (!cpu_supports(feature)) {
      note_ = "TorchScript forward: the compiled one was built for " + march + " CPUs and uses " + feature +
              ", which this CPU lacks (export again with --compiled on this machine)";
      return;
    }
  if (release(built_with) != this_torch()) {
    note_ = "TorchScript forward: the compiled one was built with torch " + built_with + ", this core links torch " +
            this_torch() + " (export again with --compiled)";
    return;
  }
  const json::Value* halo = entry->get("halo");  // null: a student without layer-wise methods
  std::map<std::string, std::string> halo_records;
  if (halo != nullptr && halo->type != json::Value::Null) {
    if (halo->type != json::Value::Object) throw Error(path + ": exported model metadata 'compiled' lacks a valid 'halo'");
    for (const auto& program : halo->object) halo_records[program.first] = string_field(*halo, program.first, path);
  }
  try {
    caffe2::serialize::PyTorchStreamReader reader(path);  // the archive's directory read once for every record
    serial_ = load_record(reader, serial);
    threaded_ = load_record(reader, threaded);
    for (const auto& program : halo_records) halo_[program.first] = load_record(reader, program.second);
  } catch (const std::exception& err) {
    const std::string what = err.what();
    disable("TorchScript forward: the compiled one did not load (" + what.substr(0, what.find('\n')) + ")");
    return;
  }
  note_ = "compiled forward (AOTInductor, " + march + "; " +
          (choice_ == "auto" ? std::string("single-thread build below 4 threads, multi-thread build from 4")
                             : "the " + choice_ + " build, HESSFORGE_COMPILED") +
          (halo_.empty() ? "; halo mode runs TorchScript layers (none compiled in this file)"
                         : "; halo mode's layers too") + ")";
}

void CompiledForward::disable(const std::string& note) {
  serial_.reset();
  threaded_.reset();
  halo_.clear();
  note_ = note;
}

std::vector<at::Tensor> CompiledForward::run_build(bool threaded, const std::vector<at::Tensor>& inputs) const {
  return (threaded ? threaded_ : serial_)->run(inputs);
}

CompiledForward::~CompiledForward() = default;

std::vector<at::Tensor> CompiledForward::run_halo(const std::string& program,
                                                  const std::vector<at::Tensor>& inputs) const {
  const auto found = halo_.find(program);
  if (found == halo_.end())
    throw Error("the compiled halo program '" + program + "' is not in the file (a damaged or edited model file?)");
  std::vector<at::Tensor> contiguous;  // the programs index their inputs as dense arrays
  for (const at::Tensor& t : inputs) contiguous.push_back(t.contiguous());
  return found->second->run(contiguous);
}

std::vector<at::Tensor> CompiledForward::run(const std::vector<at::Tensor>& inputs) const {
  // engine/aoti.py: Inductor's multi-thread kernels add with atomics: 2.3x the single-thread build on one thread,
  // 1.5x on two; their 1 -> 2 thread scaling (1.9x vs 1.2x) puts the crossover near 4 threads
  // (bench/results/lammps_cpu.md, "Compiled forward")
  return run_build(choice_ == "threaded" || (choice_ == "auto" && at::get_num_threads() >= 4), inputs);
}

}  // namespace hessforge
