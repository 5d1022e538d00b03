-- Quota checks that cost the same whatever a key's history: use and credit
-- as running sums per account and minute (privox.accounts.quota.BUCKET), and
-- the seconds held by requests in flight as rows that expire with them (so a
-- crashed API's holds free themselves). Portable SQL: SQLite and PostgreSQL.

CREATE TABLE quota_buckets (
    account TEXT NOT NULL,
    bucket BIGINT NOT NULL,              -- floor(time / 60)
    used DOUBLE PRECISION NOT NULL DEFAULT 0,
    earned DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (account, bucket)
);

CREATE TABLE holds (
    id TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,        -- when the request was admitted
    seconds DOUBLE PRECISION NOT NULL,   -- what it holds while it runs
    expires DOUBLE PRECISION NOT NULL    -- when it stops counting, settled or not
);

CREATE INDEX holds_account_expires ON holds (account, expires);

-- Usage rows become minute sums (floor written so that SQLite, whose CAST
-- truncates, and PostgreSQL, whose CAST rounds, agree).
INSERT INTO quota_buckets (account, bucket, used, earned)
    SELECT account, b, SUM(seconds), 0 FROM (
        SELECT account, seconds,
            CAST(at / 60 AS BIGINT) - CASE WHEN CAST(at / 60 AS BIGINT) > at / 60 THEN 1 ELSE 0 END AS b
        FROM usage
    ) AS u WHERE 1 = 1 GROUP BY account, b;

-- Credit already recorded in the ledger, summed by the minute it was credited.
INSERT INTO quota_buckets (account, bucket, used, earned)
    SELECT producer, b, 0, SUM(qss) FROM (
        SELECT producer, qss,
            CAST(credited / 60 AS BIGINT)
                - CASE WHEN CAST(credited / 60 AS BIGINT) > credited / 60 THEN 1 ELSE 0 END AS b
        FROM transactions WHERE qss > 0 AND producer IS NOT NULL
    ) AS t WHERE 1 = 1 GROUP BY producer, b
    ON CONFLICT (account, bucket) DO UPDATE SET earned = quota_buckets.earned + excluded.earned;

DROP TABLE usage;
