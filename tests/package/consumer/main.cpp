// A minimal user of the installed (or add_subdirectory'd) package: it must compile against
// mla::mla alone and compute the right values.
#include <Eigen/Core>
#include <cstdio>
#include <mla/mla.hpp>
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
  std::printf("mla %d.%d.%d consumer: %s\n", MLA_VERSION_MAJOR, MLA_VERSION_MINOR,
              MLA_VERSION_PATCH, ok ? "ok" : "WRONG VALUES");
  return ok ? 0 : 1;
}
