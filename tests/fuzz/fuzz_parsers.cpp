// libFuzzer target for the file parsers of mla/io: safetensors headers and tensor reads, .npy
// arrays and config.json. Bad input must end in mla::Error; anything else (another exception,
// a crash, a sanitizer report) is a finding. Run it with `./run.sh fuzz [seconds]`.

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "mla/io.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto file =
        mla::io::SafetensorsFile::parse(std::vector<unsigned char>(data, data + size), "fuzz");
    for (const std::string& name : file.names()) {
      const mla::io::TensorView& t = file.tensor(name);
      // Read every floating-point tensor of rank 1 or 2 the way the loader does.
      if (t.shape.size() == 1) {
        mla::io::to_vector<float>(t, t.shape[0], "fuzz");
      } else if (t.shape.size() == 2) {
        mla::io::to_matrix<float>(t, t.shape[0], t.shape[1], "fuzz");
      }
    }
  } catch (const mla::Error&) {
  }
  try {
    mla::io::parse_npy(data, size, "fuzz");
  } catch (const mla::Error&) {
  }
  try {
    mla::io::parse_config(std::string(reinterpret_cast<const char*>(data), size));
  } catch (const mla::Error&) {
  }
  return 0;
}
