# nooelint: oelint.var.bbclassextend
SUMMARY = "culvert gateway daemon: remote access to LAN devices through culvert-relay"
DESCRIPTION = "culvertd runs on a site gateway. It learns of tunnels over MQTT, connects out \
               to culvert-relay (or AWS IoT Secure Tunneling) and delivers each tunnel \
               connection to one LAN host by TOML rules: allow/deny networks, limits, an \
               audit trail, HTTP routing to device web UIs."
SECTION = "net"

require culvert.inc

CARGO_SRC_DIR = "daemon"

# "http": HTTP routing by host and path (pingora). Without it culvertd is the minimal, tcp-only
# build for small gateways.
PACKAGECONFIG ??= "http"
PACKAGECONFIG[http] = ",,cmake-native"
CARGO_BUILD_FLAGS:append = " ${@bb.utils.contains('PACKAGECONFIG', 'http', '', '--no-default-features', d)}"

# A daemon with a system user and a unit: no native or SDK variant (no BBCLASSEXTEND).
inherit systemd useradd

USERADD_PACKAGES = "${PN}"
USERADD_PARAM:${PN} = "--system --no-create-home --home-dir /nonexistent --shell /sbin/nologin --user-group culvert"

SYSTEMD_SERVICE:${PN} = "culvertd.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/packaging/systemd/culvertd.service ${D}${systemd_system_unitdir}/
    install -d -m 0755 ${D}${sysconfdir}/culvert
    install -m 0640 -g culvert ${S}/config/culvertd.toml ${D}${sysconfdir}/culvert/culvertd.toml
}

CONFFILES:${PN} = "${sysconfdir}/culvert/culvertd.toml"
RDEPENDS:${PN} = "ca-certificates procps"
