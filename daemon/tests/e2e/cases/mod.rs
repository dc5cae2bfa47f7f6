//! The test cases. Each runs in parallel with the others: own bucket, own
//! mountpoint, own temp dirs.

mod bench;
mod cache;
mod cli;
mod daemon;
mod daemon_cli;
mod heal;
mod listing;
mod local;
mod namespace;
mod oddkeys;
mod posix;
mod read;
mod readonly;
mod sandbox;
mod shares;
mod storedown;
mod unmount;
mod unsupported;
mod vmheal;
mod write;

use crate::reqs::Needs;

pub struct Case {
    pub name: &'static str,
    pub needs: Needs,
    pub run: fn() -> anyhow::Result<()>,
}

const fn case(name: &'static str, needs: Needs, run: fn() -> anyhow::Result<()>) -> Case {
    Case { name, needs, run }
}

pub fn all() -> Vec<Case> {
    let s3 = Needs::S3_MOUNT;
    let mut cases = vec![
        // Slowest first, so it overlaps with the rest.
        case("listing::big_prefix_100k", s3, listing::big_prefix_100k),
        case(
            "listing::readdir_matches_bucket",
            s3,
            listing::readdir_matches_bucket,
        ),
        case("listing::prefix_mount", s3, listing::prefix_mount),
        case("listing::stat_matches_head", s3, listing::stat_matches_head),
        case("read::large_object", s3, read::large_object),
        case("write::sequential_writes", s3, write::sequential_writes),
        case("write::cp_into_mount", s3, write::cp_into_mount),
        case(
            "write::append_commit_is_conditional",
            s3,
            write::append_commit_is_conditional,
        ),
        case(
            "write::large_append_copies_on_the_store_side",
            s3,
            write::large_append_copies_on_the_store_side,
        ),
        case(
            "write::append_to_stored_objects",
            s3,
            write::append_to_stored_objects,
        ),
        case(
            "write::overwrite_with_truncate",
            s3,
            write::overwrite_with_truncate,
        ),
        case("write::fsync_commits", s3, write::fsync_commits),
        case("write::shell_redirect", s3, write::shell_redirect),
        case(
            "write::a_fork_mid_write_loses_nothing",
            s3,
            write::a_fork_mid_write_loses_nothing,
        ),
        case("cache::warm_s3_source", s3, cache::warm_s3_source),
        case(
            "cache::state_and_cache_are_private",
            s3,
            cache::state_and_cache_are_private,
        ),
        case("cache::warm_through_mount", s3, cache::warm_through_mount),
        case(
            "cache::warm_into_the_node_cache",
            s3,
            cache::warm_into_the_node_cache,
        ),
        case(
            "cache::status_reports_the_cache",
            s3,
            cache::status_reports_the_cache,
        ),
        case(
            "cache::two_mounts_share_blocks",
            s3,
            cache::two_mounts_share_blocks,
        ),
        case(
            "cache::list_only_volume_reads_no_cached_block",
            s3,
            cache::list_only_volume_reads_no_cached_block,
        ),
        case(
            "namespace::unlink_mkdir_rmdir",
            s3,
            namespace::unlink_mkdir_rmdir,
        ),
        case("unsupported::errnos", s3, unsupported::errnos),
        case(
            "posix::tools_on_s3",
            s3.union(Needs::TOOLS),
            posix::tools_on_s3,
        ),
        case(
            "posix::tools_on_local_store",
            Needs::FUSE.union(Needs::TOOLS),
            posix::tools_on_local_store,
        ),
        case(
            "posix::stored_object_attributes",
            s3,
            posix::stored_object_attributes,
        ),
        case(
            "posix::s3fs_interop",
            s3.union(Needs::S3FS),
            posix::s3fs_interop,
        ),
        case("unsupported::rename_file", s3, unsupported::rename_file),
        case("readonly::read_only_mount", s3, readonly::read_only_mount),
        case(
            "oddkeys::unsafe_keys_skipped",
            Needs::FUSE,
            oddkeys::unsafe_keys_skipped,
        ),
        case(
            "storedown::eio_then_recovery",
            Needs::FUSE.union(Needs::WEED),
            storedown::eio_then_recovery,
        ),
        case(
            "local::local_directory_store",
            Needs::FUSE,
            local::local_directory_store,
        ),
        case("local::hostile_directory::openat2", Needs::FUSE, || {
            local::hostile_directory(false)
        }),
        case("local::hostile_directory::walk", Needs::FUSE, || {
            local::hostile_directory(true)
        }),
        case(
            "shares::served_by_the_mount_engine",
            Needs::FUSE,
            shares::served_by_the_mount_engine,
        ),
        case(
            "shares::hostile_memory_tables_are_refused",
            Needs::FUSE,
            shares::hostile_memory_tables_are_refused,
        ),
        case(
            "daemon::restart_restores_volumes",
            Needs::FUSE,
            daemon::restart_restores_volumes,
        ),
        case(
            "daemon::restart_renames_a_legacy_volume",
            Needs::FUSE,
            daemon::restart_renames_a_legacy_volume,
        ),
        case(
            "daemon::volumes_share_the_node_cache",
            Needs::FUSE,
            daemon::volumes_share_the_node_cache,
        ),
        case(
            "daemon::api_refuses_what_it_was_not_allowed",
            Needs::FUSE,
            daemon::api_refuses_what_it_was_not_allowed,
        ),
        case(
            "shares::daemon_shares_use_the_volume_engine",
            Needs::FUSE,
            shares::daemon_shares_use_the_volume_engine,
        ),
        case(
            "sandbox::forbidden_syscall_kills_only_the_engine",
            Needs::FUSE,
            sandbox::forbidden_syscall_kills_only_the_engine,
        ),
        case(
            "sandbox::off_leaves_the_engine_unconfined",
            Needs::FUSE,
            sandbox::off_leaves_the_engine_unconfined,
        ),
        case(
            "sandbox::mount_engine_serves_a_guest",
            Needs::FUSE,
            sandbox::mount_engine_serves_a_guest,
        ),
        case(
            "vmheal::standalone_share_survives_engine_deaths",
            Needs::NOTHING,
            vmheal::standalone_share_survives_engine_deaths,
        ),
        case(
            "vmheal::upgrade_drains_guest_writes",
            Needs::NOTHING,
            vmheal::upgrade_drains_guest_writes,
        ),
        case(
            "vmheal::mount_share_survives_engine_kill",
            Needs::FUSE,
            vmheal::mount_share_survives_engine_kill,
        ),
        case(
            "sandbox::standalone_share_serves_a_guest",
            Needs::FUSE,
            sandbox::standalone_share_serves_a_guest,
        ),
        case("unmount::sigterm", s3, unmount::sigterm),
        case("unmount::umount_command", s3, unmount::umount_command),
        case("cli::no_such_bucket", s3, cli::no_such_bucket),
        case("cli::wrong_credentials", s3, cli::wrong_credentials),
        case(
            "cli::unreachable_endpoint",
            Needs::FUSE,
            cli::unreachable_endpoint,
        ),
        case("cli::bad_flag", Needs::NOTHING, cli::bad_flag),
        case("daemon_cli::through_daemon", s3, daemon_cli::through_daemon),
        case(
            "daemon_cli::dead_socket",
            Needs::NOTHING,
            daemon_cli::dead_socket,
        ),
        case(
            "daemon_cli::share_and_unshare",
            Needs::NOTHING,
            daemon_cli::share_and_unshare,
        ),
        case(
            "daemon_cli::plain_unmount",
            Needs::FUSE,
            daemon_cli::plain_unmount,
        ),
        case("heal::kill9_under_load::fallback", s3, || {
            heal::kill9_under_load(heal::Detector::Fallback, heal::Takeover::Resend)
        }),
        case("heal::kill9_under_load::fallback::no_resend", s3, || {
            heal::kill9_under_load(heal::Detector::Fallback, heal::Takeover::Slots)
        }),
        case("heal::hung_engine_replaced::fallback", s3, || {
            heal::hung_engine_replaced(heal::Detector::Fallback)
        }),
        case(
            "heal::kill9_under_load::ebpf",
            s3.union(Needs::EBPF),
            || heal::kill9_under_load(heal::Detector::Ebpf, heal::Takeover::Resend),
        ),
        case(
            "heal::hung_engine_replaced::ebpf",
            s3.union(Needs::EBPF),
            || heal::hung_engine_replaced(heal::Detector::Ebpf),
        ),
        case(
            "heal::frozen_engine_replaced_by_heartbeat::fallback",
            s3,
            || heal::frozen_engine_replaced_by_heartbeat(heal::Detector::Fallback, true),
        ),
        case(
            "heal::frozen_engine_replaced_by_heartbeat::fallback::no_fusectl",
            s3,
            || heal::frozen_engine_replaced_by_heartbeat(heal::Detector::Fallback, false),
        ),
        case(
            "heal::frozen_engine_replaced_by_heartbeat::ebpf",
            s3.union(Needs::EBPF),
            || heal::frozen_engine_replaced_by_heartbeat(heal::Detector::Ebpf, true),
        ),
        case(
            "heal::slow_store_is_never_a_hang",
            s3,
            heal::slow_store_is_never_a_hang,
        ),
        case("heal::upgrade_under_load", s3, || {
            heal::upgrade_under_load(heal::Takeover::Resend)
        }),
        case("heal::upgrade_under_load::no_resend", s3, || {
            heal::upgrade_under_load(heal::Takeover::Slots)
        }),
        case("heal::writes_survive_kill9", s3, || {
            heal::writes_survive_kill9(heal::Takeover::Resend)
        }),
        case("heal::writes_survive_kill9::no_resend", s3, || {
            heal::writes_survive_kill9(heal::Takeover::Slots)
        }),
        case(
            "heal::writes_survive_upgrade",
            s3,
            heal::writes_survive_upgrade,
        ),
        case("heal::resent_mkdir_is_not_applied_twice", s3, || {
            heal::resent_mkdir_is_not_applied_twice(heal::Takeover::Resend)
        }),
        case("heal::resent_symlink_is_not_applied_twice", s3, || {
            heal::resent_symlink_is_not_applied_twice(heal::Takeover::Resend)
        }),
        case(
            "heal::resent_symlink_is_not_applied_twice::no_resend",
            s3,
            || heal::resent_symlink_is_not_applied_twice(heal::Takeover::Slots),
        ),
        case(
            "heal::release_done_before_a_crash_is_not_redone",
            s3,
            || heal::release_done_before_a_crash_is_not_redone(heal::Takeover::Resend),
        ),
        case(
            "heal::release_done_before_a_crash_is_not_redone::no_resend",
            s3,
            || heal::release_done_before_a_crash_is_not_redone(heal::Takeover::Slots),
        ),
        case(
            "heal::resent_mkdir_is_not_applied_twice::no_resend",
            s3,
            || heal::resent_mkdir_is_not_applied_twice(heal::Takeover::Slots),
        ),
        case(
            "heal::holder_killed_remount_rebinds",
            Needs::FUSE,
            heal::holder_killed_remount_rebinds,
        ),
        case(
            "heal::aborted_connection_remounts",
            Needs::FUSE,
            heal::aborted_connection_remounts,
        ),
        case(
            "heal::lookalike_mountpoints_keep_their_own_journals",
            Needs::FUSE,
            heal::lookalike_mountpoints_keep_their_own_journals,
        ),
    ];
    // The block cache suite, once per I/O engine.
    macro_rules! both {
        ($($test:ident: $needs:expr),* $(,)?) => {$(
            cases.push(case(
                concat!("cache::", stringify!($test), "::io_uring"),
                $needs,
                cache::$test::io_uring,
            ));
            cases.push(case(
                concat!("cache::", stringify!($test), "::threads"),
                $needs,
                cache::$test::threads,
            ));
        )*};
    }
    both!(
        second_read_served_locally: s3,
        survives_kill_9: s3,
        store_down_still_readable: Needs::FUSE.union(Needs::WEED),
        changed_object_gives_new_bytes: s3,
        corrupt_block_is_refetched: s3,
        quota_is_respected: s3,
        full_cache_disk_is_bypassed: s3,
        random_reads_from_the_disk_tier: s3,
    );
    cases
}

/// A benchmark: `run(test_mode)`; in test mode (a plain test run) it only checks correctness
/// and returns `None`, otherwise the nanoseconds of one measured iteration.
pub struct BenchCase {
    pub name: &'static str,
    pub needs: Needs,
    pub run: fn(bool) -> anyhow::Result<Option<u64>>,
}

pub fn benches() -> Vec<BenchCase> {
    vec![BenchCase {
        name: "bench::seq_read_vs_sdk",
        needs: Needs::S3_MOUNT,
        run: bench::seq_read_vs_sdk,
    }]
}
