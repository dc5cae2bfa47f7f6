//! A guest sending FUSE requests with hostile names to a share of a local directory store:
//! every reply is well formed, nothing panics, and nothing appears outside the store.

mod hostile_guest {
    use crate::cli::args::{Cli, Command};
    use crate::memory::MemoryLimiter;
    use crate::volume::{self, Opening, Source, Target};
    use berth_vhost::testing::{check_reply, fuse_request, TestQueue};
    use clap::Parser as _;
    use fuse_backend_rs::api::server::Server;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    const LOOKUP: u32 = 1;
    const SYMLINK: u32 = 6;
    const MKNOD: u32 = 8;
    const MKDIR: u32 = 9;
    const UNLINK: u32 = 10;
    const RMDIR: u32 = 11;
    const RENAME: u32 = 12;
    const LINK: u32 = 13;
    const CREATE: u32 = 35;
    const INIT: u32 = 26;

    /// Fixed-size argument struct before the name(s), per opcode (FUSE 7.31).
    fn args_len(opcode: u32) -> usize {
        match opcode {
            MKNOD | CREATE => 16,
            MKDIR | RENAME | LINK => 8,
            _ => 0,
        }
    }

    fn name() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"..".to_vec()),
            Just(b".".to_vec()),
            Just(b"".to_vec()),
            Just(b"../outside/escaped".to_vec()),
            Just(b"../../outside".to_vec()),
            Just(b"a/b".to_vec()),
            Just(b"/etc/passwd".to_vec()),
            Just(b"ok-name".to_vec()),
            Just(b"dir".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..40),
        ]
    }

    #[test]
    fn hostile_names_stay_inside_the_share() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(store.join("dir")).unwrap();
        std::fs::write(store.join("dir/file"), b"data").unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let state = dir.path().join("state");
        let cli = Cli::try_parse_from([
            "berth",
            "mount",
            &store.to_string_lossy(),
            "/unused",
            "--state-dir",
            &state.to_string_lossy(),
        ])
        .unwrap();
        let Command::Mount(args) = cli.command else {
            panic!("parsed as another command");
        };
        let config = args.volume_config().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let memory = MemoryLimiter::new(config.memory_limit);
        let target = Target {
            text: args.source.clone(),
            source: Source::Local(store.clone()),
            mountpoint: dir.path().join("fs.sock"),
        };
        let engine =
            volume::build_volume(&rt, &config, &target, &state, Opening::FRESH, &memory, None)
                .unwrap();
        let server = Server::new(engine.fs.clone());
        let mut queue = TestQueue::new();
        let mut init = Vec::new();
        for v in [7u32, 31, 1 << 20, 0] {
            init.extend_from_slice(&v.to_le_bytes());
        }
        init.extend_from_slice(&[0u8; 48]);
        let (len, reply) = queue.request(&server, &fuse_request(INIT, 1, 0, &init), 4096);
        assert_eq!(
            check_reply(len, 4096, &reply, Some(1))
                .unwrap()
                .unwrap()
                .error,
            0
        );
        // The runner takes a `Fn`; the queue is mutated through a RefCell.
        let queue = std::cell::RefCell::new(queue);

        let ops = prop_oneof![
            Just(LOOKUP),
            Just(SYMLINK),
            Just(MKNOD),
            Just(MKDIR),
            Just(UNLINK),
            Just(RMDIR),
            Just(RENAME),
            Just(LINK),
            Just(CREATE),
        ];
        let case = (
            ops,
            prop_oneof![Just(1u64), Just(2u64), 0u64..5, any::<u64>()],
            name(),
            name(),
            any::<u64>(),
        );
        let mut runner = TestRunner::new(Config {
            cases: 400,
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&case, |(opcode, nodeid, first, second, unique)| {
                let mut body = vec![0u8; args_len(opcode)];
                if opcode == RENAME {
                    body.copy_from_slice(&1u64.to_le_bytes()); // newdir: the root
                }
                body.extend_from_slice(&first);
                body.push(0);
                if opcode == RENAME || opcode == SYMLINK {
                    body.extend_from_slice(&second);
                    body.push(0);
                }
                let request = fuse_request(opcode, unique, nodeid, &body);
                let (len, reply) = queue.borrow_mut().request(&server, &request, 4096);
                let header =
                    check_reply(len, 4096, &reply, Some(unique)).map_err(TestCaseError::fail)?;
                // The server reads the name up to its first NUL.
                let seen = first.split(|b| *b == 0).next().unwrap_or_default();
                let bad = seen.is_empty()
                    || seen == b"."
                    || seen == b".."
                    || seen.contains(&b'/')
                    || std::str::from_utf8(seen).is_err();
                if bad {
                    let error = header.map_or(0, |h| h.error);
                    prop_assert!(error < 0, "{opcode} of {first:?} answered {error}");
                }
                let escaped: Vec<_> = std::fs::read_dir(&outside).unwrap().flatten().collect();
                prop_assert!(escaped.is_empty(), "files outside the share: {escaped:?}");
                Ok(())
            })
            .unwrap();
        engine.fs.shutdown();
        drop(queue);
    }
}
