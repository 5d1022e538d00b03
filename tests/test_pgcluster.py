"""
Tests for L{tests.pgcluster}: the account-store tests rely on it handing out
working, independent databases on a real PostgreSQL.
"""

import psycopg2
from twisted.trial.unittest import SynchronousTestCase

from tests import pgcluster


def _query(dsn, statement):
    """
    Run one statement on C{dsn} and return all its rows (none for DDL).
    """
    connection = psycopg2.connect(dsn)
    try:
        with connection:
            with connection.cursor() as cursor:
                cursor.execute(statement)
                return cursor.fetchall() if cursor.description else []
    finally:
        connection.close()


class FreshDatabaseTests(SynchronousTestCase):
    """
    L{pgcluster.freshDatabase}.
    """

    def test_realPostgres(self):
        """
        The DSN connects with psycopg2 to an actual PostgreSQL server.
        """
        [(version,)] = _query(pgcluster.freshDatabase(), "SELECT version()")
        self.assertTrue(version.startswith("PostgreSQL "), version)

    def test_independent(self):
        """
        Two fresh databases share nothing: a table made in one is not in the
        other, so tests cannot leak state into each other.
        """
        first = pgcluster.freshDatabase()
        second = pgcluster.freshDatabase()
        self.assertNotEqual(first, second)
        _query(first, "CREATE TABLE accounts (id integer PRIMARY KEY)")
        _query(first, "INSERT INTO accounts VALUES (1)")
        self.assertEqual(_query(first, "SELECT id FROM accounts"), [(1,)])
        self.assertEqual(
            _query(second, "SELECT to_regclass('accounts')"),
            [(None,)],
        )

    def test_fresh(self):
        """
        A fresh database has no tables of ours in it.
        """
        rows = _query(
            pgcluster.freshDatabase(),
            "SELECT count(*) FROM information_schema.tables"
            " WHERE table_schema = 'public'",
        )
        self.assertEqual(rows, [(0,)])
