//! Compiles the C eBPF programs in src/bpf/ with clang into OUT_DIR.
//!
//! Without clang the crate still builds: an empty object is embedded, a cargo
//! warning says so, and `FuseWatch::load` fails with `Error::NotBuilt` so the
//! caller falls back to its no-eBPF detector.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const PROGRAMS: &[&str] = &["fusewatch"];

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = env::var("BERTH_CLANG").unwrap_or_else(|_| "clang".to_string());
    println!("cargo:rerun-if-changed=src/bpf");
    println!("cargo:rerun-if-env-changed=BERTH_CLANG");

    let have_clang = Command::new(&clang)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_clang {
        // A path that never exists makes cargo rerun this script on every
        // build while clang is missing, so installing it later (`cargo xtask
        // setup`) is picked up without `cargo clean`. (Watching the clang
        // binary would not do: dpkg keeps the package's old mtimes.)
        let never = out_dir.join("rerun-until-clang-is-installed");
        println!("cargo:rerun-if-changed={}", never.display());
    }
    for name in PROGRAMS {
        let src = format!("src/bpf/{name}.bpf.c");
        let obj = out_dir.join(format!("{name}.bpf.o"));
        println!("cargo:rerun-if-changed={src}");
        if !have_clang {
            println!(
                "cargo:warning=berth-ebpf: `{clang}` not found; building without eBPF programs \
                 (install clang, e.g. `apt-get install clang`, to enable eBPF detection)"
            );
            // Leave an existing empty object alone so the crate is not
            // recompiled on every build while clang is missing.
            if std::fs::metadata(&obj).map_or(true, |m| m.len() != 0) {
                std::fs::write(&obj, b"").expect("write empty eBPF object");
            }
            continue;
        }
        // -g emits the BTF that CO-RE relocations and BTF-defined maps need.
        let output = Command::new(&clang)
            .args(["-target", "bpf", "-O2", "-g", "-Wall", "-c"])
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .output()
            .unwrap_or_else(|e| panic!("running {clang}: {e}"));
        if !output.status.success() {
            panic!(
                "{clang} failed to compile {src}:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}
