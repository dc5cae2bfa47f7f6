//! Errors of the eBPF loader. Every variant says what is missing, so the caller
//! can log it and fall back to its no-eBPF detector.

use std::io;

/// Why FuseWatch could not load, attach or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "built without eBPF programs: clang was missing when berth-ebpf was compiled \
         (install clang and rebuild)"
    )]
    NotBuilt,

    #[error(
        "not root: loading eBPF programs needs root or CAP_BPF + CAP_PERFMON \
         (euid {euid}, no such capabilities)"
    )]
    NotRoot { euid: u32 },

    #[error(
        "kernel BTF not available at /sys/kernel/btf/vmlinux (needs CONFIG_DEBUG_INFO_BTF): {0}"
    )]
    NoBtf(#[source] aya::BtfError),

    #[error("loading the eBPF object (maps, CO-RE relocations): {0}")]
    Object(#[source] aya::EbpfError),

    #[error(
        "BTF tracepoint {0} not found in the kernel BTF (kernel too old or FUSE not built in?)"
    )]
    TracepointMissing(&'static str),

    #[error(
        "attaching {program} as a BTF tracepoint failed (fentry was tried first and refused: \
         {fentry}): {source}"
    )]
    Attach {
        program: &'static str,
        fentry: String,
        #[source]
        source: aya::programs::ProgramError,
    },

    #[error("fentry attach refused (fentry forced): {0}")]
    FentryRefused(String),

    #[error("eBPF object has no {0} (program/loader mismatch)")]
    Missing(&'static str),

    #[error("eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },

    #[error("process {0} does not exist or has already exited")]
    NoSuchProcess(u32),

    #[error("too many watched {what} (limit {limit})")]
    TooMany { what: &'static str, limit: u32 },

    #[error("waiting for eBPF events: {0}")]
    Poll(#[source] io::Error),
}

impl Error {
    pub(crate) fn map(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> Error {
        move |source| Error::Map { map, source }
    }
}
