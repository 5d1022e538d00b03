-- The account pages (privox.api.accountpages) read the ledger by consumer
-- and over all accounts by time; producers are already indexed (0001).
-- Portable SQL: SQLite and PostgreSQL.

CREATE INDEX transactions_consumer_at ON transactions (consumer, at);

CREATE INDEX transactions_at ON transactions (at);
