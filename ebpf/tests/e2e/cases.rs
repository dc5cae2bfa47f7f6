//! The cases. Each prints what it measured (latencies are printed, never asserted).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use berth_ebpf::{
    connection_id, monotonic_now, opcode_name, AttachMode, Error, Event, FuseWatch, Options,
};

use crate::rawfuse::{self, RawMount};
use crate::{Case, Needs, Run};

/// Generous bound for "the event never came" (a liveness bound, not a speed goal).
const PATIENCE: Duration = Duration::from_secs(10);
const FUSE_GETATTR: u32 = 3;
/// Since 6.6 the kernel tries STATX first for stat(2) (until a server says ENOSYS).
const FUSE_STATX: u32 = 52;
const ECONNABORTED: i32 = 103;

pub fn all() -> Vec<Case> {
    vec![
        Case {
            name: "load_reports_attach_mode",
            needs: Needs::Ebpf,
            run: Run::Test(load_reports_attach_mode),
        },
        Case {
            name: "engine_exit_by_sigkill_is_reported",
            needs: Needs::Ebpf,
            run: Run::Test(engine_exit_by_sigkill_is_reported),
        },
        Case {
            name: "engine_exit_status_and_unwatch",
            needs: Needs::Ebpf,
            run: Run::Test(engine_exit_status_and_unwatch),
        },
        Case {
            name: "thread_exits_are_not_engine_exits",
            needs: Needs::Ebpf,
            run: Run::Test(thread_exits_are_not_engine_exits),
        },
        Case {
            name: "hung_server_stalls_then_abort_is_reported",
            needs: Needs::EbpfFuse,
            run: Run::Test(hung_server_stalls_then_abort_is_reported),
        },
        Case {
            name: "resent_request_keeps_its_age",
            needs: Needs::EbpfFuse,
            run: Run::Test(resent_request_keeps_its_age),
        },
        Case {
            name: "reused_connection_id_starts_clean",
            needs: Needs::EbpfFuse,
            run: Run::Test(reused_connection_id_starts_clean),
        },
        Case {
            name: "bench_probe_overhead_per_request",
            needs: Needs::EbpfFuse,
            run: Run::Bench(bench_probe_overhead_per_request),
        },
    ]
}

fn load(threshold: Duration) -> Result<FuseWatch> {
    FuseWatch::load(threshold).context("FuseWatch::load")
}

/// Calls next_events until `pick` accepts an event or PATIENCE runs out.
/// Events `pick` rejects are collected in `others`.
fn wait_for<T>(
    watch: &mut FuseWatch,
    others: &mut Vec<Event>,
    mut pick: impl FnMut(&Event) -> Option<T>,
) -> Result<(T, Duration)> {
    let give_up = Instant::now() + PATIENCE;
    while Instant::now() < give_up {
        for ev in watch.next_events(Duration::from_millis(200))? {
            if let Some(t) = pick(&ev) {
                return Ok((t, monotonic_now()));
            }
            others.push(ev);
        }
    }
    bail!("no matching event within {PATIENCE:?}; other events: {others:?}")
}

fn load_reports_attach_mode() -> Result<()> {
    let watch = load(Duration::from_secs(1))?;
    let mode = watch.attach_mode();
    println!("attach mode: {mode:?}");
    match mode {
        AttachMode::Fentry => ensure!(watch.fentry_refusal().is_none()),
        AttachMode::BtfTracepoint => {
            let why = watch
                .fentry_refusal()
                .context("fell back to BTF tracepoints without a recorded reason")?;
            println!("fentry refused: {why}");
            // A verifier rejection would be a bug in our fentry programs, not
            // the kernel refusing fentry; the kernel's refusal has no log.
            ensure!(
                !why.contains("verifier:"),
                "fentry programs rejected by the verifier: {why}"
            );
        }
    }
    drop(watch);

    // Forcing each mode: tracepoints must work wherever the default fell back to them.
    let forced = |m| {
        let mut opts = Options::new(Duration::from_secs(1));
        opts.force_mode = Some(m);
        FuseWatch::load_with(opts)
    };
    let tp = forced(AttachMode::BtfTracepoint).context("forced BtfTracepoint")?;
    ensure!(tp.attach_mode() == AttachMode::BtfTracepoint);
    drop(tp);
    match forced(AttachMode::Fentry) {
        Ok(fe) => ensure!(fe.attach_mode() == AttachMode::Fentry),
        Err(e @ Error::FentryRefused(_)) => {
            ensure!(
                mode == AttachMode::BtfTracepoint,
                "forced fentry failed although the default load used it: {e}"
            );
            println!("forced fentry: {e}");
        }
        Err(e) => bail!("forced fentry: unexpected error {e}"),
    }
    Ok(())
}

fn spawn(cmd: &str, args: &[&str]) -> Result<Child> {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {cmd}"))
}

fn kill(child: &Child, sig: i32) -> Result<()> {
    let pid = i32::try_from(child.id())?;
    // SAFETY: kill has no memory preconditions; pid is our own child.
    if unsafe { libc::kill(pid, sig) } != 0 {
        bail!("kill {pid}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn engine_exit_by_sigkill_is_reported() -> Result<()> {
    const ROUNDS: usize = 20;
    let mut watch = load(Duration::from_secs(1))?;
    let (mut in_kernel, mut delivered) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let mut child = spawn("sleep", &["60"])?;
        let tgid = child.id();
        watch.watch_process(tgid)?;
        let killed_at = monotonic_now();
        kill(&child, libc::SIGKILL)?;
        let mut others = Vec::new();
        let ((status, at), got) = wait_for(&mut watch, &mut others, |ev| match ev {
            Event::EngineExited {
                tgid: t,
                status,
                at,
            } if *t == tgid => Some((*status, *at)),
            _ => None,
        })?;
        let reaped = child.wait()?;
        ensure!(
            status.signal() == Some(libc::SIGKILL),
            "EngineExited status {status}, want SIGKILL"
        );
        ensure!(reaped.signal() == Some(libc::SIGKILL));
        ensure!(others.is_empty(), "unexpected events: {others:?}");
        in_kernel.push(at.saturating_sub(killed_at));
        delivered.push(got.saturating_sub(killed_at));
    }
    println!(
        "kill -9 -> exit seen in kernel: {}; -> EngineExited returned: {} ({ROUNDS} rounds)",
        summary(&mut in_kernel),
        summary(&mut delivered)
    );
    Ok(())
}

fn summary(v: &mut [Duration]) -> String {
    v.sort();
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    format!(
        "min {:?} p50 {:?} p90 {:?} max {:?}",
        v[0],
        p(0.5),
        p(0.9),
        v[v.len() - 1]
    )
}

fn engine_exit_status_and_unwatch() -> Result<()> {
    let mut watch = load(Duration::from_secs(1))?;

    // A normal exit carries its status.
    let mut child = spawn("sh", &["-c", "read line; exit 3"])?;
    let tgid = child.id();
    watch.watch_process(tgid)?;
    child.stdin.take().context("stdin")?.write_all(b"go\n")?;
    // This time as a caller with its own poll loop would: wait on the fd, then
    // collect without blocking.
    ensure!(
        watch.poll_timeout().is_none(),
        "a scan is due with no connection watched"
    );
    let mut pfd = libc::pollfd {
        fd: watch.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: pfd is valid for the call.
    let ready = unsafe { libc::poll(&mut pfd, 1, PATIENCE.as_millis() as i32) };
    ensure!(
        ready == 1,
        "the watch fd never became readable (poll returned {ready})"
    );
    let events = watch.next_events(Duration::ZERO)?;
    let status = match events.as_slice() {
        [Event::EngineExited {
            tgid: t, status, ..
        }] if *t == tgid => *status,
        other => bail!("after the fd became readable: {other:?}"),
    };
    child.wait()?;
    ensure!(status.code() == Some(3), "status {status}, want exit 3");

    // An unwatched process dies silently; a watched one killed after it is
    // reported, and is the only event (so the first one really was unwatched).
    let mut quiet = spawn("sleep", &["60"])?;
    let mut loud = spawn("sleep", &["60"])?;
    watch.watch_process(quiet.id())?;
    watch.watch_process(loud.id())?;
    watch.unwatch_process(quiet.id())?;
    kill(&quiet, libc::SIGKILL)?;
    quiet.wait()?;
    kill(&loud, libc::SIGKILL)?;
    loud.wait()?;
    let loud_id = loud.id();
    let mut others = Vec::new();
    wait_for(&mut watch, &mut others, |ev| match ev {
        Event::EngineExited { tgid, .. } if *tgid == loud_id => Some(()),
        _ => None,
    })?;
    ensure!(
        others.is_empty(),
        "events besides the watched exit: {others:?}"
    );

    // A process that already exited (a zombie) cannot be watched.
    let mut gone = spawn("true", &[])?;
    let gone_id = gone.id();
    while std::fs::read_to_string(format!("/proc/{gone_id}/stat"))
        .map(|s| !s.contains(") Z"))
        .unwrap_or(false)
    {
        thread::sleep(Duration::from_millis(5));
    }
    match watch.watch_process(gone_id) {
        Err(Error::NoSuchProcess(p)) if p == gone_id => {}
        other => bail!("watch_process on a zombie: {other:?}"),
    }
    gone.wait()?;
    Ok(())
}

/// Starts this test binary in a child mode (see child.rs) and waits for "ready".
fn spawn_child(mode: &str) -> Result<(Child, BufReader<ChildStdout>)> {
    let mut child = Command::new(std::env::current_exe()?)
        .env(crate::child::ENV, mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("spawn child")?;
    let mut out = BufReader::new(child.stdout.take().context("child stdout")?);
    expect_line(&mut out, "ready")?;
    Ok((child, out))
}

fn expect_line(out: &mut BufReader<ChildStdout>, want: &str) -> Result<()> {
    let mut line = String::new();
    out.read_line(&mut line)?;
    ensure!(line.trim() == want, "child said {line:?}, want {want:?}");
    Ok(())
}

fn thread_exits_are_not_engine_exits() -> Result<()> {
    let mut watch = load(Duration::from_secs(1))?;

    // A thread of a watched process exits: nothing. SIGKILL of the process:
    // exactly one EngineExited, though four threads die.
    let (mut child, mut out) = spawn_child("threads")?;
    let tgid = child.id();
    watch.watch_process(tgid)?;
    child.stdin.as_mut().context("stdin")?.write_all(b"go\n")?;
    expect_line(&mut out, "joined")?;
    let quiet = watch.next_events(Duration::from_millis(100))?;
    ensure!(quiet.is_empty(), "a thread exit was reported: {quiet:?}");
    kill(&child, libc::SIGKILL)?;
    child.wait()?;
    let mut others = Vec::new();
    let (status, _) = wait_for(&mut watch, &mut others, |ev| match ev {
        Event::EngineExited {
            tgid: t, status, ..
        } if *t == tgid => Some(*status),
        _ => None,
    })?;
    ensure!(status.signal() == Some(libc::SIGKILL), "status {status}");
    let more = watch.next_events(Duration::from_millis(100))?;
    ensure!(
        others.is_empty() && more.is_empty(),
        "extra events: {others:?} {more:?}"
    );

    // The main thread exits first (a zombie leader, process alive): it can
    // still be watched, and the event comes when the last thread exits.
    let (mut child, _out) = spawn_child("leader_exits_first")?;
    let tgid = child.id();
    while !std::fs::read_to_string(format!("/proc/{tgid}/stat"))?.contains(") Z") {
        thread::sleep(Duration::from_millis(5));
    }
    watch
        .watch_process(tgid)
        .context("watch a process whose leader exited")?;
    let quiet = watch.next_events(Duration::from_millis(100))?;
    ensure!(
        quiet.is_empty(),
        "leader exit reported as engine exit: {quiet:?}"
    );
    child.stdin.as_mut().context("stdin")?.write_all(b"go\n")?;
    let (status, _) = wait_for(&mut watch, &mut others, |ev| match ev {
        Event::EngineExited {
            tgid: t, status, ..
        } if *t == tgid => Some(*status),
        _ => None,
    })?;
    child.wait()?;
    ensure!(status.code() == Some(0), "status {status}, want exit 0");
    ensure!(others.is_empty(), "extra events: {others:?}");
    Ok(())
}

/// A `stat` of the mount on another thread; its result comes back on the channel.
fn stat_in_thread(mount: &RawMount) -> mpsc::Receiver<std::io::Result<std::fs::Metadata>> {
    let (tx, rx) = mpsc::channel();
    let path = mount.path().to_path_buf();
    thread::spawn(move || {
        let _ = tx.send(std::fs::metadata(path));
    });
    rx
}

/// Waits for the RequestStalled of (`conn`, `epoch`) and checks it.
fn expect_stall(
    watch: &mut FuseWatch,
    conn: u32,
    epoch: u64,
    threshold: Duration,
) -> Result<(u64, u32, Duration)> {
    let mut others = Vec::new();
    let ((e, unique, opcode, age), _) = wait_for(watch, &mut others, |ev| match ev {
        Event::RequestStalled {
            conn: c,
            epoch: e,
            unique,
            opcode,
            age,
        } if *c == conn => Some((*e, *unique, *opcode, *age)),
        _ => None,
    })?;
    ensure!(e == epoch, "stall reported for epoch {e}, want {epoch}");
    ensure!(
        opcode == FUSE_GETATTR || opcode == FUSE_STATX,
        "stalled request is {} ({opcode}), want GETATTR or STATX",
        opcode_name(opcode)
    );
    ensure!(
        age >= threshold,
        "stall reported at age {age:?} < threshold {threshold:?}"
    );
    ensure!(
        others.is_empty(),
        "unexpected events before the stall: {others:?}"
    );
    Ok((unique, opcode, age))
}

/// Aborts `conn` and waits for its ConnectionAborted; returns the latency.
fn abort_and_expect(
    watch: &mut FuseWatch,
    mount: &RawMount,
    conn: u32,
    epoch: u64,
) -> Result<(Duration, Duration)> {
    let aborted_at = monotonic_now();
    mount.abort(conn)?;
    let mut others = Vec::new();
    let ((error, opcode, at), got) = wait_for(watch, &mut others, |ev| match ev {
        Event::ConnectionAborted {
            conn: c,
            epoch: e,
            error,
            opcode,
            at,
        } if *c == conn && *e == epoch => Some((*error, *opcode, *at)),
        _ => None,
    })?;
    ensure!(
        error == -ECONNABORTED,
        "abort error {error}, want -ECONNABORTED"
    );
    ensure!(
        opcode == FUSE_GETATTR || opcode == FUSE_STATX,
        "abort seen on opcode {opcode}"
    );
    ensure!(
        others.is_empty(),
        "unexpected events around the abort: {others:?}"
    );
    Ok((
        at.saturating_sub(aborted_at),
        got.saturating_sub(aborted_at),
    ))
}

fn hung_server_stalls_then_abort_is_reported() -> Result<()> {
    let threshold = Duration::from_millis(300);
    rawfuse::ensure_fusectl()?;
    let mut watch = load(threshold)?;
    let mount = RawMount::mount()?;
    let conn = connection_id(mount.path())?;
    ensure!(
        std::path::Path::new(&format!("{}/{conn}", rawfuse::FUSECTL)).exists(),
        "connection_id {conn} has no fusectl directory"
    );
    let epoch = watch.watch_connection(conn)?;
    ensure!(watch.in_flight(conn)? == 0);

    let sent = monotonic_now();
    let stat = stat_in_thread(&mount);
    let (unique, opcode, age) = expect_stall(&mut watch, conn, epoch, threshold)?;
    let found = monotonic_now().saturating_sub(sent);
    ensure!(
        stat.try_recv().is_err(),
        "stat returned although the server never answered"
    );
    ensure!(
        watch.in_flight(conn)? == 1,
        "in_flight != 1 while stat is blocked"
    );
    let (_, scan) = watch.stall_timing();
    println!(
        "stall: {} unique {unique} reported at age {age:?}, {found:?} after the stat \
         began (threshold {threshold:?}, scan every {scan:?})",
        opcode_name(opcode)
    );

    // Many blocked callers: each request is reported once, and a scan of the
    // in-flight map (what in_flight() and the stall scan do) stays cheap.
    const MORE: usize = 31;
    let more: Vec<_> = (0..MORE).map(|_| stat_in_thread(&mount)).collect();
    let give_up = Instant::now() + PATIENCE;
    while watch.in_flight(conn)? < MORE + 1 {
        ensure!(
            Instant::now() < give_up,
            "{MORE} more stats never got in flight"
        );
        thread::sleep(Duration::from_millis(5));
    }
    let scan_started = Instant::now();
    let n = watch.in_flight(conn)?;
    let scan_took = scan_started.elapsed();
    let mut uniques = std::collections::HashSet::from([unique]);
    let give_up = Instant::now() + PATIENCE;
    while uniques.len() < MORE + 1 {
        ensure!(
            Instant::now() < give_up,
            "only {} stalls reported",
            uniques.len()
        );
        for ev in watch.next_events(Duration::from_millis(100))? {
            match ev {
                Event::RequestStalled {
                    conn: c, unique: u, ..
                } if c == conn => ensure!(uniques.insert(u), "request {u} reported twice"),
                other => bail!("unexpected event {other:?}"),
            }
        }
    }
    println!("{n} requests in flight: all reported once; one scan of the map took {scan_took:?}");

    let (in_kernel, delivered) = abort_and_expect(&mut watch, &mount, conn, epoch)?;
    let result = stat
        .recv_timeout(PATIENCE)
        .context("stat still blocked after the abort")?;
    let err = match result {
        Err(e) if e.raw_os_error() == Some(ECONNABORTED) => e,
        other => bail!("the blocked stat ended with {other:?}, want ECONNABORTED"),
    };
    for rx in more {
        let r = rx
            .recv_timeout(PATIENCE)
            .context("a stat still blocked after the abort")?;
        match r {
            Err(e) if e.raw_os_error() == Some(ECONNABORTED) => {}
            other => bail!("a blocked stat ended with {other:?}, want ECONNABORTED"),
        }
    }
    // All those requests ended aborted, but the abort is reported once.
    let after = watch.next_events(Duration::from_millis(100))?;
    ensure!(after.is_empty(), "events after the abort: {after:?}");
    ensure!(
        watch.in_flight(conn)? == 0,
        "requests still in flight after abort"
    );
    println!(
        "abort -> seen in kernel: {in_kernel:?}; -> ConnectionAborted returned: {delivered:?}; \
         stat failed with: {err}"
    );
    watch.unwatch_connection(conn)?;
    mount.unmount()
}

/// A request the engine read but never answered, then resent by
/// FUSE_NOTIFY_RESEND (as a successor engine does): still the same in-flight
/// request, with its first send time, reported as stalled once.
fn resent_request_keeps_its_age() -> Result<()> {
    rawfuse::ensure_fusectl()?;
    let threshold = Duration::from_millis(300);
    let mut watch = load(threshold)?;
    let mut mount = RawMount::mount()?;
    let conn = connection_id(mount.path())?;
    let epoch = watch.watch_connection(conn)?;
    let stat = stat_in_thread(&mount);
    let (op_read, unique_read) = mount.read_request()?;
    let (unique, _, _) = expect_stall(&mut watch, conn, epoch, threshold)?;
    ensure!(
        unique == unique_read,
        "stall unique {unique}, server read {unique_read}"
    );

    mount.notify_resend()?;
    let (op_again, unique_again) = mount.read_request()?;
    ensure!(
        op_again == op_read,
        "resent opcode {op_again}, first {op_read}"
    );
    ensure!(
        watch.in_flight(conn)? == 1,
        "resend changed the in-flight count"
    );
    // Twice the threshold: a new send event would have been reported again by now.
    let again = watch.next_events(2 * threshold)?;
    ensure!(again.is_empty(), "events after the resend: {again:?}");
    println!(
        "resend: {} unique {unique_read} came back as {unique_again:#x}; no new send event, \
         still one request in flight, not reported again",
        opcode_name(op_read)
    );
    let _ = abort_and_expect(&mut watch, &mount, conn, epoch)?;
    ensure!(stat.recv_timeout(PATIENCE)?.is_err(), "stat succeeded");
    watch.unwatch_connection(conn)?;
    mount.unmount()
}

fn reused_connection_id_starts_clean() -> Result<()> {
    const ATTEMPTS: usize = 5;
    rawfuse::ensure_fusectl()?;
    let threshold = Duration::from_millis(200);
    let mut watch = load(threshold)?;
    for attempt in 1..=ATTEMPTS {
        // Connection A: a stalled request, then an abort whose event is left
        // unread in the ring buffer, then unmount without unwatching.
        let a = RawMount::mount()?;
        let id_a = connection_id(a.path())?;
        let epoch_a = watch.watch_connection(id_a)?;
        let stat_a = stat_in_thread(&a);
        let (unique_a, _, _) = expect_stall(&mut watch, id_a, epoch_a, threshold)?;
        a.abort(id_a)?;
        ensure!(
            stat_a.recv_timeout(PATIENCE)?.is_err(),
            "stat on A succeeded"
        );
        a.unmount()?;

        // Connection B: anonymous device ids are shared with every other
        // mount on the machine, so another mount may grab A's id first.
        let b = RawMount::mount()?;
        let id_b = connection_id(b.path())?;
        if id_b != id_a {
            println!("attempt {attempt}: B got id {id_b}, not A's {id_a}; retrying");
            watch.unwatch_connection(id_a)?;
            b.unmount()?;
            // Drain A's abort so the next attempt starts empty.
            watch.next_events(Duration::from_millis(50))?;
            continue;
        }
        let epoch_b = watch.watch_connection(id_b)?;
        ensure!(epoch_b != epoch_a);
        ensure!(
            watch.in_flight(id_b)? == 0,
            "B inherited in-flight requests of A"
        );
        // A's abort record is still queued: it must not come out as B's.
        let early = watch.next_events(Duration::from_millis(2 * threshold.as_millis() as u64))?;
        ensure!(early.is_empty(), "events for idle B: {early:?}");

        // B's own stall and abort are reported in full, under B's epoch,
        // though its request numbers repeat A's.
        let stat_b = stat_in_thread(&b);
        let (unique_b, _, _) = expect_stall(&mut watch, id_b, epoch_b, threshold)?;
        let _ = abort_and_expect(&mut watch, &b, id_b, epoch_b)?;
        ensure!(
            stat_b.recv_timeout(PATIENCE)?.is_err(),
            "stat on B succeeded"
        );
        println!(
            "connection id {id_a} reused (attempt {attempt}): A epoch {epoch_a} unique \
             {unique_a}, B epoch {epoch_b} unique {unique_b}; nothing of A reported for B"
        );
        watch.unwatch_connection(id_b)?;
        return b.unmount();
    }
    bail!("the kernel never gave the second mount the first one's id in {ATTEMPTS} attempts")
}

/// What the send/end probes cost a FUSE request: stat(2) round trips to a
/// server that answers GETATTR at once, with no watch loaded, with the
/// programs attached but this connection not watched, and with it watched.
/// Rounds alternate the three setups; the median of each is printed.
///
/// Returns the watched round trip in ns in bench mode.
fn bench_probe_overhead_per_request(test_mode: bool) -> Result<Option<u64>> {
    let (stats, rounds) = if test_mode { (200, 1) } else { (20_000, 5) };
    rawfuse::ensure_fusectl()?;
    let mount = RawMount::mount()?;
    let (server, served) = mount.serve_getattr()?;
    let conn = connection_id(mount.path())?;
    let run = |n: usize| -> Result<Duration> {
        let before = served.load(std::sync::atomic::Ordering::Relaxed);
        let start = Instant::now();
        for _ in 0..n {
            std::fs::metadata(mount.path()).context("stat through the test server")?;
        }
        let took = start.elapsed() / n as u32;
        let answered = served.load(std::sync::atomic::Ordering::Relaxed) - before;
        // Attributes are valid for 0 s: every stat must be a GETATTR round trip.
        // (The server counts after its reply write returns, which may be after
        // the last stat returned: one may be missing from the count.)
        ensure!(
            answered as usize + 1 >= n,
            "{n} stats, only {answered} GETATTRs"
        );
        Ok(took)
    };
    // Warm up; the first stat's STATX gets ENOSYS, GETATTR from then on.
    for _ in 0..1000 {
        std::fs::metadata(mount.path()).context("warm-up stat")?;
    }
    let (mut none, mut loaded, mut watched) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        none.push(run(stats)?);
        let mut watch = load(Duration::from_secs(5))?;
        loaded.push(run(stats)?);
        let epoch = watch.watch_connection(conn)?;
        watched.push(run(stats)?);
        ensure!(
            watch.in_flight(conn)? == 0,
            "answered requests left in flight"
        );
        let events = watch.next_events(Duration::ZERO)?;
        ensure!(
            events.is_empty(),
            "events from a healthy server: {events:?} (epoch {epoch})"
        );
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (none, loaded, watched) = (median(&mut none), median(&mut loaded), median(&mut watched));
    let ratio = |d: Duration| d.as_secs_f64() / none.as_secs_f64();
    println!(
        "stat round trip ({stats} x {rounds} rounds): no watch {none:?}; programs attached, \
         connection not watched {loaded:?} (x{:.3}); connection watched {watched:?} (x{:.3})",
        ratio(loaded),
        ratio(watched)
    );
    mount.unmount()?;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    Ok((!test_mode).then_some(watched.as_nanos() as u64))
}
