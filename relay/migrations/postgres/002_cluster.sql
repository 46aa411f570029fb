-- culvert-relay as a cluster (relay/src/cluster.rs): the nodes that serve, and on which node
-- each side of a tunnel is attached. Both are leases: a node renews its rows every few
-- seconds, and rows past `until_ms` (a node that died) count for nothing.
CREATE TABLE nodes (
    name text PRIMARY KEY,
    -- host:port where the other nodes reach its node link (mTLS).
    addr text NOT NULL,
    until_ms bigint NOT NULL
);
CREATE TABLE peers (
    tunnel text NOT NULL,
    mode text NOT NULL,
    node text NOT NULL,
    -- When this node took the side: of two nodes holding one tunnel, the earlier keeps it.
    since_ms bigint NOT NULL,
    until_ms bigint NOT NULL,
    PRIMARY KEY (tunnel, mode)
);
CREATE INDEX peers_by_node ON peers (node);
