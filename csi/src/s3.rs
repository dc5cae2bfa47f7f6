//! The controller's S3 calls: a volume's provisioning record (see [`crate::record`]) and
//! its prefix's directory marker, made by CreateVolume; deleting a prefix.
//!
//! A client is built only from an [`Allowed`] endpoint (checked against the allowlist) and
//! the credentials in the CSI request: never from the plugin's own environment.

use std::collections::HashMap;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::ProvideErrorMetadata as _;
use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use aws_sdk_s3::Client;
use tonic::Status;

use crate::endpoint::Allowed;
use crate::record::{self, Record, Stored};
use crate::volume_id::VolumeRef;

/// A client for an allowed store, with the credentials of the CSI request only. A request
/// without them is INVALID_ARGUMENT: the plugin's AWS_* variables, profiles or instance role
/// are never used (they are the controller's, not the caller's).
pub fn client(store: &Allowed, secrets: &HashMap<String, String>) -> Result<Client, Status> {
    let given = |k: &str| secrets.get(k).filter(|v| !v.is_empty()).cloned();
    let (Some(key), Some(secret)) = (given("accessKeyId"), given("secretAccessKey")) else {
        return Err(Status::invalid_argument(
            "no S3 credentials: give the secrets accessKeyId and secretAccessKey \
             (csi.storage.k8s.io/provisioner-secret-*); berth-csi does not use its own",
        ));
    };
    let token = given("sessionToken");
    let region = store.region().unwrap_or("us-east-1").to_string();
    let mut conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region))
        .credentials_provider(Credentials::new(key, secret, token, None, "berth-csi"));
    if let Some(endpoint) = store.endpoint() {
        conf = conf.endpoint_url(endpoint.url()).force_path_style(true);
    }
    Ok(Client::from_conf(conf.build()))
}

fn store_error(what: &str, e: impl std::error::Error) -> Status {
    // The SDK's Display is terse; the source chain says what went wrong.
    let mut msg = format!("{what}: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    if msg.contains("NoSuchBucket") {
        return Status::failed_precondition(msg);
    }
    if msg.contains("AccessDenied") || msg.contains("InvalidAccessKeyId") {
        return Status::permission_denied(msg);
    }
    Status::unavailable(msg)
}

/// The key of a volume's record: outside the volume's prefix (so no pod sees it), under
/// `.berth-csi/` at the top of the bucket. (Stores such as SeaweedFS keep no user metadata on
/// `dir/` markers, so the marker itself cannot carry it.) None for a whole bucket, which
/// CreateVolume never makes.
fn record_key(vol: &VolumeRef) -> Option<String> {
    (!vol.prefix.is_empty()).then(|| format!("{RECORD_DIR}{}", vol.prefix))
}

const RECORD_DIR: &str = ".berth-csi/volumes/";

/// The volume's record, or None when there is none (no such key, no such bucket, or a whole
/// bucket). A record that is not one berth-csi writes is FAILED_PRECONDITION.
pub async fn read_record(client: &Client, vol: &VolumeRef) -> Result<Option<Stored>, Status> {
    let Some(key) = record_key(vol) else {
        return Ok(None);
    };
    let obj = match client
        .get_object()
        .bucket(&vol.bucket)
        .key(&key)
        .send()
        .await
    {
        Ok(obj) => obj,
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_no_such_key() || s.code() == Some("NoSuchBucket")) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(store_error("reading the volume record", e)),
    };
    if obj
        .content_length()
        .is_some_and(|n| n > record::MAX_LEN as i64)
    {
        return Err(Status::failed_precondition(
            record::BadRecord::TooLong(obj.content_length().unwrap_or(0) as usize).to_string(),
        ));
    }
    let body = obj
        .body
        .collect()
        .await
        .map_err(|e| Status::unavailable(format!("reading the volume record: {e}")))?;
    Stored::parse(&body.into_bytes())
        .map(Some)
        .map_err(|e| Status::failed_precondition(format!("{key}: {e}")))
}

/// Creates the prefix's directory marker and the volume's record.
pub async fn create_volume(
    client: &Client,
    vol: &VolumeRef,
    record: &Record,
) -> Result<(), Status> {
    let (Some(marker), Some(key)) = (vol.marker(), record_key(vol)) else {
        return Err(Status::invalid_argument("a volume needs a prefix"));
    };
    client
        .put_object()
        .bucket(&vol.bucket)
        .key(&marker)
        .body(Vec::new().into())
        .send()
        .await
        .map_err(|e| store_error("creating the volume's prefix", e))?;
    client
        .put_object()
        .bucket(&vol.bucket)
        .key(&key)
        .content_type("application/json")
        .body(record.to_json().into())
        .send()
        .await
        .map_err(|e| store_error("writing the volume record", e))?;
    Ok(())
}

/// Removes the volume's record (the data stays).
pub async fn delete_record(client: &Client, vol: &VolumeRef) -> Result<(), Status> {
    let Some(record) = record_key(vol) else {
        return Ok(());
    };
    client
        .delete_object()
        .bucket(&vol.bucket)
        .key(&record)
        .send()
        .await
        .map_err(|e| store_error("deleting the volume record", e))?;
    Ok(())
}

/// Whether the bucket exists and, for a prefix, holds at least one object under it.
pub async fn prefix_exists(client: &Client, vol: &VolumeRef) -> Result<bool, Status> {
    let mut list = client.list_objects_v2().bucket(&vol.bucket).max_keys(1);
    if let Some(marker) = vol.marker() {
        list = list.prefix(marker);
    }
    match list.send().await {
        Ok(page) => Ok(vol.marker().is_none()
            || page.key_count().unwrap_or(0) > 0
            || !page.contents().is_empty()),
        Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_bucket()) => Ok(false),
        Err(e) => Err(store_error("listing the volume", e)),
    }
}

/// Deletes every object under the prefix (and its marker). Returns how many went.
pub async fn delete_prefix(client: &Client, vol: &VolumeRef) -> Result<usize, Status> {
    let Some(marker) = vol.marker() else {
        return Err(Status::failed_precondition(
            "refusing to delete a whole bucket: the volume has no prefix",
        ));
    };
    let mut deleted = 0;
    loop {
        // Always list from the start: what was listed before is gone.
        let page = client
            .list_objects_v2()
            .bucket(&vol.bucket)
            .prefix(&marker)
            .max_keys(1000)
            .send()
            .await
            .map_err(|e| store_error("listing the volume's prefix", e))?;
        let keys: Vec<ObjectIdentifier> = page
            .contents()
            .iter()
            .filter_map(|o| o.key())
            .filter_map(|k| ObjectIdentifier::builder().key(k).build().ok())
            .collect();
        if keys.is_empty() {
            return Ok(deleted);
        }
        let n = keys.len();
        let delete = Delete::builder()
            .set_objects(Some(keys))
            .quiet(true)
            .build()
            .map_err(|e| Status::internal(e.to_string()))?;
        let out = client
            .delete_objects()
            .bucket(&vol.bucket)
            .delete(delete)
            .send()
            .await
            .map_err(|e| store_error("deleting the volume's objects", e))?;
        if let Some(err) = out.errors().first() {
            return Err(Status::unavailable(format!(
                "deleting {:?}: {}",
                err.key().unwrap_or(""),
                err.message().unwrap_or("failed")
            )));
        }
        deleted += n;
    }
}
