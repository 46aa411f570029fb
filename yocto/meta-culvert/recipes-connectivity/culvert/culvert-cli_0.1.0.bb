SUMMARY = "culvert operator CLI: tunnel management and the local proxy"
DESCRIPTION = "culvert opens, lists, describes, closes tunnels and rotates their tokens on \
               culvert-relay or AWS IoT Secure Tunneling, and runs the local proxy that \
               makes a machine behind a tunnel reachable on a local port."
SECTION = "net"

require culvert.inc

CARGO_SRC_DIR = "cli"

# The CLI is also useful on the build host and in SDKs.
BBCLASSEXTEND = "native nativesdk"
