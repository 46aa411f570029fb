//! culvertd's parser of tunnel notifications (MQTT payloads from the broker) on arbitrary
//! bytes: never a panic, and what it accepts is a destination notification whose services all
//! have rules.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn config() -> &'static culvertd::config::Config {
    static C: OnceLock<culvertd::config::Config> = OnceLock::new();
    C.get_or_init(|| {
        let text = "[acl]\nallow = [\"127.0.0.0/8\"]\n[services.SSH]\ntarget = \"127.0.0.1:22\"\n[services.HMI]\ntarget = \"127.0.0.1:80\"\n";
        culvertd::config::parse(text, std::path::Path::new("/")).expect("a valid configuration")
    })
}

fuzz_target!(|payload: &[u8]| {
    if let Ok(n) = culvertd::notify::validate(payload, config()) {
        assert!(!n.services.is_empty());
        assert!(n.services.iter().all(|s| config().services.contains_key(s)));
        assert!(!n.token.is_empty());
    }
});
