// Stub of MLX's mlx/backend/cuda/device/utils.cuh (not shipped in the wheels), for compiling
// the CUDA kernels with nvcc as MLX's cuda_kernel would with NVRTC: the types its generated
// kernel signature uses.
#pragma once

#include <cuda/std/array>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define WARP_SIZE 32

namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, 10>;
using Strides = cuda::std::array<int64_t, 10>;
}  // namespace mlx::core::cu
