//! MQTT topic names: a thing's notify topic from the configured template, and the names the
//! embedded broker stores `$` topics under (rumqttd refuses topics starting with `$`, which
//! AWS's `$aws/things/<thing>/tunnels/notify` does).

use bytes::Bytes;

/// The notify topic of a thing.
pub fn topic_for(template: &str, thing: &str) -> String {
    template.replace("{thing}", thing)
}

/// Inside rumqttd, `$…` topics carry this prefix instead of the `$`.
const DOLLAR: &str = "culvert-dollar/";

/// The name rumqttd stores a topic under.
pub fn internal_topic(t: &str) -> String {
    match t.strip_prefix('$') {
        Some(rest) => format!("{DOLLAR}{rest}"),
        None => t.to_owned(),
    }
}

/// The name a device sees for a topic rumqttd stores.
pub fn external_topic(t: &[u8]) -> Bytes {
    match t.strip_prefix(DOLLAR.as_bytes()) {
        Some(rest) => [b"$", rest].concat().into(),
        None => Bytes::copy_from_slice(t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollar_topics_are_renamed_both_ways() {
        let t = "$aws/things/cell-7/tunnels/notify";
        let inside = internal_topic(t);
        assert_eq!(inside, "culvert-dollar/aws/things/cell-7/tunnels/notify");
        assert_eq!(&external_topic(inside.as_bytes())[..], t.as_bytes());
        assert_eq!(internal_topic("plain/topic"), "plain/topic");
        assert_eq!(&external_topic(b"plain/topic")[..], b"plain/topic");
    }
}
