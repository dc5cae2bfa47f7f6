//! The controller's guards around DeleteVolume and the S3 endpoints it talks to (audit
//! finding M5), against the real berth-csi and SeaweedFS: DeleteVolume deletes only what
//! CreateVolume recorded, with the record's delete policy, never with the controller's own
//! credentials, and no request goes to an endpoint outside `--allowed-endpoint` (a listener
//! the test binds itself sees no connection).

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::TcpListener;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use berth_csi::pb;
use pb::volume_capability::access_mode::Mode;
use tonic::Code;

use crate::cases::Case;
use crate::fixture::{mount_cap, CsiOptions, Node};
use crate::reqs::Needs;
use crate::seaweed::{ACCESS_KEY, SECRET_KEY};
use crate::util::rt;

fn case(name: &'static str, run: fn() -> Result<()>) -> Case {
    Case {
        name,
        needs: Needs::S3_MOUNT,
        run,
    }
}

pub fn all() -> Vec<Case> {
    vec![
        case(
            "guard_delete_of_hand_made_handles_deletes_nothing",
            hand_made_handles,
        ),
        case(
            "guard_delete_policy_endpoint_and_region_come_from_the_record",
            policy_from_record,
        ),
        case(
            "guard_controller_never_uses_its_own_aws_credentials",
            no_ambient_credentials,
        ),
        case(
            "guard_endpoints_outside_the_allowlist_get_no_connection",
            allowlist,
        ),
    ]
}

fn secrets() -> HashMap<String, String> {
    HashMap::from([
        ("accessKeyId".to_string(), ACCESS_KEY.to_string()),
        ("secretAccessKey".to_string(), SECRET_KEY.to_string()),
    ])
}

/// Percent-encodes a volume id's query value.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A CSI call that must answer within 20 s: a request that went to a listener which never
/// answers would hang, which is a failure too.
fn call<T>(
    what: &str,
    fut: impl std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
) -> Result<std::result::Result<T, tonic::Status>> {
    rt().block_on(async { tokio::time::timeout(Duration::from_secs(20), fut).await })
        .map(|r| r.map(tonic::Response::into_inner))
        .map_err(|_| anyhow::anyhow!("{what}: no answer within 20 s (was a request sent?)"))
}

fn want_code<T: std::fmt::Debug>(
    what: &str,
    r: std::result::Result<T, tonic::Status>,
    want: Code,
) -> Result<tonic::Status> {
    match r {
        Ok(v) => bail!("{what}: succeeded ({v:?}) but must fail with {want:?}"),
        Err(s) if s.code() == want => Ok(s),
        Err(s) => bail!(
            "{what}: got {:?} ({}), want {want:?}",
            s.code(),
            s.message()
        ),
    }
}

/// `answer`, unless something connected to `listener` (the refused endpoint) meanwhile.
fn unreached<T>(listener: &TcpListener, what: &str, answer: Result<T>) -> Result<T> {
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => answer,
        Ok((_, from)) => {
            bail!("{what}: a connection reached the refused endpoint's listener (from {from})")
        }
        Err(e) => bail!("accept on the refused endpoint's listener: {e}"),
    }
}

fn create_req(
    name: &str,
    bucket: &str,
    endpoint: &str,
    extra: &[(&str, &str)],
) -> pb::CreateVolumeRequest {
    let mut parameters = HashMap::from([
        ("bucket".to_string(), bucket.to_string()),
        ("endpoint".to_string(), endpoint.to_string()),
        ("prefix".to_string(), "pvs".to_string()),
    ]);
    for (k, v) in extra {
        parameters.insert(k.to_string(), v.to_string());
    }
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: 1 << 30,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter)],
        parameters,
        secrets: secrets(),
        ..Default::default()
    }
}

fn delete_req(id: &str, secrets: HashMap<String, String>) -> pb::DeleteVolumeRequest {
    pb::DeleteVolumeRequest {
        volume_id: id.into(),
        secrets,
    }
}

fn check_no_secrets(logs: &str) -> Result<()> {
    ensure!(!logs.is_empty(), "no logs were captured");
    ensure!(
        !logs.contains(SECRET_KEY),
        "the secret key appears in the daemon or plugin logs"
    );
    Ok(())
}

/// Hand-made handles in the forms CreateVolume makes (`?e=...&d=1`), naming a prefix with
/// objects that no CreateVolume recorded: DeleteVolume succeeds and deletes nothing.
fn hand_made_handles() -> Result<()> {
    let server = crate::server()?;
    let bucket = server.bucket("csi-forged")?;
    let keys = ["victim/a.txt", "victim/b/c.txt", "other/d.txt"];
    for k in keys {
        bucket.put(k, b"precious".to_vec())?;
    }
    let node = Node::start("forged")?;
    let mut c = node.controller()?;
    let e = enc(&server.endpoint());
    let slash = enc(&format!("{}/", server.endpoint()));
    let b = &bucket.name;
    for id in [
        format!("{b}/victim?e={e}&d=1"),
        format!("{b}/victim?e={e}&r=us-east-1&d=1"),
        format!("{b}/victim?e={slash}&d=1"),
        format!("{b}/victim/b?e={e}&d=1"),
        format!("{b}?e={e}&d=1"),
        format!("{b}/victim"),
    ] {
        call(&id, c.delete_volume(delete_req(&id, secrets())))?
            .with_context(|| format!("DeleteVolume {id} must succeed"))?;
        for k in keys {
            ensure!(
                bucket.exists(k)?,
                "DeleteVolume {id} deleted {k}, which no CreateVolume made"
            );
        }
    }
    let logs = node.logs();
    ensure!(
        logs.contains("nothing deleted: no provisioning record"),
        "the plugin did not say why nothing was deleted"
    );
    let mut node = node;
    check_no_secrets(&node.stop())
}

/// The delete policy is the record's, whatever `d=` the id says; an id naming another
/// endpoint or region than the record's is refused and deletes nothing.
fn policy_from_record() -> Result<()> {
    let server = crate::server()?;
    let endpoint = server.endpoint();
    // Two names of the same store, both allowed: the record tells them apart.
    let other_name = endpoint.replace("127.0.0.1", "localhost");
    ensure!(
        other_name != endpoint,
        "endpoint {endpoint} is not 127.0.0.1"
    );
    let bucket = server.bucket("csi-policy")?;
    let node = Node::start_opts("policy", |_| CsiOptions {
        allowed_endpoints: Some(vec![endpoint.clone(), other_name.clone()]),
        ..Default::default()
    })?;
    let mut c = node.controller()?;
    let create = |c: &mut pb::controller_client::ControllerClient<tonic::transport::Channel>,
                  name: &str,
                  extra: &[(&str, &str)]|
     -> Result<String> {
        Ok(call(
            name,
            c.create_volume(create_req(name, &bucket.name, &endpoint, extra)),
        )??
        .volume
        .context("no volume")?
        .volume_id)
    };

    // onDelete=delete, deleted with an id that says d=0: the data goes anyway.
    let del = create(&mut c, "pvc-del", &[("onDelete", "delete")])?;
    ensure!(del.ends_with("&d=1"), "id {del}");
    let record = bucket.get(".berth-csi/volumes/pvs/pvc-del")?;
    let record: serde_json::Value = serde_json::from_slice(&record).context("record JSON")?;
    ensure!(
        record["version"] == 1
            && record["onDelete"] == "delete"
            && record["endpoint"] == endpoint.as_str()
            && record["capacityBytes"] == 1 << 30,
        "record {record}"
    );
    for i in 0..3 {
        bucket.put(&format!("pvs/pvc-del/f{i}"), b"x".to_vec())?;
    }
    let forged = del.replace("&d=1", "&d=0");
    for _ in 0..2 {
        call(
            "delete d=0",
            c.delete_volume(delete_req(&forged, secrets())),
        )??;
    }
    ensure!(
        bucket.list("pvs/pvc-del/")?.is_empty(),
        "onDelete=delete volume kept its data when the id said d=0: {:?}",
        bucket.list("pvs/pvc-del/")?
    );
    ensure!(
        !bucket.exists(".berth-csi/volumes/pvs/pvc-del")?,
        "record not removed"
    );

    // retain, deleted with an id forged to say d=1: the data stays.
    let keep = create(&mut c, "pvc-keep", &[])?;
    ensure!(keep.ends_with("&d=0"), "id {keep}");
    bucket.put("pvs/pvc-keep/data.bin", b"keep".to_vec())?;
    // The same name with another delete policy is another volume: ALREADY_EXISTS.
    want_code(
        "CreateVolume of pvc-keep again with onDelete=delete",
        call(
            "create",
            c.create_volume(create_req(
                "pvc-keep",
                &bucket.name,
                &endpoint,
                &[("onDelete", "delete")],
            )),
        )?,
        Code::AlreadyExists,
    )?;
    let forged = keep.replace("&d=0", "&d=1");
    call(
        "delete d=1",
        c.delete_volume(delete_req(&forged, secrets())),
    )??;
    ensure!(
        bucket.exists("pvs/pvc-keep/data.bin")?,
        "retained data was deleted by an id forged with d=1"
    );
    ensure!(
        !bucket.exists(".berth-csi/volumes/pvs/pvc-keep")?,
        "record not removed"
    );

    // An id naming another region or another (allowed) endpoint than the record's:
    // FAILED_PRECONDITION, nothing deleted, the record stays.
    let reg = create(
        &mut c,
        "pvc-reg",
        &[("onDelete", "delete"), ("region", "us-east-1")],
    )?;
    bucket.put("pvs/pvc-reg/data.bin", b"x".to_vec())?;
    for forged in [
        reg.replace("r=us-east-1", "r=eu-west-1"),
        reg.replace("&r=us-east-1", ""),
        reg.replace(&enc(&endpoint), &enc(&other_name)),
    ] {
        ensure!(forged != reg, "forging {reg} changed nothing");
        want_code(
            &format!("DeleteVolume {forged}"),
            call("delete", c.delete_volume(delete_req(&forged, secrets())))?,
            Code::FailedPrecondition,
        )?;
        ensure!(
            bucket.exists("pvs/pvc-reg/data.bin")?
                && bucket.exists(".berth-csi/volumes/pvs/pvc-reg")?,
            "DeleteVolume {forged} deleted something"
        );
    }
    // The endpoint is compared in normal form: a trailing slash is the same endpoint.
    let slashed = reg.replace(&enc(&endpoint), &enc(&format!("{endpoint}/")));
    call("delete", c.delete_volume(delete_req(&slashed, secrets())))??;
    ensure!(
        bucket.list("pvs/pvc-reg/")?.is_empty()
            && !bucket.exists(".berth-csi/volumes/pvs/pvc-reg")?,
        "pvc-reg not deleted"
    );
    let mut node = node;
    check_no_secrets(&node.stop())
}

/// berth-csi runs with valid AWS_* credentials in its environment; requests without
/// secrets are refused and delete nothing.
fn no_ambient_credentials() -> Result<()> {
    let server = crate::server()?;
    let endpoint = server.endpoint();
    let bucket = server.bucket("csi-ambient")?;
    let node = Node::start_opts("ambient", |_| CsiOptions {
        env: vec![
            ("AWS_ACCESS_KEY_ID".into(), OsString::from(ACCESS_KEY)),
            ("AWS_SECRET_ACCESS_KEY".into(), OsString::from(SECRET_KEY)),
            ("AWS_REGION".into(), OsString::from("us-east-1")),
        ],
        allowed_endpoints: None,
    })?;
    let mut c = node.controller()?;
    let id = call(
        "create",
        c.create_volume(create_req(
            "pvc-env",
            &bucket.name,
            &endpoint,
            &[("onDelete", "delete")],
        )),
    )??
    .volume
    .context("no volume")?
    .volume_id;
    bucket.put("pvs/pvc-env/data.bin", b"mine".to_vec())?;
    let empty = HashMap::from([
        ("accessKeyId".to_string(), String::new()),
        ("secretAccessKey".to_string(), String::new()),
    ]);
    for (what, s) in [("no secrets", HashMap::new()), ("empty secrets", empty)] {
        let answer = call("delete", c.delete_volume(delete_req(&id, s)))?;
        // First what is in the store, then the answer.
        ensure!(
            bucket.exists("pvs/pvc-env/data.bin")?
                && bucket.exists(".berth-csi/volumes/pvs/pvc-env")?,
            "DeleteVolume with {what} deleted the volume with the plugin's own credentials"
        );
        let status = want_code(
            &format!("DeleteVolume with {what}"),
            answer,
            Code::InvalidArgument,
        )?;
        ensure!(
            status.message().contains("no S3 credentials"),
            "{}",
            status.message()
        );
    }
    let mut no_secrets = create_req("pvc-nosecret", &bucket.name, &endpoint, &[]);
    no_secrets.secrets.clear();
    want_code(
        "CreateVolume without secrets",
        call("create", c.create_volume(no_secrets))?,
        Code::InvalidArgument,
    )?;
    ensure!(
        bucket.list("pvs/pvc-nosecret")?.is_empty(),
        "CreateVolume without secrets made the prefix"
    );
    want_code(
        "ValidateVolumeCapabilities without secrets",
        call(
            "validate",
            c.validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                volume_id: id.clone(),
                volume_capabilities: vec![mount_cap(Mode::MultiNodeReaderOnly)],
                ..Default::default()
            }),
        )?,
        Code::InvalidArgument,
    )?;
    // A static handle names nothing this driver made: no credentials needed to do nothing.
    call(
        "delete static",
        c.delete_volume(delete_req(
            &format!("{}/pvs/pvc-env", bucket.name),
            HashMap::new(),
        )),
    )??;
    ensure!(
        bucket.exists("pvs/pvc-env/data.bin")?,
        "static delete deleted data"
    );
    // With the secrets it goes.
    call("delete", c.delete_volume(delete_req(&id, secrets())))??;
    ensure!(
        bucket.list("pvs/pvc-env/")?.is_empty(),
        "not deleted with secrets"
    );
    let mut node = node;
    check_no_secrets(&node.stop())
}

/// Endpoints outside the allowlist in CreateVolume parameters, DeleteVolume ids and
/// ValidateVolumeCapabilities ids and contexts: refused, and nothing connects to a listener
/// on the refused address.
fn allowlist() -> Result<()> {
    let server = crate::server()?;
    let endpoint = server.endpoint();
    let s3_port = endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .context("the test endpoint has no port")?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let port = listener.local_addr()?.port();
    let bucket = server.bucket("csi-allow")?;
    bucket.put("victim/data.bin", b"x".to_vec())?;
    let node = Node::start("allow")?;
    let mut c = node.controller()?;
    let refused = [
        format!("http://127.0.0.1:{port}"),
        format!("http://127.0.0.1:{port}/"),
        format!("http://localhost:{port}"),
        "http://127.0.0.1:1".to_string(),
        // The allowed endpoint as user information, the listener as the host.
        format!("http://127.0.0.1:{s3_port}@127.0.0.1:{port}"),
        format!("https://127.0.0.1:{s3_port}"),
    ];
    for (i, url) in refused.iter().enumerate() {
        let name = format!("pvc-refused-{i}");
        let answer = call(
            url,
            c.create_volume(create_req(&name, &bucket.name, url, &[])),
        );
        let status = want_code(
            &format!("CreateVolume with endpoint {url}"),
            unreached(&listener, url, answer)?,
            Code::InvalidArgument,
        )?;
        ensure!(
            status.message().contains("endpoint"),
            "{}",
            status.message()
        );
        let id = format!("{}/victim?e={}&d=1", bucket.name, enc(url));
        let answer = call(&id, c.delete_volume(delete_req(&id, secrets())));
        want_code(
            &format!("DeleteVolume {id}"),
            unreached(&listener, &id, answer)?,
            Code::FailedPrecondition,
        )?;
        let answer = call(
            &id,
            c.validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                volume_id: id.clone(),
                volume_capabilities: vec![mount_cap(Mode::MultiNodeReaderOnly)],
                secrets: secrets(),
                ..Default::default()
            }),
        );
        want_code(
            &format!("ValidateVolumeCapabilities {id}"),
            unreached(&listener, &id, answer)?,
            Code::FailedPrecondition,
        )?;
        let answer = call(
            url,
            c.validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                volume_id: format!("{}/victim", bucket.name),
                volume_context: HashMap::from([("endpoint".to_string(), url.clone())]),
                volume_capabilities: vec![mount_cap(Mode::MultiNodeReaderOnly)],
                secrets: secrets(),
                ..Default::default()
            }),
        );
        want_code(
            &format!("ValidateVolumeCapabilities of a static handle at {url}"),
            unreached(&listener, url, answer)?,
            Code::FailedPrecondition,
        )?;
    }
    // A region that would be a host name part is refused too.
    want_code(
        "CreateVolume with region evil.example/",
        call(
            "region",
            c.create_volume(create_req(
                "pvc-region",
                &bucket.name,
                &endpoint,
                &[("region", "evil.example/")],
            )),
        )?,
        Code::InvalidArgument,
    )?;
    unreached(&listener, "all of the above", Ok(()))?;
    // The allowed endpoint in other spellings is the same endpoint.
    let upper = format!("HTTP://127.0.0.1:{s3_port}/");
    let vol = call(
        "create",
        c.create_volume(create_req(
            "pvc-ok",
            &bucket.name,
            &upper,
            &[("onDelete", "delete")],
        )),
    )??
    .volume
    .context("no volume")?;
    call(
        "delete",
        c.delete_volume(delete_req(&vol.volume_id, secrets())),
    )??;
    ensure!(bucket.list("pvs/pvc-ok")?.is_empty(), "pvc-ok not deleted");
    ensure!(bucket.exists("victim/data.bin")?, "victim/data.bin is gone");
    let mut node = node;
    check_no_secrets(&node.stop())
}
