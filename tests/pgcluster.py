"""
A throwaway PostgreSQL cluster for tests that need the real thing.

The account store runs on PostgreSQL in production, and SQLite stand-ins
hide exactly the differences that bite (types, locking, error codes), so
tests get a real server: Debian's binaries (tools/install-system-packages.sh
installs them), one cluster per test process, started on first use and
stopped at interpreter exit. It listens only on a unix socket in its own
temporary directory, so parallel test processes and any system cluster never
see each other. Each test asks L{freshDatabase} for an empty database of its
own.

If the binaries are missing this raises rather than skipping: a skipped
account-store test is a test that silently stopped running.
"""

import atexit
import glob
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
from urllib.parse import quote

import psycopg2
from psycopg2 import sql

_BINARIES_GLOB = "/usr/lib/postgresql/*/bin"
_SYSTEM_USER = "postgres"
# pg_ctl -w gives up after this many seconds; startup normally takes well
# under one, so reaching it means something is wrong, not slow.
_START_TIMEOUT = 60
# sun_path is 108 bytes; the socket is DIR/.s.PGSQL.NNNNN.
_MAX_SOCKET_DIR = 80

_lock = threading.Lock()
_cluster = None
_startError = None
_databaseCount = 0


class _Cluster:
    """
    A running cluster: where its socket is and whom to connect as.
    """

    def __init__(self, binDir, baseDir, dataDir, port, user, runAs):
        self.binDir = binDir
        self.baseDir = baseDir
        self.dataDir = dataDir
        self.port = port
        self.user = user
        self.runAs = runAs
        self.ownerPid = os.getpid()

    def dsn(self, dbname):
        """
        A libpq URI for C{dbname} over this cluster's unix socket.
        """
        return "postgresql://%s@/%s?host=%s&port=%d" % (
            quote(self.user, safe=""),
            quote(dbname, safe=""),
            quote(self.baseDir, safe="/"),
            self.port,
        )

    def stop(self):
        """
        Stop the server and remove its files; only the process that started
        it does, so a forked child exiting leaves the parent's cluster alone.
        """
        if os.getpid() != self.ownerPid:
            return
        pgCtl = os.path.join(self.binDir, "pg_ctl")
        try:
            _run(
                self.runAs + [pgCtl, "stop", "-D", self.dataDir, "-m", "immediate", "-w"],
                self.baseDir,
            )
        except RuntimeError:
            # Best effort at exit: nothing useful can be done with it now.
            pass
        shutil.rmtree(self.baseDir, ignore_errors=True)


def _versionKey(binDir):
    """
    Sort key for /usr/lib/postgresql/NN/bin so that 16 comes after 9.6.
    """
    version = os.path.basename(os.path.dirname(binDir))
    return tuple(int(part) if part.isdigit() else -1 for part in version.split("."))


def findBinaries():
    """
    The newest Debian PostgreSQL bin directory holding initdb and pg_ctl.

    @raise RuntimeError: none is installed.
    """
    candidates = [
        binDir
        for binDir in glob.glob(_BINARIES_GLOB)
        if all(
            os.access(os.path.join(binDir, name), os.X_OK)
            for name in ("initdb", "pg_ctl", "postgres")
        )
    ]
    if not candidates:
        raise RuntimeError(
            "PostgreSQL server binaries (initdb, pg_ctl) not found under %s; "
            "run tools/install-system-packages.sh as root (it installs Debian's "
            "postgresql package)" % (_BINARIES_GLOB,)
        )
    return max(candidates, key=_versionKey)


def _run(command, cwd):
    """
    Run C{command}, raising with its output if it fails: initdb's and
    pg_ctl's complaints are the only clue to what went wrong.
    """
    result = subprocess.run(
        command,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(
            "%s failed (exit status %d):\n%s"
            % (" ".join(command), result.returncode, result.stdout)
        )
    return result.stdout


def _traversableByOthers(path):
    """
    Whether every directory above C{path} lets other users through, so the
    postgres user can reach a directory we create there.
    """
    path = os.path.abspath(path)
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def _makeBaseDir(asRoot):
    """
    A private temporary directory for the data and the socket, somewhere
    the server's user can reach and short enough for a socket path.
    """
    parent = tempfile.gettempdir()
    if len(parent) > _MAX_SOCKET_DIR - 30 or (asRoot and not _traversableByOthers(parent)):
        parent = "/tmp"
    return tempfile.mkdtemp(prefix="privox-pg-", dir=parent)


def _freePort():
    """
    A port number for the socket's name (the server opens no TCP port, but
    libpq and postgres still name the socket after one).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _startCluster():
    """
    initdb and start a cluster in a new temporary directory.
    """
    binDir = findBinaries()
    asRoot = os.getuid() == 0
    if asRoot:
        # initdb and postgres refuse to run as root.
        try:
            account = pwd.getpwnam(_SYSTEM_USER)
        except KeyError:
            raise RuntimeError(
                "running as root but there is no %r user to run PostgreSQL as; "
                "run tools/install-system-packages.sh as root (Debian's "
                "postgresql package creates it)" % (_SYSTEM_USER,)
            )
        runAs = ["runuser", "-u", _SYSTEM_USER, "--"]
        user = _SYSTEM_USER
    else:
        runAs = []
        user = pwd.getpwuid(os.getuid()).pw_name

    baseDir = _makeBaseDir(asRoot)
    try:
        if asRoot:
            os.chown(baseDir, account.pw_uid, account.pw_gid)
        dataDir = os.path.join(baseDir, "data")
        port = _freePort()
        _run(
            runAs
            + [
                os.path.join(binDir, "initdb"),
                "-D", dataDir,
                "-U", user,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
            baseDir,
        )
        # In the config file rather than on pg_ctl's -o, which goes through a
        # shell and would need the empty listen_addresses quoted.
        with open(os.path.join(dataDir, "postgresql.conf"), "a") as conf:
            conf.write(
                "\n# tests/pgcluster.py: a private, disposable server\n"
                "listen_addresses = ''\n"
                "unix_socket_directories = '%s'\n"
                "port = %d\n"
                "fsync = off\n"
                "synchronous_commit = off\n"
                "full_page_writes = off\n" % (baseDir, port)
            )
        logFile = os.path.join(baseDir, "postgres.log")
        try:
            _run(
                runAs
                + [
                    os.path.join(binDir, "pg_ctl"),
                    "start",
                    "-D", dataDir,
                    "-l", logFile,
                    "-w",
                    "-t", str(_START_TIMEOUT),
                ],
                baseDir,
            )
        except RuntimeError as e:
            try:
                with open(logFile) as f:
                    log = f.read()
            except OSError:
                log = "(no server log)"
            raise RuntimeError("%s\nserver log:\n%s" % (e, log))
    except BaseException:
        shutil.rmtree(baseDir, ignore_errors=True)
        raise
    cluster = _Cluster(binDir, baseDir, dataDir, port, user, runAs)
    atexit.register(cluster.stop)
    return cluster


def cluster():
    """
    This process's cluster, started on first use. A failed start is
    remembered, so every later test fails at once with the same reason
    instead of trying again.
    """
    global _cluster, _startError
    with _lock:
        if _cluster is None:
            if _startError is not None:
                raise RuntimeError("PostgreSQL test cluster failed to start:\n%s" % (_startError,))
            try:
                _cluster = _startCluster()
            except RuntimeError as e:
                _startError = e
                raise
        return _cluster


def freshDatabase():
    """
    Create a new, empty database in this process's cluster.

    @return: a libpq URI DSN for it (C{psycopg2.connect(dsn)} accepts it).
    """
    global _databaseCount
    running = cluster()
    with _lock:
        _databaseCount += 1
        name = "privox_test_%d" % (_databaseCount,)
    connection = psycopg2.connect(running.dsn("postgres"))
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        connection.close()
    return running.dsn(name)
