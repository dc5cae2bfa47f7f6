//! A minimal, read-only S3 endpoint on loopback serving a fixed set of keys.
//!
//! SeaweedFS keeps objects in a path-based filer: it rejects keys with `.` or
//! `..` components or a component over 255 bytes, and folds `//` into `/`.
//! Real S3 stores all of those verbatim, so the odd-key test serves them from
//! here instead. Supported: HeadBucket, GetBucketLocation, ListObjects (v1
//! and v2, prefix, delimiter, pagination, `encoding-type=url`), HeadObject and
//! GetObject (with a `Range`). Signatures are not checked. Anything else gets
//! 501 NotImplemented.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

const LAST_MODIFIED_ISO: &str = "2024-01-02T03:04:05.000Z";
const LAST_MODIFIED_HTTP: &str = "Tue, 02 Jan 2024 03:04:05 GMT";

struct State {
    bucket: String,
    objects: BTreeMap<String, Vec<u8>>,
    requests: Mutex<Vec<String>>,
}

pub struct FakeS3 {
    port: u16,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl FakeS3 {
    pub fn start(bucket: &str, objects: &[(&str, &[u8])]) -> Result<FakeS3> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding fake S3")?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(State {
            bucket: bucket.to_owned(),
            objects: objects
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect(),
            requests: Mutex::new(Vec::new()),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let accept = std::thread::Builder::new()
            .name("fake-s3-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if sp.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let st = st.clone();
                    let _ = std::thread::Builder::new()
                        .name("fake-s3-conn".into())
                        .spawn(move || {
                            let _ = serve_connection(conn, &st);
                        });
                }
            })?;
        Ok(FakeS3 {
            port,
            state,
            stop,
            accept: Some(accept),
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Request lines seen so far (for failure messages).
    pub fn requests(&self) -> Vec<String> {
        self.state.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeS3 {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

struct Request {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// HEAD: send Content-Length of the body but not the body.
    head: bool,
}

impl Response {
    fn new(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            head: false,
        }
    }

    fn header(mut self, k: &str, v: impl Into<String>) -> Response {
        self.headers.push((k.to_owned(), v.into()));
        self
    }

    fn xml(status: u16, body: String) -> Response {
        let mut r = Response::new(status).header("Content-Type", "application/xml");
        r.body = body.into_bytes();
        r
    }

    fn error(status: u16, code: &str, message: &str) -> Response {
        Response::xml(
            status,
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>fake</RequestId></Error>"
            ),
        )
    }
}

fn serve_connection(conn: TcpStream, state: &State) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut writer = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let line = line.trim_end().to_owned();
        if line.is_empty() {
            continue;
        }
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_owned(), v.trim().to_owned()));
            }
        }
        let mut parts = line.split(' ');
        let method = parts.next().unwrap_or("").to_owned();
        let target = parts.next().unwrap_or("/").to_owned();
        let (raw_path, raw_query) = target.split_once('?').unwrap_or((&target, ""));
        let req = Request {
            method,
            path: percent_decode(raw_path),
            query: raw_query
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
            headers,
        };
        state.requests.lock().unwrap().push(line.clone());

        // Bodies are only expected on writes, which are refused; drain a
        // Content-Length body, give up on the connection for anything else.
        let chunked = req
            .header("Transfer-Encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let len: u64 = req
            .header("Content-Length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if len > 0 {
            std::io::copy(&mut (&mut reader).take(len), &mut std::io::sink())?;
        }
        let resp = handle(&req, state);
        let close = chunked;
        write_response(&mut writer, &resp, close)?;
        if close {
            return Ok(());
        }
    }
}

fn write_response(w: &mut TcpStream, r: &Response, close: bool) -> std::io::Result<()> {
    let reason = match r.status {
        200 => "OK",
        206 => "Partial Content",
        400 => "Bad Request",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Not Implemented",
    };
    let mut out = format!("HTTP/1.1 {} {reason}\r\n", r.status);
    out.push_str(&format!("Content-Length: {}\r\n", r.body.len()));
    out.push_str("x-amz-request-id: fake\r\nServer: berth-e2e-fake-s3\r\n");
    if close {
        out.push_str("Connection: close\r\n");
    }
    for (k, v) in &r.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    w.write_all(out.as_bytes())?;
    if !r.head {
        w.write_all(&r.body)?;
    }
    w.flush()
}

fn handle(req: &Request, state: &State) -> Response {
    let path = req.path.strip_prefix('/').unwrap_or(&req.path);
    let (bucket, key) = match path.split_once('/') {
        Some((b, k)) => (b, Some(k)),
        None => (path, None),
    };
    if bucket != state.bucket {
        let mut r = Response::error(404, "NoSuchBucket", "The specified bucket does not exist");
        r.head = req.method == "HEAD";
        return r;
    }
    let head = req.method == "HEAD";
    match (req.method.as_str(), key) {
        ("HEAD", None) | ("HEAD", Some("")) => {
            Response::new(200).header("x-amz-bucket-region", "us-east-1")
        }
        ("GET", None) | ("GET", Some("")) => {
            if req.param("location").is_some() {
                return Response::xml(
                    200,
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<LocationConstraint xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"></LocationConstraint>".into(),
                );
            }
            list(req, state)
        }
        ("GET", Some(key)) | ("HEAD", Some(key)) => match state.objects.get(key) {
            None => {
                let mut r = Response::error(404, "NoSuchKey", "The specified key does not exist.");
                r.head = head;
                r
            }
            Some(data) => {
                let mut r = get_object(req, data);
                r.head = head;
                r
            }
        },
        _ => Response::error(501, "NotImplemented", "fake S3 is read-only"),
    }
}

fn etag(data: &[u8]) -> String {
    // Not MD5, but stable and quoted like one.
    let h = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("\"{h:016x}{:016x}\"", data.len())
}

fn get_object(req: &Request, data: &[u8]) -> Response {
    let total = data.len() as u64;
    let base = |status| {
        Response::new(status)
            .header("Content-Type", "application/octet-stream")
            .header("ETag", etag(data))
            .header("Last-Modified", LAST_MODIFIED_HTTP)
            .header("Accept-Ranges", "bytes")
    };
    let Some(range) = req.header("Range").and_then(|r| r.strip_prefix("bytes=")) else {
        let mut r = base(200);
        r.body = data.to_vec();
        return r;
    };
    let (a, b) = range.split_once('-').unwrap_or((range, ""));
    let (start, end) = match (a.parse::<u64>().ok(), b.parse::<u64>().ok()) {
        (Some(s), Some(e)) => (s, e.min(total.saturating_sub(1))),
        (Some(s), None) => (s, total.saturating_sub(1)),
        (None, Some(n)) => (total.saturating_sub(n), total.saturating_sub(1)),
        (None, None) => return Response::error(400, "InvalidArgument", "bad Range"),
    };
    if start >= total || start > end {
        return Response::error(
            416,
            "InvalidRange",
            "The requested range is not satisfiable",
        )
        .header("Content-Range", format!("bytes */{total}"));
    }
    let mut r = base(206).header("Content-Range", format!("bytes {start}-{end}/{total}"));
    r.body = data[start as usize..=end as usize].to_vec();
    r
}

/// ListObjects v1/v2 over the fixed key set.
fn list(req: &Request, state: &State) -> Response {
    let v2 = req.param("list-type") == Some("2");
    let prefix = req.param("prefix").unwrap_or("");
    let delimiter = req.param("delimiter").filter(|d| !d.is_empty());
    let max_keys: usize = req
        .param("max-keys")
        .and_then(|m| m.parse().ok())
        .unwrap_or(1000)
        .min(1000);
    let url = req.param("encoding-type") == Some("url");
    let after = if v2 {
        req.param("continuation-token")
            .map(hex_decode)
            .or_else(|| req.param("start-after").map(str::to_owned))
    } else {
        req.param("marker").map(str::to_owned)
    }
    .unwrap_or_default();

    // (name, is_prefix) in lexicographic order, common prefixes folded.
    let mut entries: Vec<(String, bool)> = Vec::new();
    for key in state.objects.keys() {
        let Some(rest) = key.strip_prefix(prefix) else {
            continue;
        };
        let entry = match delimiter.and_then(|d| rest.find(d).map(|i| i + d.len())) {
            Some(end) => (format!("{prefix}{}", &rest[..end]), true),
            None => (key.clone(), false),
        };
        if entry.0.as_str() <= after.as_str() {
            continue;
        }
        if entries.last() != Some(&entry) {
            entries.push(entry);
        }
    }
    let truncated = entries.len() > max_keys;
    entries.truncate(max_keys);
    let enc = |s: &str| {
        if url {
            percent_encode(s)
        } else {
            xml_escape(s)
        }
    };

    let mut x = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">",
    );
    x.push_str(&format!("<Name>{}</Name>", xml_escape(&state.bucket)));
    x.push_str(&format!("<Prefix>{}</Prefix>", enc(prefix)));
    if let Some(d) = delimiter {
        x.push_str(&format!("<Delimiter>{}</Delimiter>", enc(d)));
    }
    x.push_str(&format!("<MaxKeys>{max_keys}</MaxKeys>"));
    if url {
        x.push_str("<EncodingType>url</EncodingType>");
    }
    x.push_str(&format!("<IsTruncated>{truncated}</IsTruncated>"));
    if v2 {
        x.push_str(&format!("<KeyCount>{}</KeyCount>", entries.len()));
        if let Some(t) = req.param("continuation-token") {
            x.push_str(&format!(
                "<ContinuationToken>{}</ContinuationToken>",
                xml_escape(t)
            ));
        }
        if let Some(s) = req.param("start-after") {
            x.push_str(&format!("<StartAfter>{}</StartAfter>", enc(s)));
        }
    } else {
        x.push_str(&format!("<Marker>{}</Marker>", enc(&after)));
    }
    if truncated {
        let last = &entries.last().expect("truncated implies entries").0;
        if v2 {
            x.push_str(&format!(
                "<NextContinuationToken>{}</NextContinuationToken>",
                hex_encode(last)
            ));
        } else {
            x.push_str(&format!("<NextMarker>{}</NextMarker>", enc(last)));
        }
    }
    for (name, is_prefix) in &entries {
        if *is_prefix {
            x.push_str(&format!(
                "<CommonPrefixes><Prefix>{}</Prefix></CommonPrefixes>",
                enc(name)
            ));
        } else {
            let data = &state.objects[name];
            x.push_str(&format!(
                "<Contents><Key>{}</Key><LastModified>{LAST_MODIFIED_ISO}</LastModified><ETag>{}</ETag><Size>{}</Size><StorageClass>STANDARD</StorageClass></Contents>",
                enc(name),
                xml_escape(&etag(data)),
                data.len()
            ));
        }
    }
    x.push_str("</ListBucketResult>");
    Response::xml(200, x)
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 3 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&String::from_utf8_lossy(&b[i + 1..i + 3]), 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_encode(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(s: &str) -> String {
    if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return s.to_owned();
    }
    let bytes: Vec<u8> = (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}
