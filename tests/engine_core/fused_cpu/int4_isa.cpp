// test_int4_isa.py's extension: the fused step's activation quantizer and int4 matmul alone
// (csrc/quantize_rows.h, csrc/int4_matmul.h), built once per instruction set (its -m flags pick
// the branches the headers' macros choose) as torch ops in the namespace NOVAINFER_ISA_NS, so
// that the builds load side by side into one process. torch/library.h, not torch/extension.h
// (pybind11): a build takes a third of the time.
#include <torch/library.h>

#include "int4_matmul.h"
#include "quantize_rows.h"

// NOVAINFER_ISA_NS expanded before TORCH_LIBRARY pastes it into its names.
#define NOVAINFER_ISA_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
NOVAINFER_ISA_LIBRARY(NOVAINFER_ISA_NS, m) {
  m.def("quantize_rows", &novainfer::quantize_rows_tensors);
  m.def("int4_matmul", &novainfer::int4_matmul);
}
