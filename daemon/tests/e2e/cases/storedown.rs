//! The store goes away: reads fail with EIO within the request deadline, and
//! work again once the store is back. Uses a private SeaweedFS.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::mount::{Mount, MountOpts};
use crate::seaweed::Seaweed;
use crate::util::{ensure_same_bytes, errno_name, random_bytes, read_file, with_time_limit};

const DEADLINE: Duration = Duration::from_secs(3);
const SLACK: Duration = Duration::from_secs(10);
const HANG: Duration = Duration::from_secs(20);
const RECOVERY: Duration = Duration::from_secs(30);

pub fn eio_then_recovery() -> Result<()> {
    let bin = crate::reqs::find_weed().map_err(anyhow::Error::msg)?;
    let server = Seaweed::start(&bin, "storedown")?;
    let bucket = server.bucket("storedown")?;
    let warm = random_bytes(0x3a, 256 << 10);
    let cold = random_bytes(0x3b, 256 << 10);
    bucket.put("warm.bin", warm.clone())?;
    bucket.put("cold.bin", cold.clone())?;
    let m = Mount::s3(
        &server,
        &bucket.name,
        None,
        MountOpts::flags(&["--request-deadline", "3s"]),
    )?;
    ensure_same_bytes(
        "warm.bin before the outage",
        &read_file(m.join("warm.bin"))?,
        &warm,
    )?;

    server.kill().context("killing the private SeaweedFS")?;
    let path = m.join("cold.bin");
    let (res, took) = with_time_limit("read during outage", HANG, move || std::fs::read(path))?;
    match res {
        Ok(_) => bail!("read of cold.bin succeeded while the store was down"),
        Err(e) if e.raw_os_error() == Some(libc::EIO) => {}
        Err(e) => bail!(
            "read during outage: want EIO, got {e} ({})",
            e.raw_os_error().map_or("no errno", errno_name)
        ),
    }
    if took > DEADLINE + SLACK {
        bail!("EIO took {took:?}, want at most {:?}", DEADLINE + SLACK);
    }
    eprintln!("e2e: storedown: EIO after {took:.1?}");

    server
        .restart()
        .context("restarting the private SeaweedFS")?;
    let start = Instant::now();
    loop {
        let path = m.join("cold.bin");
        let (res, _) = with_time_limit("read after recovery", HANG, move || std::fs::read(path))?;
        match res {
            Ok(got) => {
                ensure_same_bytes("cold.bin after recovery", &got, &cold)?;
                break;
            }
            Err(e) if start.elapsed() > RECOVERY => {
                bail!("cold.bin still unreadable {RECOVERY:?} after the store came back: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
    eprintln!(
        "e2e: storedown: readable again {:.1?} after restart",
        start.elapsed()
    );
    m.finish()?;
    server.shutdown();
    Ok(())
}
