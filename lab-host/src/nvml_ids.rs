//! The GPU instance and compute instance of a MIG device, which name its `nvidia-caps`
//! access nodes. nvml-wrapper 0.13 loads these two NVML functions but does not wrap them,
//! so they are called here through its raw handle: the only unsafe code in the product.
#![allow(unsafe_code)]

use nvml_wrapper::Device;

/// `(gpu_instance_id, compute_instance_id)` of a MIG device handle; `None` when NVML lacks
/// the functions or refuses (a handle that is not a MIG device).
pub(crate) fn instance_ids(mig: &Device<'_>) -> Option<(u32, u32)> {
    let lib = mig.nvml().lib();
    let gpu_instance_fn = lib.nvmlDeviceGetGpuInstanceId.as_ref().ok()?;
    let compute_instance_fn = lib.nvmlDeviceGetComputeInstanceId.as_ref().ok()?;
    let (mut gpu_instance, mut compute_instance) = (0u32, 0u32);
    // SAFETY: the handle comes from a live `Device` borrowed from its `Nvml` (so the library
    // is initialised and the handle valid for the call); each function writes one c_uint
    // through a pointer to a local that outlives the call.
    let (gi_status, ci_status) = unsafe {
        let handle = mig.handle();
        (
            gpu_instance_fn(handle, &raw mut gpu_instance),
            compute_instance_fn(handle, &raw mut compute_instance),
        )
    };
    (gi_status == 0 && ci_status == 0).then_some((gpu_instance, compute_instance))
}
