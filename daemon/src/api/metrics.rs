//! A Prometheus text-format endpoint (`GET /metrics`), written by hand to keep the build lean.
//! Off unless `berth daemon --metrics-addr ADDR` is given.

use std::fmt::Write as _;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::pb;
use super::registry::Registry;
use crate::cache::node::ServerStats;

pub async fn serve(listener: TcpListener, registry: Registry) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let request = read_head(&mut conn).await;
            let (status, body) = if request.starts_with("GET /metrics") {
                (
                    "200 OK",
                    render(&registry.list().await, registry.node_cache_stats()),
                )
            } else {
                ("404 Not Found", "only /metrics is served\n".to_string())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
        });
    }
}

/// Reads the request head (up to the blank line, at most 8 KiB), so that the client is done
/// writing before the answer comes and the connection closes.
async fn read_head(conn: &mut tokio::net::TcpStream) -> String {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while buf.len() < 8192 && !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Label values escaped per the text format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(volumes: &[pb::VolumeInfo], node_cache: Option<ServerStats>) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, u64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in rows {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    family(
        "berth_volumes",
        "gauge",
        "Volumes mounted by the daemon.",
        vec![(String::new(), volumes.len() as u64)],
    );
    let per = |f: &dyn Fn(&pb::VolumeInfo) -> u64| -> Vec<(String, u64)> {
        volumes
            .iter()
            .map(|v| {
                (
                    format!(
                        "{{volume=\"{}\",volume_id=\"{}\"}}",
                        label(&v.volume),
                        label(&v.volume_id)
                    ),
                    f(v),
                )
            })
            .collect()
    };
    family(
        "berth_volume_targets",
        "gauge",
        "Targets a volume is bound to.",
        per(&|v| v.targets.len() as u64),
    );
    family(
        "berth_volume_up",
        "gauge",
        "1 when the volume's mount process is running.",
        per(&|v| u64::from(v.state == "running")),
    );
    family(
        "berth_volume_restarts_total",
        "counter",
        "Times the volume's mount process was started again after dying.",
        per(&|v| v.restarts),
    );
    family(
        "berth_volume_remounts_total",
        "counter",
        "Last-resort remounts (fresh FUSE mounts) of the volume.",
        per(&|v| v.remount_generation),
    );
    let status = |v: &pb::VolumeInfo| {
        serde_json::from_str::<crate::status::MountStatus>(&v.status_json).ok()
    };
    family(
        "berth_volume_memory_used_bytes",
        "gauge",
        "Memory used for prefetch and write buffers.",
        per(&|v| status(v).map_or(0, |s| s.memory_used)),
    );
    family(
        "berth_volume_inodes",
        "gauge",
        "Inodes known to the mount.",
        per(&|v| status(v).map_or(0, |s| s.inodes)),
    );
    let heal = |v: &pb::VolumeInfo| status(v).map(|s| s.heal).unwrap_or_default();
    family(
        "berth_engine_generation",
        "gauge",
        "Engines the volume's holder has started (one more per takeover, upgrade or remount).",
        per(&|v| heal(v).generation),
    );
    family(
        "berth_engine_recoveries_total",
        "counter",
        "Engines replaced after a crash or hang, and remounts, by the volume's holder.",
        per(&|v| heal(v).recoveries),
    );
    family(
        "berth_engine_last_recovery_milliseconds",
        "gauge",
        "From detection to the successor serving, for the last recovery.",
        per(&|v| heal(v).last_recovery_ms.unwrap_or(0)),
    );
    family(
        "berth_engine_upgrades_total",
        "counter",
        "Live engine upgrades.",
        per(&|v| heal(v).upgrades),
    );
    family(
        "berth_engine_detector_ebpf",
        "gauge",
        "1 when the eBPF probes watch the volume's engine, 0 on the fallback detector.",
        per(&|v| u64::from(heal(v).detector == "ebpf")),
    );
    let cache = |v: &pb::VolumeInfo| status(v).and_then(|s| s.cache).unwrap_or_default();
    family(
        "berth_cache_memory_hits_total",
        "counter",
        "Block reads served from the memory tier.",
        per(&|v| cache(v).memory_hits),
    );
    family(
        "berth_cache_disk_hits_total",
        "counter",
        "Block reads served from the cache disk.",
        per(&|v| cache(v).disk_hits),
    );
    family(
        "berth_cache_misses_total",
        "counter",
        "Block reads that went to the store.",
        per(&|v| cache(v).misses),
    );
    family(
        "berth_store_read_bytes_total",
        "counter",
        "Bytes read from the object store through the cache.",
        per(&|v| cache(v).bytes_from_store),
    );
    if let Some(node) = node_cache {
        let one = |value: u64| vec![(String::new(), value)];
        family(
            "berth_node_cache_blocks",
            "gauge",
            "Blocks on the node cache disk (all volumes).",
            one(node.disk.blocks),
        );
        family(
            "berth_node_cache_capacity_bytes",
            "gauge",
            "Disk quota of the node cache.",
            one(node.disk.slots * node.block_size),
        );
        family(
            "berth_node_cache_evictions_total",
            "counter",
            "Blocks evicted from the node cache disk to make room.",
            one(node.disk.evictions),
        );
        family(
            "berth_node_cache_connections",
            "gauge",
            "Connections of mount processes to the node cache.",
            one(node.connections),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_text_format_with_escaped_labels() {
        let v = pb::VolumeInfo {
            volume: "abc".into(),
            volume_id: "b/\"p\"".into(),
            state: "running".into(),
            restarts: 2,
            targets: vec!["/t1".into(), "/t2".into()],
            ..Default::default()
        };
        let text = render(&[v], None);
        assert!(text.contains("berth_volumes 1\n"), "{text}");
        assert!(
            text.contains("berth_volume_targets{volume=\"abc\",volume_id=\"b/\\\"p\\\"\"} 2"),
            "{text}"
        );
        assert!(text.contains("berth_volume_up{volume=\"abc\",volume_id=\"b/\\\"p\\\"\"} 1"));
        assert!(text.contains("# TYPE berth_volume_restarts_total counter"));
    }

    #[test]
    fn exports_the_node_cache_once_for_the_node() {
        let node = ServerStats {
            disk: crate::cache::Summary {
                blocks: 7,
                slots: 64,
                evictions: 3,
                as_of: 0,
            },
            block_size: 1 << 20,
            connections: 5,
        };
        let text = render(&[], Some(node));
        for line in [
            "berth_node_cache_blocks 7\n",
            "berth_node_cache_capacity_bytes 67108864\n",
            "berth_node_cache_evictions_total 3\n",
            "berth_node_cache_connections 5\n",
            "# TYPE berth_node_cache_evictions_total counter",
        ] {
            assert!(text.contains(line), "missing {line:?}:\n{text}");
        }
        assert!(!render(&[], None).contains("berth_node_cache"));
    }

    #[test]
    fn exports_the_holders_recovery_facts() {
        let status = serde_json::json!({
            "pid": 1, "engine_pid": 2, "holder_pid": 1, "engine_generation": 4,
            "detector": "ebpf", "recoveries": 3, "last_recovery_ms": 17,
            "last_recovery_kind": "takeover", "last_detected_by": "ebpf",
            "last_detection_mono_ns": 5, "lost_open_files": false, "upgrades": 1,
            "last_upgrade_ms": 30, "source": "s3://b", "mountpoint": "/m",
            "started_unix": 0, "updated_unix": 0, "read_only": false, "inodes": 9,
            "skipped_keys": 0, "memory_used": 0, "memory_peak": 0, "memory_limit": 0,
            "cache": null
        });
        let v = pb::VolumeInfo {
            volume: "v".into(),
            volume_id: "b/".into(),
            status_json: status.to_string(),
            ..Default::default()
        };
        let text = render(&[v], None);
        let labels = "{volume=\"v\",volume_id=\"b/\"}";
        for line in [
            format!("berth_engine_generation{labels} 4"),
            format!("berth_engine_recoveries_total{labels} 3"),
            format!("berth_engine_last_recovery_milliseconds{labels} 17"),
            format!("berth_engine_upgrades_total{labels} 1"),
            format!("berth_engine_detector_ebpf{labels} 1"),
        ] {
            assert!(text.contains(&line), "missing {line}:\n{text}");
        }
    }
}
