-- culvert-relay's state in PostgreSQL: the same records and indexes as the embedded redb
-- store (relay/src/store/redb.rs), changed only inside SERIALIZABLE transactions
-- (relay/src/store/postgres.rs). Records are JSON text, as redb keeps them.
CREATE TABLE tunnels (
    id text PRIMARY KEY,
    rec text NOT NULL
);
-- Every current and recently rotated access token hash → its tunnel and side.
CREATE TABLE tokens (
    hash bytea PRIMARY KEY,
    ref text NOT NULL
);
-- A client token bound to an open tunnel.
CREATE TABLE client_tokens (
    hash bytea PRIMARY KEY,
    tunnel text NOT NULL
);
CREATE TABLE open_by_expiry (
    expires_ms bigint NOT NULL,
    id text NOT NULL,
    PRIMARY KEY (expires_ms, id)
);
CREATE TABLE closed_by_time (
    closed_ms bigint NOT NULL,
    id text NOT NULL,
    PRIMARY KEY (closed_ms, id)
);
CREATE TABLE devices (
    thing text PRIMARY KEY,
    rec text NOT NULL
);
CREATE TABLE operators (
    name text PRIMARY KEY,
    rec text NOT NULL
);
