// A minimal user of the installed (or add_subdirectory'd) package: it must compile against
// mla::mla alone and compute the right values.
#include <Eigen/Core>
#include <cstdio>
#include <mla/mla.hpp>
#include <string>
#ifdef MLA_CONSUMER_IO
#include <mla/io.hpp>
#endif
#include <vector>

int main() {
  const mla::float8_e4m3fn a(464.0f);  // a tie that rounds to the even 448
  const mla::float8_e5m2 b(61440.0f, mla::Fp8Overflow::kNoSaturate);
  Eigen::Matrix<mla::float8_e4m3fn, 2, 2> m;
  m << mla::float8_e4m3fn(1.0f), mla::float8_e4m3fn(0.1f), mla::float8_e4m3fn(-2.0f),
      mla::float8_e4m3fn(3.14159f);
  std::vector<float> back(4);
  mla::from_fp8(m.data(), 4, back.data());
  const bool ok = a.bits() == 0x7E && b.bits() == 0x7C && m(0, 0).bits() == 0x38 &&
                  m(0, 1).bits() == 0x1D && back[1] == -2.0f && back[2] == 0.1015625f &&
                  back[3] == 3.25f;  // column-major
#ifdef MLA_CONSUMER_IO
  // mla::io: a 1 x 1 .npy array parsed from bytes (header padded to 64-byte alignment).
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1), }";
  while ((10 + header.size() + 1) % 64 != 0) header += ' ';
  header += '\n';
  std::vector<unsigned char> file = {
      0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, static_cast<unsigned char>(header.size()), 0};
  file.insert(file.end(), header.begin(), header.end());
  const float one = 1.0f;
  const auto* one_bytes = reinterpret_cast<const unsigned char*>(&one);
  file.insert(file.end(), one_bytes, one_bytes + 4);
  const bool io_ok = mla::io::parse_npy(file.data(), file.size(), "consumer")(0, 0) == 1.0f;
#else
  const bool io_ok = true;
#endif
  std::printf("mla %d.%d.%d consumer: %s\n", MLA_VERSION_MAJOR, MLA_VERSION_MINOR,
              MLA_VERSION_PATCH, ok && io_ok ? "ok" : "WRONG VALUES");
  return ok && io_ok ? 0 : 1;
}
