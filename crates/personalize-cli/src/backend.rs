//! The compute backend, chosen at build time: burn-flex on the CPU by default, burn-cuda with
//! the `cuda` feature.

#[cfg(not(feature = "cuda"))]
mod imp {
    pub type B = burn_flex::Flex;
    pub fn device() -> burn_flex::FlexDevice {
        burn_flex::FlexDevice
    }
    pub const NAME: &str = "cpu (burn-flex)";
}

#[cfg(feature = "cuda")]
mod imp {
    pub type B = burn_cuda::Cuda<f32, i32>;
    pub fn device() -> burn_cuda::CudaDevice {
        burn_cuda::CudaDevice::default()
    }
    pub const NAME: &str = "cuda (burn-cuda)";
}

pub use imp::{device, B, NAME};
