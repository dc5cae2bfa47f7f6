//! The provisioning record: what CreateVolume writes at `.berth-csi/volumes/<prefix>` in the
//! volume's bucket, and the only thing DeleteVolume believes. A volume id comes from a PV,
//! which anyone allowed to create PVs can write by hand, so DeleteVolume takes nothing from
//! it but where to look: no record means no volume this driver created (nothing is deleted),
//! the delete policy is the record's, and the endpoint and region the id names must be the
//! ones the record was created with. [`plan_delete`] is that decision, without any I/O.
//!
//! Version 1 is JSON: `{"version":1,"capacityBytes":N,"endpoint":URL|null,"region":R|null,
//! "onDelete":"retain"|"delete"}`. Records of berth-csi before version 1 hold only the
//! capacity (a decimal number); they say nothing about the delete policy, so their data is
//! retained.

use serde::{Deserialize, Serialize};

use crate::endpoint::{BadEndpoint, Endpoint};

/// The version this berth-csi writes and reads.
pub const VERSION: u32 = 1;

/// A record is a few hundred bytes; anything much larger is not one of ours.
pub const MAX_LEN: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDelete {
    Retain,
    Delete,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub version: u32,
    pub capacity_bytes: i64,
    /// The endpoint in normal form ([`Endpoint::url`]); None: AWS's own.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub on_delete: OnDelete,
}

/// A record as found in the bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stored {
    Current(Record),
    /// Written before records had a version: the capacity only.
    Legacy {
        capacity_bytes: i64,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadRecord {
    #[error("the volume record is {0} bytes long; berth-csi never writes records that long")]
    TooLong(usize),
    #[error("the volume record has version {0}, which this berth-csi does not know (written by a newer one?)")]
    UnknownVersion(u32),
    #[error("the volume record is not one berth-csi writes: {0}")]
    Unreadable(String),
    #[error("the volume record names an endpoint berth-csi would not write: {0}")]
    Endpoint(#[from] BadEndpoint),
}

impl Stored {
    pub fn parse(body: &[u8]) -> Result<Stored, BadRecord> {
        if body.len() > MAX_LEN {
            return Err(BadRecord::TooLong(body.len()));
        }
        let text = std::str::from_utf8(body)
            .map_err(|_| BadRecord::Unreadable("not UTF-8".into()))?
            .trim();
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            let capacity_bytes = text
                .parse()
                .map_err(|_| BadRecord::Unreadable("capacity out of range".into()))?;
            return Ok(Stored::Legacy { capacity_bytes });
        }
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let v: Versioned =
            serde_json::from_str(text).map_err(|e| BadRecord::Unreadable(e.to_string()))?;
        if v.version != VERSION {
            return Err(BadRecord::UnknownVersion(v.version));
        }
        let record: Record =
            serde_json::from_str(text).map_err(|e| BadRecord::Unreadable(e.to_string()))?;
        if let Some(e) = &record.endpoint {
            Endpoint::parse(e)?;
        }
        Ok(Stored::Current(record))
    }

    pub fn capacity_bytes(&self) -> i64 {
        match self {
            Stored::Current(r) => r.capacity_bytes,
            Stored::Legacy { capacity_bytes } => *capacity_bytes,
        }
    }
}

impl Record {
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings and numbers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// What DeleteVolume does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// No record: not a volume this driver created (or deleted already).
    Nothing,
    /// Remove the record, keep the data.
    KeepData { legacy: bool },
    /// Remove every object under the prefix, then the record.
    DeleteData,
}

/// The id's endpoint or region is not the record's.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the volume id names {what} {in_id}, but the volume was created with {in_record}; nothing deleted")]
pub struct Mismatch {
    pub what: &'static str,
    pub in_id: String,
    pub in_record: String,
}

fn shown(v: Option<&str>, none: &str) -> String {
    v.map_or_else(|| none.to_string(), |s| format!("{s:?}"))
}

/// Decides DeleteVolume from the record alone. `endpoint` and `region` are what the id named
/// (already allowed, so the record was read from there); they must be the record's.
pub fn plan_delete(
    endpoint: Option<&Endpoint>,
    region: Option<&str>,
    record: Option<&Stored>,
) -> Result<Plan, Mismatch> {
    let record = match record {
        None => return Ok(Plan::Nothing),
        Some(Stored::Legacy { .. }) => return Ok(Plan::KeepData { legacy: true }),
        Some(Stored::Current(r)) => r,
    };
    let recorded = match &record.endpoint {
        Some(e) => Some(Endpoint::parse(e).map_err(|_| Mismatch {
            what: "endpoint",
            in_id: shown(endpoint.map(Endpoint::url).as_deref(), "AWS's own"),
            in_record: format!("{e:?} (unreadable)"),
        })?),
        None => None,
    };
    if recorded.as_ref() != endpoint {
        return Err(Mismatch {
            what: "endpoint",
            in_id: shown(endpoint.map(Endpoint::url).as_deref(), "AWS's own"),
            in_record: shown(recorded.map(|e| e.url()).as_deref(), "AWS's own"),
        });
    }
    if record.region.as_deref() != region {
        return Err(Mismatch {
            what: "region",
            in_id: shown(region, "no region"),
            in_record: shown(record.region.as_deref(), "no region"),
        });
    }
    Ok(match record.on_delete {
        OnDelete::Delete => Plan::DeleteData,
        OnDelete::Retain => Plan::KeepData { legacy: false },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(endpoint: Option<&str>, region: Option<&str>, on_delete: OnDelete) -> Stored {
        Stored::Current(Record {
            version: VERSION,
            capacity_bytes: 1 << 30,
            endpoint: endpoint.map(str::to_string),
            region: region.map(str::to_string),
            on_delete,
        })
    }

    fn ep(s: &str) -> Endpoint {
        Endpoint::parse(s).unwrap()
    }

    #[test]
    fn records_round_trip() {
        let r = Record {
            version: VERSION,
            capacity_bytes: 10 << 30,
            endpoint: Some("http://127.0.0.1:8333".into()),
            region: None,
            on_delete: OnDelete::Delete,
        };
        let json = String::from_utf8(r.to_json()).unwrap();
        assert_eq!(
            json,
            r#"{"version":1,"capacityBytes":10737418240,"endpoint":"http://127.0.0.1:8333","region":null,"onDelete":"delete"}"#
        );
        assert_eq!(Stored::parse(json.as_bytes()), Ok(Stored::Current(r)));
    }

    #[test]
    fn legacy_records_are_a_capacity() {
        assert_eq!(
            Stored::parse(b"1073741824\n"),
            Ok(Stored::Legacy {
                capacity_bytes: 1 << 30
            })
        );
        assert_eq!(Stored::parse(b"0").unwrap().capacity_bytes(), 0);
    }

    #[test]
    fn junk_records_are_refused() {
        for bad in [
            &b""[..],
            b"-5",
            b"99999999999999999999999",
            b"\xff",
            b"{}",
            b"{\"version\":1}",
            b"{\"version\":1,\"capacityBytes\":1,\"endpoint\":null,\"region\":null,\"onDelete\":\"sometimes\"}",
            b"{\"version\":1,\"capacityBytes\":1,\"endpoint\":\"http://a@b\",\"region\":null,\"onDelete\":\"delete\"}",
        ] {
            assert!(Stored::parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(
            Stored::parse(br#"{"version":2,"whatever":true}"#),
            Err(BadRecord::UnknownVersion(2))
        );
        assert!(matches!(
            Stored::parse(&vec![b' '; MAX_LEN + 1]),
            Err(BadRecord::TooLong(_))
        ));
    }

    #[test]
    fn no_record_deletes_nothing() {
        // A hand-made `bucket/prefix?d=1` (with or without `e=`) finds no record.
        assert_eq!(plan_delete(None, None, None), Ok(Plan::Nothing));
        let e = ep("http://127.0.0.1:8333");
        assert_eq!(plan_delete(Some(&e), None, None), Ok(Plan::Nothing));
    }

    #[test]
    fn the_policy_is_the_records() {
        let e = ep("http://127.0.0.1:8333");
        let delete = record(Some("http://127.0.0.1:8333"), None, OnDelete::Delete);
        let retain = record(Some("http://127.0.0.1:8333"), None, OnDelete::Retain);
        assert_eq!(
            plan_delete(Some(&e), None, Some(&delete)),
            Ok(Plan::DeleteData)
        );
        assert_eq!(
            plan_delete(Some(&e), None, Some(&retain)),
            Ok(Plan::KeepData { legacy: false })
        );
        // Legacy records hold no policy: the data stays.
        assert_eq!(
            plan_delete(Some(&e), None, Some(&Stored::Legacy { capacity_bytes: 1 })),
            Ok(Plan::KeepData { legacy: true })
        );
        // The id's endpoint is compared in normal form.
        let slash = ep("HTTP://127.0.0.1:8333/");
        assert_eq!(
            plan_delete(Some(&slash), None, Some(&delete)),
            Ok(Plan::DeleteData)
        );
    }

    #[test]
    fn other_endpoints_or_regions_are_refused() {
        let delete = record(
            Some("http://127.0.0.1:8333"),
            Some("us-east-1"),
            OnDelete::Delete,
        );
        let local = ep("http://localhost:8333");
        let e = ep("http://127.0.0.1:8333");
        for (endpoint, region) in [
            (Some(&local), Some("us-east-1")),
            (None, Some("us-east-1")),
            (Some(&e), None),
            (Some(&e), Some("eu-west-1")),
        ] {
            assert!(
                plan_delete(endpoint, region, Some(&delete)).is_err(),
                "{endpoint:?} {region:?}"
            );
        }
        let aws = record(None, None, OnDelete::Delete);
        assert!(plan_delete(Some(&e), None, Some(&aws)).is_err());
        assert_eq!(plan_delete(None, None, Some(&aws)), Ok(Plan::DeleteData));
    }
}
