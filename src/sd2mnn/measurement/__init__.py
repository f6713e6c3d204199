"""bench (MNN against ONNX Runtime on this machine) and sweep (what each set of converter
flags costs and buys in size, fidelity and speed)."""
