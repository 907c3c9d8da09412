//! The compute backend, chosen at build time: burn-flex on the CPU by default, burn-cuda with
//! the `cuda` feature. The float type is chosen at run time (`--dtype`).

#[cfg(not(any(feature = "cpu", feature = "cuda")))]
compile_error!("personalize-cli needs a backend: the `cpu` feature (the default) or `cuda`");

#[cfg(all(feature = "cpu", not(feature = "cuda")))]
mod imp {
    pub type B = burn_flex::Flex;
    pub fn device() -> burn_flex::FlexDevice {
        burn_flex::FlexDevice
    }
    pub const NAME: &str = "cpu (burn-flex)";
    pub const IS_GPU: bool = false;
}

#[cfg(feature = "cuda")]
mod imp {
    pub type B = burn_cuda::Cuda<f32, i32>;
    pub fn device() -> burn_cuda::CudaDevice {
        burn_cuda::CudaDevice::default()
    }
    pub const NAME: &str = "cuda (burn-cuda)";
    pub const IS_GPU: bool = true;
}

pub use imp::{device, B, IS_GPU, NAME};

/// Makes `dtype` the float type of every tensor created on the device (`None`: f32, Burn's
/// default). Must run before the first tensor is made: Burn fixes a device's defaults at
/// first use.
pub fn set_float_dtype(dtype: Option<burn::tensor::FloatDType>) -> anyhow::Result<()> {
    let Some(d) = dtype else { return Ok(()) };
    burn::tensor::backend::set_default_float_dtype::<B>(&device(), d).map_err(|e| anyhow::anyhow!("{e:?}"))
}
