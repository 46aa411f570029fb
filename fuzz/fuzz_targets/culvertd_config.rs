//! culvertd's configuration loader on arbitrary text: never a panic; a broken file is a list of
//! problems, each naming its key (and its line when there is one).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    // Keys naming files are read: keep the fuzzer off devices and kernel files.
    if ["/dev", "/proc", "/sys"].iter().any(|d| text.contains(d)) {
        return;
    }
    if let Err(problems) = culvertd::config::parse(text, std::path::Path::new("/nonexistent")) {
        assert!(!problems.is_empty());
        for p in problems {
            assert!(!p.key.is_empty() || !p.message.is_empty(), "{p:?}");
        }
    }
});
