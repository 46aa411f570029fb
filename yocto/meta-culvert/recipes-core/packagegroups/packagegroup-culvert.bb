SUMMARY = "culvert: the gateway daemon and the operator CLI"
DESCRIPTION = "Everything a gateway image needs to be reached through culvert: culvertd and \
               the culvert CLI."
HOMEPAGE = "https://example.invalid/culvert"
BUGTRACKER = "https://example.invalid/culvert/issues"
SECTION = "net"
LICENSE = "Apache-2.0"

inherit packagegroup

RDEPENDS:${PN} = "culvert-cli culvertd"
