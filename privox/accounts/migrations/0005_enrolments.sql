-- The nodes enrolled under each key (POST /v1/enroll), for the key's own
-- account page. A node is its identity key's fingerprint (a public key:
-- no secret); it renews its certificate at half its life.
-- Portable SQL: SQLite and PostgreSQL.

CREATE TABLE enrolments (
    node TEXT PRIMARY KEY,               -- the identity key's fingerprint
    key_id TEXT NOT NULL,                -- the key it enrolled with
    first DOUBLE PRECISION NOT NULL,     -- when it first enrolled
    last DOUBLE PRECISION NOT NULL,      -- its latest certificate
    expires DOUBLE PRECISION NOT NULL    -- when that one expires
);

CREATE INDEX enrolments_key_id ON enrolments (key_id);
