//! culvert-relay's configuration on arbitrary text: parsing into the raw structure, and the
//! checks that need no file (listener limits, [daemon], [mqtt]): never a panic. (Loading the
//! TLS files and the API key file is left out: the fuzzer must not read the machine's files.)
#![no_main]

use culvert_relay::config::RawConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let Ok(raw) = toml::from_str::<RawConfig>(text) else {
        return;
    };
    let _ = raw.limits.listener();
    let _ = raw.daemon.validate();
    if raw.mqtt.broker.is_none() {
        let _ = raw.mqtt.validate(|p| p.to_owned());
    }
});
