//! The SigV4 verifier of the relay's AWS API on arbitrary input: an `Authorization` header,
//! the request it claims to sign and an `X-Amz-Date`. Never a panic; a date that parses
//! formats back to itself; and a signature is only ever accepted when it is the one the
//! secret gives (checked by recomputing it).
#![no_main]

use arbitrary::Arbitrary;
use culvert_relay::aws::sigv4::{self, Authorization, Request};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    authorization: &'a str,
    method: &'a str,
    path: &'a str,
    query: &'a str,
    headers: Vec<(&'a str, &'a str)>,
    body: &'a [u8],
    amz_date: &'a str,
    secret: &'a str,
}

fuzz_target!(|i: Input| {
    if let Some(t) = sigv4::parse_amz_date(i.amz_date) {
        assert_eq!(sigv4::format_amz_date(t), i.amz_date);
    }
    let Ok(auth) = Authorization::parse(i.authorization) else {
        return;
    };
    assert_eq!(auth.signature.len(), 64);
    let headers: Vec<(String, String)> = i
        .headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let req = Request {
        method: i.method,
        path: i.path,
        query: i.query,
        headers: &headers,
        body: i.body,
    };
    if let Ok(creq) = sigv4::canonical_request(&req, &auth) {
        let expected = sigv4::signature(&creq, &auth, i.amz_date, i.secret);
        assert_eq!(
            sigv4::matches(&creq, &auth, i.amz_date, i.secret),
            expected == auth.signature
        );
    }
});
