// Every CUDA kernel of remit_ext, instantiated once for fp32, bf16, fp16 and fp64 rows. Kernel
// bodies only: this file includes no torch header, so it compiles (and is compile-checked by
// tools/nvcc_check.py) with nothing but the CUDA toolkit. The torch glue calls the launchers
// declared in launch.h.
#include "cuda/ce_grad.cuh"
#include "cuda/pg_loss.cuh"
#include "cuda/remit_weights.cuh"
#include "cuda/token_stats.cuh"

namespace remit::cuda {

#define REMIT_INSTANTIATE_ROW(T)                                                  \
  template cudaError_t launch_token_stats<T>(const StatsParams<T>&, cudaStream_t); \
  template cudaError_t launch_ce_grad<T>(const GradParams<T>&, cudaStream_t);
#define REMIT_INSTANTIATE_ACC(A)                                                       \
  template cudaError_t launch_remit_weights<A>(const WeightsParams<A>&, cudaStream_t); \
  template cudaError_t launch_pg_terms<A>(const PgParams<A>&, cudaStream_t);
REMIT_CUDA_ROW_TYPES(REMIT_INSTANTIATE_ROW)
REMIT_CUDA_ACC_TYPES(REMIT_INSTANTIATE_ACC)

}  // namespace remit::cuda
