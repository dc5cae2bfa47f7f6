//! The remount Event hook against a mocked API server (tower-test) answering with recorded
//! responses (tests/fixtures), and against a real API server when BERTH_KUBECONFIG is set
//! (reported ignored otherwise).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{ensure, Context, Result};
use berth_csi::events::{Recorder, REASON};
use kube::client::Body;
use libtest_mimic::{Arguments, Completion, Failed, Trial};

const POD_A_UID: &str = "5d0b1c2e-7a11-4c0e-9f3e-0c1a2b3c4d5e";

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn target(uid: &str) -> PathBuf {
    PathBuf::from(format!(
        "/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~csi/pv-imagenet/mount"
    ))
}

/// Lists the node's pods, then creates one Event, on the pod whose target was re-bound.
fn records_an_event_on_the_pod_using_the_volume() -> Result<()> {
    rt().block_on(async {
        let (mock, mut handle) =
            tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
        let recorder = Recorder::new(kube::Client::new(mock, "default"), "node-1".into());
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.context("no list request")?;
            ensure!(req.method() == http::Method::GET, "{}", req.method());
            ensure!(req.uri().path() == "/api/v1/pods", "{}", req.uri());
            let query = req.uri().query().unwrap_or("");
            ensure!(
                query.contains("fieldSelector=spec.nodeName%3Dnode-1"),
                "list is not limited to this node: {query}"
            );
            send.send_response(http::Response::new(Body::from(fixture(
                "pods-on-node.json",
            ))));

            let (req, send) = handle.next_request().await.context("no event created")?;
            ensure!(req.method() == http::Method::POST, "{}", req.method());
            ensure!(
                req.uri().path() == "/api/v1/namespaces/ml/events",
                "{}",
                req.uri()
            );
            let body = req.into_body().collect_bytes().await?;
            let event: serde_json::Value = serde_json::from_slice(&body)?;
            ensure!(event["involvedObject"]["uid"] == POD_A_UID, "{event}");
            ensure!(event["involvedObject"]["name"] == "trainer-0", "{event}");
            ensure!(
                event["reason"] == REASON && event["type"] == "Warning",
                "{event}"
            );
            ensure!(event["source"]["host"] == "node-1", "{event}");
            let mut created = event.clone();
            created["metadata"]["name"] = "berth-remount-x7k2p".into();
            send.send_response(http::Response::new(Body::from(serde_json::to_vec(
                &created,
            )?)));
            anyhow::Ok(())
        });
        let n = recorder
            .remounted(
                "datasets/imagenet",
                &[target(POD_A_UID), PathBuf::from("/not/a/kubelet/path")],
            )
            .await?;
        server.await??;
        ensure!(n == 1, "{n} events created, want 1");
        Ok(())
    })
}

/// Targets that are not kubelet pod paths cause no API call at all.
fn no_pod_targets_make_no_calls() -> Result<()> {
    rt().block_on(async {
        let (mock, _handle) = tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
        let recorder = Recorder::new(kube::Client::new(mock, "default"), "node-1".into());
        let n = recorder
            .remounted("b/p", &[PathBuf::from("/tmp/target")])
            .await?;
        ensure!(n == 0);
        Ok(())
    })
}

/// Against a real API server: lists this node's pods (no pod matches, so no event).
fn real_api_server_lists_pods() -> Result<()> {
    let path = std::env::var("BERTH_KUBECONFIG").context("BERTH_KUBECONFIG")?;
    rt().block_on(async {
        let kubeconfig = kube::config::Kubeconfig::read_from(&path)?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
        let client = kube::Client::try_from(config)?;
        let recorder = Recorder::new(client, "berth-test-node-that-does-not-exist".into());
        let n = recorder.remounted("b/p", &[target("no-such-uid")]).await?;
        ensure!(n == 0);
        Ok(())
    })
}

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let wrap = |f: fn() -> Result<()>| move || f().map_err(|e| Failed::from(format!("{e:#}")));
    let mut trials = vec![
        Trial::test(
            "records_an_event_on_the_pod_using_the_volume",
            wrap(records_an_event_on_the_pod_using_the_volume),
        ),
        Trial::test(
            "no_pod_targets_make_no_calls",
            wrap(no_pod_targets_make_no_calls),
        ),
    ];
    let real = "real_api_server_lists_pods";
    trials.push(if std::env::var_os("BERTH_KUBECONFIG").is_some() {
        Trial::test(real, wrap(real_api_server_lists_pods))
    } else {
        Trial::ignorable_test(real, || {
            Ok(Completion::ignored_with(
                "BERTH_KUBECONFIG is not set (no API server to test against)",
            ))
        })
        .with_ignored_flag(true)
    });
    libtest_mimic::run(&args, trials).exit_code()
}
