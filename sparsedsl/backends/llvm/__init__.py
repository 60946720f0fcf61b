"""The second backend: loop IR straight to LLVM IR with llvmlite (no TVM)."""
