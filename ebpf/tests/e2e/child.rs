//! The test binary doubles as a multi-threaded "engine" for the exit cases:
//! run with BERTH_EBPF_E2E_CHILD=<mode>, it talks over stdin/stdout.

use std::io::{BufRead, Write};
use std::sync::mpsc;
use std::thread;

pub const ENV: &str = "BERTH_EBPF_E2E_CHILD";

/// Runs the child mode named in ENV, if any; never returns in that case.
pub fn run_if_child() {
    let Ok(mode) = std::env::var(ENV) else {
        return;
    };
    match mode.as_str() {
        "threads" => threads(),
        "leader_exits_first" => leader_exits_first(),
        other => {
            eprintln!("unknown child mode {other}");
            std::process::exit(2);
        }
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn read_line() -> String {
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    line
}

/// Three extra threads; on the first input line one of them exits (a thread
/// exit, not a process exit); then it waits to be killed.
fn threads() -> ! {
    let (tx, rx) = mpsc::channel::<()>();
    let short = thread::spawn(move || {
        let _ = rx.recv();
    });
    for _ in 0..2 {
        thread::spawn(|| loop {
            thread::park();
        });
    }
    say("ready");
    read_line();
    let _ = tx.send(());
    let _ = short.join();
    say("joined");
    loop {
        thread::park();
    }
}

/// The main thread exits first; a worker keeps the process
/// alive until its input line comes, then returns, which ends the process
/// with status 0.
fn leader_exits_first() -> ! {
    thread::spawn(|| {
        read_line();
        exit_thread();
    });
    say("ready");
    exit_thread()
}

/// The raw exit(2) syscall: ends the calling thread only, without unwinding
/// (pthread_exit's forced unwind aborts a Rust process). The last thread to
/// leave ends the process with status 0.
fn exit_thread() -> ! {
    // SAFETY: nothing on this thread is used again; the process lives on while
    // other threads run.
    unsafe { libc::syscall(libc::SYS_exit, 0) };
    unreachable!("exit(2) returned")
}
