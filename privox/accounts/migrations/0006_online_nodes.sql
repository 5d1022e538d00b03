-- The exchange's nodes online now, as the farms that joined it say each
-- time they register (privox.farm.observe.onlineNodes): by each node
-- identity's fingerprint and the key id its certificate names, its
-- connections to that farm. Only the account pages read it ("online now",
-- for a key's own nodes: the key id must match); the directory never names
-- a node.
-- Portable SQL: SQLite and PostgreSQL.

CREATE TABLE online_nodes (
    farm TEXT NOT NULL,                  -- the farm's name in the directory
    node TEXT NOT NULL,                  -- the identity key's fingerprint
    key_id TEXT NOT NULL,                -- the key its certificate names
    connections INTEGER NOT NULL,
    seen DOUBLE PRECISION NOT NULL,      -- when the farm last said so
    PRIMARY KEY (farm, node, key_id)
);

CREATE INDEX online_nodes_node ON online_nodes (node);
