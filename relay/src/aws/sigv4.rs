//! AWS Signature Version 4, checked on the server side: the `Authorization` header of a request
//! to the AWS control API ([`super`]) is recomputed from the request as it arrived and the
//! secret of the access key it names, and compared in constant time.
//!
//! Written here rather than taken from a crate: the signing crates (aws-sigv4) only sign, and the
//! one verifying crate (scratchstack-aws-signature) brings a second HTTP and date stack for what
//! is two hundred lines over `ring`, which the relay already has. The tests pin it to AWS's
//! published test-suite vectors; the end-to-end tests to what botocore really sends.

use ring::{digest, hmac};

/// The one algorithm SigV4 header authentication names.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// What an `Authorization: AWS4-HMAC-SHA256 Credential=…, SignedHeaders=…, Signature=…` header
/// says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authorization {
    pub access_key_id: String,
    /// `YYYYMMDD` of the credential scope.
    pub date: String,
    pub region: String,
    pub service: String,
    /// Lower-case header names, in the order given (they must be sorted).
    pub signed_headers: Vec<String>,
    /// 64 lower-case hex digits.
    pub signature: String,
}

/// Why a header is not a SigV4 `Authorization`, in AWS's words where AWS has them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

impl Authorization {
    pub fn parse(header: &str) -> Result<Authorization, Malformed> {
        let rest = header
            .strip_prefix(ALGORITHM)
            .filter(|r| r.starts_with(' '))
            .ok_or_else(|| {
                Malformed(format!(
                    "Authorization header requires the {ALGORITHM} algorithm (SigV4 header signing)"
                ))
            })?;
        let (mut credential, mut signed, mut signature) = (None, None, None);
        for part in rest.split(',') {
            let part = part.trim();
            let (k, v) = part.split_once('=').ok_or_else(|| {
                Malformed(format!(
                    "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' parameters; {part:?} is none of them"
                ))
            })?;
            let slot = match k {
                "Credential" => &mut credential,
                "SignedHeaders" => &mut signed,
                "Signature" => &mut signature,
                _ => {
                    return Err(Malformed(format!(
                        "Authorization header has an unknown parameter {k:?}"
                    )));
                }
            };
            if slot.replace(v).is_some() {
                return Err(Malformed(format!("Authorization header gives {k} twice")));
            }
        }
        let missing = |what: &str| {
            Malformed(format!(
                "Authorization header requires '{what}' parameter. Authorization={header}"
            ))
        };
        let credential = credential.ok_or_else(|| missing("Credential"))?;
        let signed = signed.ok_or_else(|| missing("SignedHeaders"))?;
        let signature = signature.ok_or_else(|| missing("Signature"))?;
        let scope: Vec<&str> = credential.split('/').collect();
        let [key, date, region, service, terminator] = scope[..] else {
            return Err(Malformed(format!(
                "Credential should be scoped to a valid region, not {:?}: KEY/YYYYMMDD/REGION/SERVICE/aws4_request",
                credential
            )));
        };
        if key.is_empty()
            || date.len() != 8
            || !date.bytes().all(|b| b.is_ascii_digit())
            || region.is_empty()
            || service.is_empty()
            || terminator != "aws4_request"
        {
            return Err(Malformed(format!(
                "Credential {credential:?} is not KEY/YYYYMMDD/REGION/SERVICE/aws4_request"
            )));
        }
        let signed_headers: Vec<String> = signed.split(';').map(str::to_owned).collect();
        if signed_headers.iter().any(String::is_empty)
            || signed_headers
                .iter()
                .any(|h| h.bytes().any(|b| b.is_ascii_uppercase()))
            || !signed_headers.windows(2).all(|w| w[0] < w[1])
        {
            return Err(Malformed(format!(
                "SignedHeaders {signed:?} must be lower-case header names, sorted, separated by ';'"
            )));
        }
        if signature.len() != 64
            || !signature
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(Malformed(
                "Signature must be 64 lower-case hex digits".into(),
            ));
        }
        Ok(Authorization {
            access_key_id: key.to_owned(),
            date: date.to_owned(),
            region: region.to_owned(),
            service: service.to_owned(),
            signed_headers,
            signature: signature.to_owned(),
        })
    }

    /// `YYYYMMDD/REGION/SERVICE/aws4_request`.
    pub fn scope(&self) -> String {
        format!(
            "{}/{}/{}/aws4_request",
            self.date, self.region, self.service
        )
    }
}

/// The request as it arrived, as SigV4 sees it.
pub struct Request<'a> {
    pub method: &'a str,
    /// The path as sent (still percent-encoded).
    pub path: &'a str,
    /// The query string as sent, without `?`.
    pub query: &'a str,
    /// Every header, names in any case, in the order received.
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, data).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// RFC 3986 percent-encoding of everything but the unreserved characters (and `/` if asked):
/// SigV4's `UriEncode`.
fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decode `%XX` escapes (and `+` stays `+`: SigV4 query strings are not forms).
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// The canonical URI of every service but S3: the path with `.` and `..` segments and empty
/// segments resolved, then encoded once more (so an encoded `%2F` signs as `%252F`), as botocore
/// and the AWS SDKs compute it.
fn canonical_uri(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut normalized = format!("/{}", segments.join("/"));
    if path.ends_with('/') && normalized != "/" {
        normalized.push('/');
    }
    uri_encode(&normalized, true)
}

/// Query parameters decoded, re-encoded, sorted by name then value.
fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                uri_encode(&percent_decode(k), false),
                uri_encode(&percent_decode(v), false),
            )
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// A header value trimmed, its runs of spaces folded to one.
fn canonical_value(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The canonical request, or the signed header that the request does not carry.
pub fn canonical_request(req: &Request, auth: &Authorization) -> Result<String, String> {
    let mut headers = String::new();
    for name in &auth.signed_headers {
        let values: Vec<String> = req
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| canonical_value(v))
            .collect();
        if values.is_empty() {
            return Err(name.clone());
        }
        headers.push_str(&format!("{name}:{}\n", values.join(",")));
    }
    Ok(format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method,
        canonical_uri(req.path),
        canonical_query(req.query),
        headers,
        auth.signed_headers.join(";"),
        sha256_hex(req.body)
    ))
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> hmac::Tag {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
}

/// The signing key of a secret for one day, region and service.
pub fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> [u8; 32] {
    let k = hmac_sha256(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k = hmac_sha256(k.as_ref(), region.as_bytes());
    let k = hmac_sha256(k.as_ref(), service.as_bytes());
    let k = hmac_sha256(k.as_ref(), b"aws4_request");
    let mut out = [0u8; 32];
    out.copy_from_slice(k.as_ref());
    out
}

/// The signature `secret` gives the request at `amz_date` (`YYYYMMDDTHHMMSSZ`).
pub fn signature(
    canonical_request: &str,
    auth: &Authorization,
    amz_date: &str,
    secret: &str,
) -> String {
    let to_sign = format!(
        "{ALGORITHM}\n{amz_date}\n{}\n{}",
        auth.scope(),
        sha256_hex(canonical_request.as_bytes())
    );
    let key = signing_key(secret, &auth.date, &auth.region, &auth.service);
    hex(hmac_sha256(&key, to_sign.as_bytes()).as_ref())
}

/// Whether the request carries the signature `secret` gives it, compared in constant time.
pub fn matches(
    canonical_request: &str,
    auth: &Authorization,
    amz_date: &str,
    secret: &str,
) -> bool {
    let expected = signature(canonical_request, auth, amz_date, secret);
    subtle::ConstantTimeEq::ct_eq(expected.as_bytes(), auth.signature.as_bytes()).into()
}

/// `YYYYMMDDTHHMMSSZ` → Unix seconds.
pub fn parse_amz_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let month = time::Month::try_from(u8::try_from(num(4..6)?).ok()?).ok()?;
    let date = time::Date::from_calendar_date(
        i32::try_from(num(0..4)?).ok()?,
        month,
        u8::try_from(num(6..8)?).ok()?,
    )
    .ok()?;
    let t = time::Time::from_hms(
        u8::try_from(num(9..11)?).ok()?,
        u8::try_from(num(11..13)?).ok()?,
        u8::try_from(num(13..15)?).ok()?,
    )
    .ok()?;
    Some(
        time::PrimitiveDateTime::new(date, t)
            .assume_utc()
            .unix_timestamp(),
    )
}

/// Unix seconds → `YYYYMMDDTHHMMSSZ`.
pub fn format_amz_date(secs: i64) -> String {
    let t =
        time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // AWS's SigV4 test suite (aws-sig-v4-test-suite, as published with the SigV4 documentation):
    // credentials, date, region and service of every case.
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    const DATE: &str = "20150830T123600Z";

    fn auth(signed: &str, signature: &str) -> Authorization {
        Authorization::parse(&format!(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders={signed}, Signature={signature}"
        ))
        .unwrap()
    }

    fn headers() -> Vec<(String, String)> {
        vec![
            ("Host".into(), "example.amazonaws.com".into()),
            ("X-Amz-Date".into(), DATE.into()),
        ]
    }

    fn check(method: &str, path: &str, query: &str, expected: &str) {
        let h = headers();
        let req = Request {
            method,
            path,
            query,
            headers: &h,
            body: b"",
        };
        let a = auth("host;x-amz-date", expected);
        let creq = canonical_request(&req, &a).unwrap();
        assert_eq!(
            signature(&creq, &a, DATE, SECRET),
            expected,
            "{method} {path}?{query}"
        );
        assert!(matches(&creq, &a, DATE, SECRET));
        assert!(!matches(
            &creq,
            &a,
            DATE,
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEz"
        ));
    }

    #[test]
    fn the_published_test_suite_vectors_verify() {
        // get-vanilla
        check(
            "GET",
            "/",
            "",
            "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
        );
        // get-vanilla-query-order-key-case: the query is sorted before signing.
        check(
            "GET",
            "/",
            "Param2=value2&Param1=value1",
            "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
        );
        // post-vanilla
        check(
            "POST",
            "/",
            "",
            "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b",
        );
        // The suite's derived signing key for this scope.
        assert_eq!(
            hex(&signing_key(SECRET, "20150830", "us-east-1", "service")),
            "938127b5336810ddb6a5d6af445fcac9e371f9ed418ed386b022aed82901be75"
        );
    }

    #[test]
    fn get_vanilla_canonical_request_is_the_published_one() {
        let h = headers();
        let req = Request {
            method: "GET",
            path: "/",
            query: "",
            headers: &h,
            body: b"",
        };
        let a = auth("host;x-amz-date", &"0".repeat(64));
        assert_eq!(
            canonical_request(&req, &a).unwrap(),
            "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn a_signed_header_the_request_lacks_is_named() {
        let h = headers();
        let req = Request {
            method: "GET",
            path: "/",
            query: "",
            headers: &h,
            body: b"",
        };
        let a = auth("host;x-amz-date;x-amz-target", &"0".repeat(64));
        assert_eq!(canonical_request(&req, &a), Err("x-amz-target".into()));
    }

    #[test]
    fn paths_are_normalised_and_encoded_as_botocore_does() {
        assert_eq!(canonical_uri("/"), "/");
        assert_eq!(canonical_uri(""), "/");
        assert_eq!(canonical_uri("/a/./b/../c/"), "/a/c/");
        assert_eq!(canonical_uri("//a//b"), "/a/b");
        assert_eq!(canonical_uri("/%E1%88%B4"), "/%25E1%2588%25B4");
        assert_eq!(canonical_query("b=2&a=1&A=0"), "A=0&a=1&b=2");
        assert_eq!(canonical_query("k=a%20b&e"), "e=&k=a%20b");
        assert_eq!(canonical_value("  a   b  "), "a b");
    }

    #[test]
    fn malformed_headers_are_refused_with_what_is_wrong() {
        for (h, says) in [
            ("Bearer x", "AWS4-HMAC-SHA256"),
            ("AWS4-HMAC-SHA256 Credential=a/b", "Credential"),
            (
                "AWS4-HMAC-SHA256 Credential=K/20150830/r/s/aws4_request, SignedHeaders=host",
                "Signature",
            ),
            (
                "AWS4-HMAC-SHA256 Credential=K/20150830/r/s/aws4_request, SignedHeaders=x-amz-date;host, Signature=00",
                "sorted",
            ),
            (
                "AWS4-HMAC-SHA256 Credential=K/20150830/r/s/aws4_request, SignedHeaders=host, Signature=zz",
                "hex",
            ),
            (
                "AWS4-HMAC-SHA256 Credential=K/2015/r/s/aws4_request, SignedHeaders=host, Signature=00",
                "YYYYMMDD",
            ),
            (
                "AWS4-HMAC-SHA256 Credential=K/20150830/r/s/aws4_request, Credential=x, SignedHeaders=host, Signature=00",
                "twice",
            ),
        ] {
            let e = Authorization::parse(h).unwrap_err();
            assert!(e.0.contains(says), "{h:?}: {e}");
        }
    }

    #[test]
    fn amz_dates_round_trip_and_nonsense_is_refused() {
        assert_eq!(parse_amz_date(DATE), Some(1_440_938_160));
        assert_eq!(format_amz_date(1_440_938_160), DATE);
        for bad in [
            "20150830T123600",
            "2015-08-30T12:36:00Z",
            "20151330T123600Z",
            "2015083xT123600Z",
            "",
        ] {
            assert_eq!(parse_amz_date(bad), None, "{bad:?}");
        }
    }
}
