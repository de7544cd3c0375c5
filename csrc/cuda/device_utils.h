// Host-side helpers shared by the CUDA launchers (stack and energies): cached device attributes, graph-capture
// detection and raising a kernel's dynamic shared-memory limit.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

namespace leakycuda {
namespace cuda_util {

struct DeviceInfo {
  int sms = 1, smem_optin = 48 * 1024;
};

// The device's SM count and opt-in shared memory per block, read once per device.
inline DeviceInfo device_info(int dev) {
  static std::mutex mu;
  static std::map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(dev);
  if (it != cache.end()) return it->second;
  DeviceInfo d;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  cache[dev] = d;
  return d;
}

inline bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// Raises a kernel's dynamic shared-memory limit, once per kernel and device.
inline void allow_smem(const void* kernel, int64_t bytes, int dev) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int64_t> done;
  std::lock_guard<std::mutex> lock(mu);
  int64_t& cur = done[{kernel, dev}];
  if (cur >= bytes) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  cur = bytes;
}

}  // namespace cuda_util
}  // namespace leakycuda
