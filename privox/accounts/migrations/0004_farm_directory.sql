-- Farms that joined the exchange by themselves (privox.api.farmdirectory),
-- shared by its API servers: whichever one a farm registers with lists it
-- here, and the others take it from here after probing it themselves.
-- No key: the key id of the farm key that registered it.
-- Portable SQL: SQLite and PostgreSQL.

CREATE TABLE farm_directory (
    name TEXT PRIMARY KEY,
    stt TEXT,                            -- client endpoint strings, or NULL
    tts TEXT,
    account TEXT NOT NULL,               -- the farm key's id
    seen DOUBLE PRECISION NOT NULL,      -- when it last registered, anywhere
    producers TEXT NOT NULL DEFAULT '{}' -- JSON: its producers per service and model then
);
