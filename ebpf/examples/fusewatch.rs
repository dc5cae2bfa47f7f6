//! Prints FUSE health events: `fusewatch [--stall-ms N] [PID | MOUNTPOINT]...`
//!
//! A number is watched as a process (EngineExited), anything else as a FUSE
//! mountpoint (ConnectionAborted, RequestStalled). Runs until Ctrl-C.

use std::path::Path;
use std::time::Duration;

use berth_ebpf::{connection_id, monotonic_now, opcode_name, Event, FuseWatch};

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fusewatch: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut stall = Duration::from_secs(2);
    if let Some(i) = args.iter().position(|a| a == "--stall-ms") {
        let ms: u64 = args.get(i + 1).ok_or("--stall-ms needs a value")?.parse()?;
        stall = Duration::from_millis(ms);
        args.drain(i..i + 2);
    }
    let mut watch = FuseWatch::load(stall)?;
    println!(
        "attached: {:?} (fentry: {})",
        watch.attach_mode(),
        watch.fentry_refusal().unwrap_or("in use")
    );
    for arg in &args {
        if let Ok(pid) = arg.parse::<u32>() {
            watch.watch_process(pid)?;
            println!("watching process {pid}");
        } else {
            let conn = connection_id(Path::new(arg))?;
            let epoch = watch.watch_connection(conn)?;
            println!("watching {arg}: connection {conn}, epoch {epoch}");
        }
    }
    loop {
        for ev in watch.next_events(Duration::from_secs(1))? {
            let now = monotonic_now();
            match ev {
                Event::EngineExited { tgid, status, at } => {
                    println!("engine {tgid} exited: {status} ({:?} ago)", now - at)
                }
                Event::ConnectionAborted {
                    conn,
                    error,
                    opcode,
                    at,
                    ..
                } => println!(
                    "connection {conn} aborted: {} ended with {error} ({:?} ago)",
                    opcode_name(opcode),
                    now - at
                ),
                Event::RequestStalled {
                    conn,
                    unique,
                    opcode,
                    age,
                    ..
                } => println!(
                    "connection {conn}: {} (unique {unique}) in flight for {age:?}",
                    opcode_name(opcode)
                ),
            }
        }
    }
}
