-- Keys (as SHA-256 hashes, never the keys), usage in the rolling window, and
-- the farms' transaction records. Portable SQL: SQLite and PostgreSQL.

CREATE TABLE accounts (
    account TEXT PRIMARY KEY,            -- sha256 hex of the key; 'anonymous'
    key_id TEXT NOT NULL,                -- its first 12 hex digits, for people
    role TEXT NOT NULL,                  -- 'user', 'farm' or 'anonymous'
    label TEXT NOT NULL DEFAULT '',
    hourly_seconds DOUBLE PRECISION,     -- NULL: the API's default
    created DOUBLE PRECISION NOT NULL,
    revoked DOUBLE PRECISION             -- NULL while the key is good
);

CREATE INDEX accounts_key_id ON accounts (key_id);

-- The shared bucket for requests without a key (when the API allows them).
INSERT INTO accounts (account, key_id, role, label, created)
    VALUES ('anonymous', 'anonymous', 'anonymous', 'requests without a key', 0);

-- Audio seconds charged to an account: held when a request starts, settled
-- to what it really used when it ends, removed if it failed.
CREATE TABLE usage (
    id TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    seconds DOUBLE PRECISION NOT NULL
);

CREATE INDEX usage_account_at ON usage (account, at);

-- One record per job a farm ran, idempotent by (farm, job id). No content.
CREATE TABLE transactions (
    farm_account TEXT NOT NULL,          -- the farm key that posted it
    job_id TEXT NOT NULL,
    farm TEXT NOT NULL,                  -- the name the farm gives itself
    at DOUBLE PRECISION NOT NULL,        -- when the job ended (farm's clock)
    service TEXT NOT NULL,
    model TEXT NOT NULL,
    input_bytes BIGINT NOT NULL,
    output_bytes BIGINT NOT NULL,
    audio_seconds DOUBLE PRECISION,
    processing_ms DOUBLE PRECISION NOT NULL,
    status TEXT NOT NULL,
    producer TEXT,                       -- account id of the producer's key
    consumer TEXT,                       -- account id of the consumer's key
    qss DOUBLE PRECISION NOT NULL,       -- what the producer earned
    credited DOUBLE PRECISION NOT NULL,  -- when the API recorded it
    PRIMARY KEY (farm_account, job_id)
);

CREATE INDEX transactions_producer_credited ON transactions (producer, credited);
