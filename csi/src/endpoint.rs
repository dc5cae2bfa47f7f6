//! The S3 endpoints the controller may talk to. Endpoints reach the controller from
//! StorageClass parameters, volume ids and volume contexts, all of which someone other than the
//! operator can write; the controller sends signed LIST, GET, PUT and DELETE requests to them.
//! So every endpoint is parsed strictly into `scheme://host:port[/path]`, compared in that
//! normal form with the allowlist the operator gave (`--allowed-endpoint`), and only the
//! normal form is handed to the S3 client, so what was checked is what is connected to.
//! No endpoint at all (AWS's own, chosen by the SDK from the region) is always allowed; the
//! region then becomes part of the host name, so it is checked too.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// An S3 endpoint in normal form: lower-case scheme and host, a port (the scheme's default
/// when none was given), and a path without trailing `/` (usually empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    https: bool,
    host: String,
    port: u16,
    path: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("S3 endpoint {endpoint:?} is not http(s)://HOST[:PORT][/PATH]: {why}")]
pub struct BadEndpoint {
    pub endpoint: String,
    pub why: &'static str,
}

impl Endpoint {
    pub fn parse(text: &str) -> Result<Endpoint, BadEndpoint> {
        let bad = |why| BadEndpoint {
            endpoint: text.to_string(),
            why,
        };
        if text.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(bad("it has spaces, control or non-ASCII characters"));
        }
        // http's parser drops a fragment; other URL parsers read `\` as `/`.
        if text.contains('#') || text.contains('\\') {
            return Err(bad("`#` and `\\` are not allowed"));
        }
        let uri: http::Uri = text.parse().map_err(|_| bad("not a URL"))?;
        let https = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
            Some("http") => false,
            Some("https") => true,
            Some(_) => return Err(bad("the scheme is neither http nor https")),
            None => return Err(bad("no scheme")),
        };
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("user information (`@`) is not allowed"));
        }
        // The port as written (http's own parser reads a port that is not a u16 as none).
        let rest = authority
            .as_str()
            .strip_prefix(authority.host())
            .ok_or_else(|| bad("not a host name or IP address"))?;
        let port = match rest.strip_prefix(':') {
            None if !rest.is_empty() => return Err(bad("not a host name or IP address")),
            None if https => 443,
            None => 80,
            Some(digits) => match digits.parse::<u16>() {
                _ if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) => {
                    return Err(bad("the port is not a number"))
                }
                Ok(0) => return Err(bad("port 0")),
                Ok(n) => n,
                Err(_) => return Err(bad("the port is not 1 to 65535")),
            },
        };
        let host =
            normal_host(authority.host()).ok_or_else(|| bad("not a host name or IP address"))?;
        if uri.query().is_some() {
            return Err(bad("a query (`?`) is not allowed"));
        }
        let path = uri.path().trim_end_matches('/').to_string();
        if path.split('/').any(|c| c == "." || c == "..") {
            return Err(bad("the path has `.` or `..` components"));
        }
        Ok(Endpoint {
            https,
            host,
            port,
            path,
        })
    }

    /// The URL the S3 client is given: the normal form, the port only when it is not the
    /// scheme's default (the Host header, which requests are signed with, stays as usual).
    pub fn url(&self) -> String {
        let (scheme, default) = if self.https {
            ("https", 443)
        } else {
            ("http", 80)
        };
        if self.port == default {
            format!("{scheme}://{}{}", self.host, self.path)
        } else {
            format!("{scheme}://{}:{}{}", self.host, self.port, self.path)
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url())
    }
}

/// A lower-case DNS name, a dotted-quad IPv4 address, or a bracketed IPv6 address (in their
/// canonical text form); None for anything else (percent-encoding, `_`, zone ids, ...).
fn normal_host(host: &str) -> Option<String> {
    if let Some(inner) = host.strip_prefix('[') {
        let addr: Ipv6Addr = inner.strip_suffix(']')?.parse().ok()?;
        return Some(format!("[{addr}]"));
    }
    if let Ok(addr) = host.parse::<Ipv4Addr>() {
        return Some(addr.to_string());
    }
    let host = host.to_ascii_lowercase();
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    (host.len() <= 253 && host.split('.').all(label_ok)).then_some(host)
}

/// Whether `region` may be used: 1 to 63 ASCII letters, digits, `-` and `_`. Without a custom
/// endpoint, the SDK puts the region in the host name it connects to.
pub fn valid_region(region: &str) -> bool {
    (1..=63).contains(&region.len())
        && region
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Why the controller will not send requests to an endpoint (or region).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error(transparent)]
    Bad(#[from] BadEndpoint),
    #[error(
        "S3 endpoint {0} is not one this controller may talk to (add it with --allowed-endpoint)"
    )]
    NotAllowed(String),
    #[error("S3 region {0:?} is not 1 to 63 letters, digits, `-` or `_`")]
    BadRegion(String),
}

/// The endpoints the operator allows (`--allowed-endpoint`), in normal form.
#[derive(Clone, Debug, Default)]
pub struct Allowlist {
    endpoints: Vec<Endpoint>,
}

/// Where a volume's requests may go: made only by [`Allowlist::check`], and the only thing
/// the controller's S3 client can be built from ([`crate::s3::client`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allowed {
    endpoint: Option<Endpoint>,
    region: Option<String>,
}

impl Allowed {
    /// The custom endpoint (None: AWS's own).
    pub fn endpoint(&self) -> Option<&Endpoint> {
        self.endpoint.as_ref()
    }

    pub fn region(&self) -> Option<&str> {
        self.region.as_deref()
    }
}

impl Allowlist {
    /// Parses every URL; empty strings (an empty environment variable) are skipped.
    pub fn new<S: AsRef<str>>(urls: impl IntoIterator<Item = S>) -> Result<Self, BadEndpoint> {
        let mut endpoints = Vec::new();
        for url in urls {
            let url = url.as_ref().trim();
            if url.is_empty() {
                continue;
            }
            let e = Endpoint::parse(url)?;
            if !endpoints.contains(&e) {
                endpoints.push(e);
            }
        }
        Ok(Allowlist { endpoints })
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// Checks an endpoint (None or empty: AWS's own) and a region before any request is sent.
    pub fn check(&self, endpoint: Option<&str>, region: Option<&str>) -> Result<Allowed, Refused> {
        let region = region.filter(|r| !r.is_empty());
        if let Some(r) = region {
            if !valid_region(r) {
                return Err(Refused::BadRegion(r.to_string()));
            }
        }
        let endpoint = match endpoint.filter(|e| !e.is_empty()) {
            None => None,
            Some(text) => {
                let e = Endpoint::parse(text)?;
                if !self.endpoints.contains(&e) {
                    return Err(Refused::NotAllowed(e.url()));
                }
                Some(e)
            }
        };
        Ok(Allowed {
            endpoint,
            region: region.map(str::to_string),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> String {
        Endpoint::parse(s)
            .map(|e| e.url())
            .unwrap_or_else(|e| e.to_string())
    }

    #[test]
    fn endpoints_normalise() {
        for (given, normal) in [
            ("http://127.0.0.1:8333", "http://127.0.0.1:8333"),
            ("http://127.0.0.1:8333/", "http://127.0.0.1:8333"),
            (
                "HTTP://MinIO.Storage.svc:9000//",
                "http://minio.storage.svc:9000",
            ),
            ("http://minio:80", "http://minio"),
            ("https://s3.example.com:443/", "https://s3.example.com"),
            ("https://s3.example.com:8443", "https://s3.example.com:8443"),
            ("http://[0:0::1]:9000", "http://[::1]:9000"),
            ("http://gw.local:9000/s3/", "http://gw.local:9000/s3"),
        ] {
            assert_eq!(url(given), normal, "{given}");
        }
        assert_eq!(
            Endpoint::parse("http://minio").unwrap(),
            Endpoint::parse("http://minio:80/").unwrap()
        );
        assert_ne!(
            Endpoint::parse("http://minio").unwrap(),
            Endpoint::parse("https://minio").unwrap()
        );
    }

    #[test]
    fn junk_endpoints_are_refused() {
        for bad in [
            "",
            "minio:9000",
            "127.0.0.1:9000",
            "ftp://minio",
            "file:///etc/passwd",
            "http://",
            "http://:9000",
            "http://minio:",
            "http://minio:0",
            "http://minio:99999",
            "http://allowed:9000@evil:9000",
            "http://user@minio",
            "http://minio:9000?x=1",
            "http://minio:9000/#frag",
            "http://minio:9000#@evil",
            "http://evil\\@minio:9000",
            "http://minio:+80",
            "http://minio:8o",
            "http://min io",
            "http://minio_1:9000",
            "http://mini%6F:9000",
            "http://-minio",
            "http://minio./",
            "http://[fe80::1%25eth0]:9000",
            "http://minio/a/../b",
            "http://mínio",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn the_allowlist_compares_normal_forms() {
        let list =
            Allowlist::new(["http://127.0.0.1:8333/", "", "https://S3.example.com"]).unwrap();
        assert_eq!(list.endpoints().len(), 2);
        for ok in [
            "http://127.0.0.1:8333",
            "HTTP://127.0.0.1:8333//",
            "https://s3.example.com:443",
        ] {
            let a = list.check(Some(ok), None).unwrap();
            assert!(a.endpoint().is_some(), "{ok}");
        }
        for refused in [
            "http://127.0.0.1:1",
            "http://127.0.0.1:8334",
            "https://127.0.0.1:8333",
            "http://localhost:8333",
            "http://127.0.0.1:8333/other",
            "http://s3.example.com",
            "http://127.0.0.1:8333@127.0.0.1:1",
        ] {
            assert!(list.check(Some(refused), None).is_err(), "{refused}");
        }
        // No endpoint is AWS's own: allowed, with or without a list.
        assert_eq!(list.check(None, None).unwrap().endpoint(), None);
        assert_eq!(list.check(Some(""), None).unwrap().endpoint(), None);
        let empty = Allowlist::default();
        assert!(empty.check(None, Some("eu-west-1")).is_ok());
        assert_eq!(
            empty.check(Some("http://127.0.0.1:8333"), None),
            Err(Refused::NotAllowed("http://127.0.0.1:8333".into()))
        );
        assert!(Allowlist::new(["not a url"]).is_err());
    }

    #[test]
    fn regions_are_checked() {
        let list = Allowlist::default();
        for ok in ["us-east-1", "garage", "ru-central1", "eu_west"] {
            assert_eq!(list.check(None, Some(ok)).unwrap().region(), Some(ok));
        }
        for bad in ["evil.com/", "a.b", "us-east-1#", "x y", &"a".repeat(64)] {
            assert!(
                matches!(list.check(None, Some(bad)), Err(Refused::BadRegion(_))),
                "{bad}"
            );
        }
        assert_eq!(list.check(None, Some("")).unwrap().region(), None);
    }
}
