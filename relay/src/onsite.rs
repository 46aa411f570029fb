//! On-site approval reports: a site that approves each tunnel on site (culvertd `[consent]
//! approve_tunnels`) says where each tunnel stands — waiting, approved (by whom), refused (by
//! whom, why) — by publishing on its thing's [`culvert_protocol::on_site_topic`] through the
//! embedded broker, which lets a device publish there and nowhere else. The relay keeps the
//! state with the tunnel (describe shows it, `culvert ssh` waits on it), audits every change,
//! and closes a refused tunnel.
//!
//! The broker authenticated the device, so a report speaks for that thing's tunnels only; one
//! that names another thing's tunnel, or is malformed, is answered with nothing but a log line
//! (a device gets no oracle for tunnel ids).

use serde::Deserialize;
use tracing::{info, warn};

use crate::audit::Audit;
use crate::registry::{Registry, now_ms};
use crate::store::{OnSite, OnSiteState};

/// Largest report accepted (a tunnel id, a state and two short texts).
pub const MAX_REPORT: usize = 4096;
/// Longest `by` or `detail` kept.
const MAX_TEXT: usize = 256;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Report {
    tunnel_id: String,
    state: OnSiteState,
    #[serde(default)]
    by: Option<String>,
    #[serde(default)]
    detail: Option<String>,
}

/// Text from a device, made safe to store and show (at most [`MAX_TEXT`] bytes); None when
/// nothing is left.
fn tidy(s: Option<String>) -> Option<String> {
    Some(culvert_protocol::tidy_text(&s?, MAX_TEXT)).filter(|s| !s.is_empty())
}

/// Apply one report published by `thing`'s authenticated gateway.
pub async fn report(registry: &Registry, audit: &Audit, thing: &str, payload: &[u8]) {
    if payload.len() > MAX_REPORT {
        warn!(%thing, bytes = payload.len(), "on-site report over {MAX_REPORT} bytes ignored");
        return;
    }
    let r: Report = match serde_json::from_slice(payload) {
        Ok(r) => r,
        Err(e) => {
            warn!(%thing, error = %e, "malformed on-site report ignored");
            return;
        }
    };
    let on_site = OnSite {
        state: r.state,
        at_ms: now_ms(),
        by: tidy(r.by),
        detail: tidy(r.detail),
    };
    let tunnel = tidy(Some(r.tunnel_id)).unwrap_or_default();
    match registry.set_on_site(thing, &tunnel, on_site.clone()).await {
        Ok(false) => {}
        Ok(true) => {
            info!(%thing, %tunnel, state = ?on_site.state, by = ?on_site.by, "on-site approval");
            audit.record(
                "on_site",
                serde_json::json!({
                    "tunnel": tunnel,
                    "thing": thing,
                    "state": on_site.state,
                    "by": on_site.by,
                    "detail": on_site.detail,
                }),
            );
        }
        Err(e) => warn!(%thing, %tunnel, error = %e, "on-site report not applied"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_text_is_made_safe_and_bounded() {
        assert_eq!(tidy(Some("  ".into())), None);
        assert_eq!(
            tidy(Some("shift\nlead\u{202E}".into())).unwrap(),
            "shift?lead?"
        );
        assert!(tidy(Some("é".repeat(500))).unwrap().len() <= MAX_TEXT);
    }
}
