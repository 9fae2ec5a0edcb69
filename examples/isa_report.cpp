// Prints which instruction sets this machine offers the library's kernels and which one they
// use, as chosen at run time (mla/isa.hpp):
//
//   isa_report              active: amx / available: portable avx2 avx512 avx512_bf16 amx
//                           amx_model / best: amx
//   isa_report --available  the available targets, one line, space-separated
//
// MLA_ISA=portable|avx2|avx512|avx512_bf16|amx|amx_model sets the choice; naming a target the
// machine lacks (or an unknown one) prints `error: ...` and exits 1.

#include <cstdio>
#include <string>

#include "cli.hpp"
#include "mla/isa.hpp"

namespace {

constexpr const char* kHelp =
    "usage: isa_report [--available]\n"
    "\n"
    "Prints the instruction set the mla kernels use here (active), the ones this CPU and\n"
    "operating system offer (available) and the best of them (amx_model, the AMX kernels on a\n"
    "software model of the tiles, is never the best). MLA_ISA=portable|avx2|avx512|avx512_bf16|\n"
    "amx|amx_model sets the choice.\n"
    "\n"
    "  --available  print only the available targets, space-separated\n"
    "  --help       this text\n";

struct Args {
  bool available_only = false;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--available") {
      a.available_only = true;
    } else {
      mla::detail::fail("unknown option '", flag, "'\nusage: isa_report [--available]");
    }
  }
  return a;
}

int run(const Args& a) {
  std::string available;
  for (mla::Isa isa : mla::kAllIsas) {
    if (mla::isa_available(isa))
      available += std::string(available.empty() ? "" : " ") + mla::to_string(isa);
  }
  if (a.available_only) {
    std::printf("%s\n", available.c_str());
    return 0;
  }
  const mla::Isa active = mla::active_isa();  // throws for a bad MLA_ISA
  std::printf("active: %s\navailable: %s\nbest: %s\n", mla::to_string(active), available.c_str(),
              mla::to_string(mla::best_isa()));
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return cli::main(argc, argv, kHelp, parse, run); }
