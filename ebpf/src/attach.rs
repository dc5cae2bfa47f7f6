//! Attaching the three hooks: fentry first, BTF tracepoints as the fallback.

use aya::programs::{BtfTracePoint, FEntry, ProgramError};
use aya::{Btf, Ebpf};

use crate::Error;

/// How the programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// fentry trampolines on `taskstats_exit`, `fuse_dev_queue_req` and
    /// `fuse_request_end`. Only /dev/fuse requests are seen (not FUSE-over-io_uring),
    /// and `unique` is 0 in stall events (the request is seen before numbering).
    Fentry,
    /// BTF tracepoints `sched_process_exit`, `fuse_request_send`, `fuse_request_end`.
    BtfTracepoint,
}

/// One hook: the program name in fusewatch.bpf.c and what it attaches to.
struct Hook {
    program: &'static str,
    target: &'static str,
}

const FENTRY: [Hook; 3] = [
    Hook {
        program: "fe_process_exit",
        target: "taskstats_exit",
    },
    Hook {
        program: "fe_request_send",
        target: "fuse_dev_queue_req",
    },
    Hook {
        program: "fe_request_end",
        target: "fuse_request_end",
    },
];

const TRACEPOINTS: [Hook; 3] = [
    Hook {
        program: "tp_process_exit",
        target: "sched_process_exit",
    },
    Hook {
        program: "tp_request_send",
        target: "fuse_request_send",
    },
    Hook {
        program: "tp_request_end",
        target: "fuse_request_end",
    },
];

/// The outcome of [`attach`]: the mode in use and, if that is the fallback,
/// why fentry was refused.
pub(crate) struct Attached {
    pub mode: AttachMode,
    pub fentry_refusal: Option<String>,
}

/// Attaches with fentry if the kernel allows it, else with BTF tracepoints.
/// With `force` set, only that mode is tried.
pub(crate) fn attach(
    ebpf: &mut Ebpf,
    btf: &Btf,
    force: Option<AttachMode>,
) -> Result<Attached, Error> {
    // A program missing from the object is a build mismatch, not a refusal.
    if let Some(hook) = FENTRY
        .iter()
        .chain(&TRACEPOINTS)
        .find(|hook| ebpf.program(hook.program).is_none())
    {
        return Err(Error::Missing(hook.program));
    }
    let fentry_refusal = match force {
        Some(AttachMode::BtfTracepoint) => "not tried (BtfTracepoint forced)".to_string(),
        _ => match attach_fentry(ebpf, btf) {
            Ok(()) => {
                return Ok(Attached {
                    mode: AttachMode::Fentry,
                    fentry_refusal: None,
                })
            }
            Err(why) => {
                unload(ebpf, &FENTRY);
                if force == Some(AttachMode::Fentry) {
                    return Err(Error::FentryRefused(describe(why.0, &why.1)));
                }
                tracing::debug!(program = why.0, error = %why.1, "fentry refused, using BTF tracepoints");
                describe(why.0, &why.1)
            }
        },
    };
    attach_tracepoints(ebpf, btf, &fentry_refusal)?;
    Ok(Attached {
        mode: AttachMode::BtfTracepoint,
        fentry_refusal: Some(fentry_refusal),
    })
}

fn attach_fentry(ebpf: &mut Ebpf, btf: &Btf) -> Result<(), (&'static str, ProgramError)> {
    for hook in &FENTRY {
        let prog: &mut FEntry = program(ebpf, hook.program)
            .map_err(|e| (hook.program, e))?
            .try_into()
            .map_err(|e| (hook.program, e))?;
        prog.load(hook.target, btf).map_err(|e| (hook.program, e))?;
        prog.attach().map_err(|e| (hook.program, e))?;
    }
    Ok(())
}

fn attach_tracepoints(ebpf: &mut Ebpf, btf: &Btf, fentry: &str) -> Result<(), Error> {
    for hook in &TRACEPOINTS {
        let fail = |source| Error::Attach {
            program: hook.program,
            fentry: fentry.to_string(),
            source,
        };
        let prog: &mut BtfTracePoint = program(ebpf, hook.program)
            .map_err(fail)?
            .try_into()
            .map_err(fail)?;
        match prog.load(hook.target, btf) {
            // The load looks up the `btf_trace_<name>` typedef first.
            Err(ProgramError::Btf(_)) => return Err(Error::TracepointMissing(hook.target)),
            other => other.map_err(fail)?,
        }
        prog.attach().map_err(fail)?;
    }
    Ok(())
}

/// A program of the object (checked present by [`attach`]).
fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::programs::Program, ProgramError> {
    ebpf.program_mut(name)
        .ok_or(ProgramError::UnexpectedProgramType)
}

/// Unloads (and so detaches) whatever part of the fentry hooks got loaded.
fn unload(ebpf: &mut Ebpf, hooks: &[Hook]) {
    for hook in hooks {
        let prog: Option<&mut FEntry> = ebpf
            .program_mut(hook.program)
            .and_then(|p| p.try_into().ok());
        if let Some(prog) = prog {
            if let Err(e) = prog.unload() {
                tracing::debug!(program = hook.program, error = %e, "unload after refusal");
            }
        }
    }
}

/// One line for a refused program: aya's load error repeats the errno in its
/// source and carries an empty verifier log when the kernel refused outright.
fn describe(program: &str, e: &ProgramError) -> String {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            if log.trim().is_empty() {
                format!("{program}: BPF_PROG_LOAD refused: {io_error}")
            } else {
                format!(
                    "{program}: BPF_PROG_LOAD failed: {io_error}; verifier: {}",
                    log.trim()
                )
            }
        }
        other => format!("{program}: {other}"),
    }
}
