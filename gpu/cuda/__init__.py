"""The CUDA backend's machinery: NVRTC compilation of gpu/kernels/*.cu, module loading and
launches through cuda-python's driver API, and one thin wrapper module per kernel family."""
