// Integrity of an exported model file: every record of its zip archive against the CRC-32 the writer stored.
// PyTorch's reader does not check them, so a flipped byte in a weight record would load and give wrong
// energies without any error. Plain C++, no torch: stored (uncompressed) records, as torch.jit.save writes,
// with zip64 sizes and offsets where present.
#include <array>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "hessforge/core.h"

namespace hessforge {

namespace {

const std::array<uint32_t, 256>& crc_table() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t n = 0; n < 256; ++n) {
      uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[n] = c;
    }
    return t;
  }();
  return table;
}

class Bytes {
 public:
  Bytes(const std::vector<unsigned char>& data, const std::string& path) : data_(data), path_(path) {}
  uint64_t get(uint64_t at, int width) const {  // little-endian unsigned integer of `width` bytes
    need(at, width);
    uint64_t v = 0;
    for (int k = width - 1; k >= 0; --k) v = (v << 8) | data_[at + k];
    return v;
  }
  void need(uint64_t at, uint64_t count) const {
    if (at > data_.size() || count > data_.size() - at)
      throw Error(path_ + ": damaged model file (its zip directory points past the end of the file)");
  }
  const unsigned char* at(uint64_t offset) const { return data_.data() + offset; }
  uint64_t size() const { return data_.size(); }

 private:
  const std::vector<unsigned char>& data_;
  const std::string& path_;
};

}  // namespace

static uint32_t crc32(const unsigned char* data, uint64_t size) {
  const auto& table = crc_table();
  uint32_t c = 0xFFFFFFFFu;
  for (uint64_t k = 0; k < size; ++k) c = table[(c ^ data[k]) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

void check_archive(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot read model file " + path);
  const std::vector<unsigned char> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const Bytes b(data, path);
  const std::string damaged = path + ": damaged model file (";
  // end of central directory: the last "PK\5\6" within the 64 KiB comment range
  if (b.size() < 22) throw Error(damaged + "too short for a zip archive)");
  uint64_t eocd = b.size() - 22;
  const uint64_t lowest = b.size() > 22 + 65535 ? b.size() - 22 - 65535 : 0;
  while (b.get(eocd, 4) != 0x06054b50u) {
    if (eocd == lowest) throw Error(damaged + "no zip directory at its end: truncated?)");
    --eocd;
  }
  uint64_t entries = b.get(eocd + 10, 2), directory = b.get(eocd + 16, 4);
  if (entries == 0xFFFF || directory == 0xFFFFFFFFu) {  // zip64: the locator sits just before
    if (eocd < 20 || b.get(eocd - 20, 4) != 0x07064b50u) throw Error(damaged + "zip64 locator missing)");
    const uint64_t eocd64 = b.get(eocd - 20 + 8, 8);
    if (b.get(eocd64, 4) != 0x06064b50u) throw Error(damaged + "zip64 directory record missing)");
    entries = b.get(eocd64 + 32, 8);
    directory = b.get(eocd64 + 48, 8);
  }
  uint64_t p = directory;
  for (uint64_t e = 0; e < entries; ++e) {
    if (b.get(p, 4) != 0x02014b50u) throw Error(damaged + "zip directory entry damaged)");
    const uint64_t method = b.get(p + 10, 2), crc = b.get(p + 16, 4);
    uint64_t compressed = b.get(p + 20, 4), uncompressed = b.get(p + 24, 4), local = b.get(p + 42, 4);
    const uint64_t name_len = b.get(p + 28, 2), extra_len = b.get(p + 30, 2), comment_len = b.get(p + 32, 2);
    b.need(p + 46, name_len + extra_len);
    const std::string name(reinterpret_cast<const char*>(b.at(p + 46)), name_len);
    // zip64 extra field (id 1): the 8-byte values of those fields that read 0xFFFFFFFF, in this order
    for (uint64_t x = p + 46 + name_len; x + 4 <= p + 46 + name_len + extra_len;) {
      const uint64_t id = b.get(x, 2), len = b.get(x + 2, 2);
      if (id == 1) {
        uint64_t y = x + 4;
        if (uncompressed == 0xFFFFFFFFu) { uncompressed = b.get(y, 8); y += 8; }
        if (compressed == 0xFFFFFFFFu) { compressed = b.get(y, 8); y += 8; }
        if (local == 0xFFFFFFFFu) { local = b.get(y, 8); y += 8; }
      }
      x += 4 + len;
    }
    if (b.get(local, 4) != 0x04034b50u) throw Error(damaged + "record " + name + " has no local header)");
    const uint64_t start = local + 30 + b.get(local + 26, 2) + b.get(local + 28, 2);
    b.need(start, compressed);
    if (method == 0 && compressed != uncompressed) throw Error(damaged + "record " + name + " has two sizes)");
    if (method == 0 && crc32(b.at(start), compressed) != crc)
      throw Error(damaged + "record " + name + " fails its CRC-32 check: the file changed after export, "
                  "e.g. a bad copy or disk; export it again)");
    p += 46 + name_len + extra_len + comment_len;
  }
}

}  // namespace hessforge
