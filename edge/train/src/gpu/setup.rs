//! Getting a device: the adapter (compute shaders required, the head must
//! fit the memory budget), the device with the adapter's own limits, and
//! the hooks that turn a lost device or a validation error into a flag
//! instead of a panic. Each is a step of [`super::GpuBackend::new`].

use super::required_bytes;
use crate::TrainError;
use crate::head::HeadSpec;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The first high-performance adapter the environment offers
/// (`WGPU_BACKEND` and friends are honoured).
pub(super) fn request_adapter() -> Result<wgpu::Adapter, TrainError> {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        ..Default::default()
    }))
    .map_err(|e| TrainError::NoGpu(format!("no adapter: {e}")))
}

/// Refuse an adapter without compute shaders or too small for `spec` at
/// `max_batch` rows; returns the memory budget in bytes.
pub(super) fn check_adapter(
    adapter: &wgpu::Adapter,
    memory_fraction: f64,
    spec: &HeadSpec,
    max_batch: usize,
) -> Result<u64, TrainError> {
    let info = adapter.get_info();
    let down = adapter.get_downlevel_capabilities();
    if !down.flags.contains(wgpu::DownlevelFlags::COMPUTE_SHADERS) {
        return Err(TrainError::NoGpu(format!(
            "adapter {} has no compute shaders",
            info.name
        )));
    }
    let limits = adapter.limits();
    let budget_bytes = (limits.max_buffer_size as f64 * memory_fraction) as u64;
    let needed = required_bytes(spec, max_batch);
    if needed > budget_bytes {
        return Err(TrainError::NoGpu(format!(
            "head needs {needed} bytes on the device, over gpu_memory_allocation {memory_fraction} x max_buffer_size {} = {budget_bytes}",
            limits.max_buffer_size
        )));
    }
    Ok(budget_bytes)
}

pub(super) fn request_device(
    adapter: &wgpu::Adapter,
) -> Result<(wgpu::Device, wgpu::Queue), TrainError> {
    pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("dai-train"),
        // The adapter's own limits: the downlevel defaults allow only
        // four storage buffers per stage and the kernels bind five.
        required_limits: adapter.limits(),
        ..Default::default()
    }))
    .map_err(|e| TrainError::NoGpu(format!("{}: {e}", adapter.get_info().name)))
}

/// The flag every call checks: set when the device is lost or reports an
/// uncaptured error.
pub(super) fn watch_device(device: &wgpu::Device) -> Arc<AtomicBool> {
    let lost = Arc::new(AtomicBool::new(false));
    let flag = lost.clone();
    device.set_device_lost_callback(move |reason, msg| {
        tracing::error!(?reason, %msg, "GPU device lost");
        flag.store(true, Ordering::SeqCst);
    });
    // wgpu's default handler panics on validation errors; a daemon must
    // not. Record the error; every later call then fails cleanly.
    let flag = lost.clone();
    device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
        tracing::error!(error = %e, "GPU error; backend disabled");
        flag.store(true, Ordering::SeqCst);
    }));
    lost
}

/// The backend's name as reported by [`crate::Backend::name`].
pub(super) fn adapter_name(adapter: &wgpu::Adapter) -> String {
    let info = adapter.get_info();
    format!(
        "wgpu ({}, {:?}, {:?})",
        info.name, info.backend, info.device_type
    )
}
