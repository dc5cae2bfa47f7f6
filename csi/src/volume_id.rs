//! Volume ids. A CSI volume id is all DeleteVolume gets besides the secrets, and anyone who
//! may create PVs can write one, so an id only says *where* a volume is; what to delete is
//! the provisioning record's to say ([`crate::record`]):
//!
//! - static PVs: `BUCKET/PREFIX` (or `BUCKET`); endpoint and region come from the PV's
//!   volumeAttributes;
//! - dynamic volumes: `BUCKET/PREFIX?e=ENDPOINT&r=REGION&d=1`, where the query part is
//!   percent-encoded and `d` is the delete policy the volume was created with (`1`: delete,
//!   `0`: retain), kept for people reading the id and for ids made before records had one:
//!   DeleteVolume ignores it. `d` is always there, so an id with a query is in the form
//!   CreateVolume makes.

use std::fmt::Write as _;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeRef {
    pub bucket: String,
    /// Without leading or trailing `/`; empty for the whole bucket.
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// `d=1`: informational in ids (DeleteVolume takes the policy from the record); in
    /// CreateVolume, the StorageClass's `onDelete: delete`.
    pub delete_on_delete: bool,
    /// In the form CreateVolume makes (a query); false for static handles.
    pub dynamic: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("volume id {id:?} is not BUCKET[/PREFIX][?query]: {why}")]
pub struct BadId {
    pub id: String,
    pub why: &'static str,
}

impl VolumeRef {
    pub fn parse(id: &str) -> Result<VolumeRef, BadId> {
        let bad = |why| BadId {
            id: id.to_string(),
            why,
        };
        let (path, query) = id.split_once('?').unwrap_or((id, ""));
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        if !valid_bucket(bucket) {
            return Err(bad("not a valid bucket name"));
        }
        let prefix = prefix.trim_matches('/');
        if prefix
            .split('/')
            .any(|c| c == ".." || c == "." || (c.is_empty() && !prefix.is_empty()))
        {
            return Err(bad("the prefix has empty, `.` or `..` components"));
        }
        let mut out = VolumeRef {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            endpoint: None,
            region: None,
            delete_on_delete: false,
            dynamic: !query.is_empty(),
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode(v).ok_or_else(|| bad("bad percent-encoding"))?;
            match k {
                "e" => out.endpoint = Some(v),
                "r" => out.region = Some(v),
                "d" => out.delete_on_delete = v == "1",
                _ => return Err(bad("unknown query key")),
            }
        }
        Ok(out)
    }

    pub fn id(&self) -> String {
        let mut id = self.bucket.clone();
        if !self.prefix.is_empty() {
            id.push('/');
            id.push_str(&self.prefix);
        }
        let mut query = Vec::new();
        if let Some(e) = &self.endpoint {
            query.push(format!("e={}", encode(e)));
        }
        if let Some(r) = &self.region {
            query.push(format!("r={}", encode(r)));
        }
        if self.dynamic {
            query.push(format!("d={}", u8::from(self.delete_on_delete)));
        }
        if !query.is_empty() {
            id.push('?');
            id.push_str(&query.join("&"));
        }
        id
    }

    /// The `berth mount` source.
    pub fn source(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    /// The key of the prefix's directory marker (`PREFIX/`), or None for a whole bucket.
    pub fn marker(&self) -> Option<String> {
        (!self.prefix.is_empty()).then(|| format!("{}/", self.prefix))
    }
}

/// S3 bucket naming rules (3-63 of lowercase letters, digits, `.`, `-`; alphanumeric ends).
/// Underscores and capitals are allowed too, as some S3-compatible stores accept them.
pub fn valid_bucket(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
}

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_handles_parse() {
        let v = VolumeRef::parse("my-bucket/data/set1/").unwrap();
        assert_eq!(v.bucket, "my-bucket");
        assert_eq!(v.prefix, "data/set1");
        assert_eq!(v.source(), "s3://my-bucket/data/set1");
        assert_eq!(v.marker().as_deref(), Some("data/set1/"));
        assert_eq!(VolumeRef::parse("bkt").unwrap().source(), "s3://bkt");
    }

    #[test]
    fn dynamic_ids_round_trip() {
        let v = VolumeRef {
            bucket: "b-1".into(),
            prefix: "pvs/pvc-123".into(),
            endpoint: Some("http://127.0.0.1:8333/x?y&z=%".into()),
            region: Some("eu-west-1".into()),
            delete_on_delete: true,
            dynamic: true,
        };
        let id = v.id();
        assert!(!id[id.find('?').unwrap() + 1..].contains('/'), "{id}");
        assert_eq!(VolumeRef::parse(&id).unwrap(), v);
        let retained = VolumeRef {
            endpoint: None,
            region: None,
            delete_on_delete: false,
            ..v
        };
        assert_eq!(retained.id(), "b-1/pvs/pvc-123?d=0");
        assert_eq!(VolumeRef::parse(&retained.id()).unwrap(), retained);
        assert!(!VolumeRef::parse("b-1/p").unwrap().dynamic);
    }

    #[test]
    fn junk_is_refused() {
        for id in [
            "",
            "x",
            "-bad-/p",
            "b k t/p",
            "bkt/a/../b",
            "bkt/a//b",
            "bkt/p?q=1",
            "bkt?e=%zz",
        ] {
            assert!(VolumeRef::parse(id).is_err(), "{id}");
        }
    }
}
