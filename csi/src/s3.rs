//! The controller's S3 calls: a prefix's marker object (created with the volume, carrying its
//! capacity so that a repeated CreateVolume can be checked), and deleting a prefix.

use std::collections::HashMap;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use aws_sdk_s3::Client;
use tonic::Status;

use crate::volume_id::VolumeRef;

/// A client for the store of `vol`, with the credentials of the CSI request (or, without
/// them, the standard AWS environment variables of the plugin).
pub fn client(vol: &VolumeRef, secrets: &HashMap<String, String>) -> Result<Client, Status> {
    let key = secrets
        .get("accessKeyId")
        .cloned()
        .or_else(|| std::env::var("AWS_ACCESS_KEY_ID").ok());
    let secret = secrets
        .get("secretAccessKey")
        .cloned()
        .or_else(|| std::env::var("AWS_SECRET_ACCESS_KEY").ok());
    let token = secrets
        .get("sessionToken")
        .cloned()
        .or_else(|| std::env::var("AWS_SESSION_TOKEN").ok());
    let (Some(key), Some(secret)) = (key, secret) else {
        return Err(Status::invalid_argument(
            "no S3 credentials: give the secrets accessKeyId and secretAccessKey",
        ));
    };
    let region = vol
        .region
        .clone()
        .or_else(|| std::env::var("AWS_REGION").ok())
        .unwrap_or_else(|| "us-east-1".into());
    let mut conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region))
        .credentials_provider(Credentials::new(key, secret, token, None, "berth-csi"));
    if let Some(endpoint) = &vol.endpoint {
        conf = conf.endpoint_url(endpoint).force_path_style(true);
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
/// `.berth-csi/` at the top of the bucket. It holds the capacity asked for, so a repeated
/// CreateVolume can be told from a conflicting one. (Stores such as SeaweedFS keep no user
/// metadata on `dir/` markers, so the marker itself cannot carry it.)
fn record_key(vol: &VolumeRef) -> Option<String> {
    (!vol.prefix.is_empty()).then(|| format!("{RECORD_DIR}{}", vol.prefix))
}

const RECORD_DIR: &str = ".berth-csi/volumes/";

/// The capacity recorded for the volume, if it exists.
pub async fn marker_capacity(client: &Client, vol: &VolumeRef) -> Result<Option<i64>, Status> {
    let Some(key) = record_key(vol) else {
        return Ok(Some(0));
    };
    match client
        .get_object()
        .bucket(&vol.bucket)
        .key(&key)
        .send()
        .await
    {
        Ok(obj) => {
            let body = obj
                .body
                .collect()
                .await
                .map_err(|e| Status::unavailable(format!("reading the volume record: {e}")))?;
            Ok(Some(
                String::from_utf8_lossy(&body.into_bytes())
                    .trim()
                    .parse()
                    .unwrap_or(0),
            ))
        }
        Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
        Err(e) => Err(store_error("reading the volume record", e)),
    }
}

/// Creates the prefix's directory marker and the volume's record.
pub async fn create_marker(client: &Client, vol: &VolumeRef, capacity: i64) -> Result<(), Status> {
    let (Some(marker), Some(record)) = (vol.marker(), record_key(vol)) else {
        return Ok(());
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
        .key(&record)
        .body(capacity.to_string().into_bytes().into())
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
