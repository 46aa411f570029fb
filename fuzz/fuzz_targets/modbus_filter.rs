//! culvertd's read-only Modbus filter on arbitrary request streams and rules: never a panic;
//! framing never claims more than it holds or more than one ADU; a request that passes is a
//! read, for an allowed unit, within the allowed addresses; every refusal is answered with an
//! exception that names the request's transaction, unit and function.
#![no_main]

use arbitrary::Arbitrary;
use culvertd::modbus::{MAX_ADU, Policy, READ_FUNCTIONS, adu_len, exception};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    units: Vec<u8>,
    ranges: Vec<(u16, u16)>,
    stream: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let policy = Policy {
        units: input.units,
        ranges: input.ranges.into_iter().filter(|(a, b)| a <= b).collect(),
    };
    let mut rest = &input.stream[..];
    while let Ok(Some(n)) = adu_len(rest) {
        assert!(n <= rest.len() && n <= MAX_ADU && n >= 8, "{n}");
        let adu = &rest[..n];
        match policy.check(adu) {
            Ok(()) => {
                let (unit, fc) = (adu[6], adu[7]);
                assert!(READ_FUNCTIONS.contains(&fc), "{fc}");
                assert!(policy.units.is_empty() || policy.units.contains(&unit));
                if matches!(fc, 1..=4) && !policy.ranges.is_empty() {
                    let start = u16::from_be_bytes([adu[8], adu[9]]);
                    let count = u16::from_be_bytes([adu[10], adu[11]]);
                    let end = start as u32 + count as u32 - 1;
                    assert!(
                        policy
                            .ranges
                            .iter()
                            .any(|&(lo, hi)| lo <= start && end <= hi as u32)
                    );
                }
            }
            Err(r) => {
                let e = exception(adu, r.code);
                assert_eq!(&e[..2], &adu[..2]);
                assert_eq!(e[6], adu[6]);
                assert_eq!(e[7], adu[7] | 0x80);
                assert!(!r.why.is_empty());
            }
        }
        rest = &rest[n..];
    }
});
