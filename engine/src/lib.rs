//! Flint: real-time, low-latency LLM decoding.
//!
//! - [`gguf`]: memory-mapped GGUF reader and streaming writer.
//! - [`quant`]: GGML block formats.
//! - [`tokenizer`]: byte-level BPE from GGUF metadata, streaming detokenizer, chat template.
//! - [`backend`]: the op-level [`backend::Backend`] trait and the CPU backends.
//! - [`model`]: the Llama forward pass, written once against the trait.
//! - [`sampler`], [`generate`]: sampling and the streaming, cancellable decode loop.
//! - [`hdl`]: the bit-exact golden model of the HDL reference design (`hdl/`).
//! - [`server`], [`client`]: `flint serve` (WebSocket, OpenAI HTTP, browser page) and the
//!   terminal client for it.
//! - [`synth`], [`pull`], [`bench`]: synthetic models, the default model, benchmarks.

pub mod backend;
pub mod bench;
pub mod client;
pub mod edit;
pub mod generate;
pub mod gguf;
pub mod hdl;
pub mod model;
pub mod pull;
pub mod quant;
pub mod sampler;
pub mod server;
pub mod speculative;
pub mod synth;
pub mod tokenizer;

use anyhow::{bail, Result};
use backend::cpu::{Cpu, CpuMode};
use model::{Forward, Model, Runner};
use std::path::Path;
use std::sync::Arc;

/// Backends selectable at run time (`--backend`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// CUDA where a driver, NVRTC and a GPU are found, else the fast CPU path.
    Auto,
    /// Fast CPU path: quantized SIMD dot products, multi-threaded.
    Cpu,
    /// Exact CPU reference: f32 math on dequantized weights.
    CpuRef,
    Cuda,
    Wgpu,
}

impl std::str::FromStr for BackendKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => BackendKind::Auto,
            "cpu" => BackendKind::Cpu,
            "cpu-ref" => BackendKind::CpuRef,
            "cuda" => BackendKind::Cuda,
            "wgpu" => BackendKind::Wgpu,
            other => bail!("unknown backend {other:?} (auto, cpu, cpu-ref, cuda, wgpu)"),
        })
    }
}

/// A loaded model file: the parsed GGUF, its tokenizer and configuration.
pub struct Loaded {
    pub gguf: gguf::Gguf,
    pub tokenizer: Arc<tokenizer::Tokenizer>,
    pub config: model::Config,
}

impl Loaded {
    pub fn open(path: &Path) -> Result<Self> {
        Self::from_gguf(gguf::Gguf::open(path)?)
    }

    pub fn from_gguf(gguf: gguf::Gguf) -> Result<Self> {
        let config = model::Config::from_gguf(&gguf)?;
        let tokenizer = Arc::new(tokenizer::Tokenizer::from_gguf(&gguf)?);
        if tokenizer.vocab_size() != config.n_vocab {
            bail!("the tokenizer has {} tokens but the model's vocabulary is {}", tokenizer.vocab_size(), config.n_vocab);
        }
        Ok(Loaded { gguf, tokenizer, config })
    }

    /// Weights on `kind`'s device and a session whose KV cache starts at `capacity` positions.
    pub fn runner(&self, kind: BackendKind, capacity: usize) -> Result<Box<dyn Forward>> {
        self.runner_on(kind, capacity, None)
    }

    /// As [`Loaded::runner`], on the wgpu adapter `adapter` names (see
    /// [`backend::wgpu::WgpuOptions::adapter`]) where the backend is wgpu.
    pub fn runner_on(&self, kind: BackendKind, capacity: usize, adapter: Option<&str>) -> Result<Box<dyn Forward>> {
        match kind {
            BackendKind::Cpu | BackendKind::CpuRef => {
                let mode = if kind == BackendKind::Cpu { CpuMode::Fast } else { CpuMode::Exact };
                let model = Arc::new(Model::load(Cpu::new(mode), &self.gguf)?);
                Ok(Box::new(Runner::new(model, capacity)?))
            }
            BackendKind::Auto => match self.runner_on(BackendKind::Cuda, capacity, adapter) {
                Ok(r) => Ok(r),
                Err(e) => {
                    // Silent where no NVIDIA driver is installed at all; said where one is.
                    if backend::cuda::driver_available() {
                        eprintln!("flint: the cuda backend is unavailable ({e:#}); using cpu");
                    }
                    self.runner_on(BackendKind::Cpu, capacity, adapter)
                }
            },
            BackendKind::Cuda => {
                let gpu = backend::cuda::Cuda::new(&Default::default())?;
                let model = Arc::new(Model::load(gpu, &self.gguf)?);
                Ok(Box::new(Runner::new(model, capacity)?))
            }
            BackendKind::Wgpu => {
                let opts = backend::wgpu::WgpuOptions { adapter: adapter.map(str::to_string), ..Default::default() };
                let gpu = backend::wgpu::Wgpu::new(&opts)?;
                let model = Arc::new(Model::load(gpu, &self.gguf)?);
                Ok(Box::new(Runner::new(model, capacity)?))
            }
        }
    }

    pub fn engine(&self, kind: BackendKind, capacity: usize) -> Result<generate::Engine> {
        self.engine_on(kind, capacity, None)
    }

    pub fn engine_on(&self, kind: BackendKind, capacity: usize, adapter: Option<&str>) -> Result<generate::Engine> {
        Ok(generate::Engine::new(self.runner_on(kind, capacity, adapter)?, self.tokenizer.clone()))
    }
}
