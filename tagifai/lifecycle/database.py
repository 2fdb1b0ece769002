"""MLflow tracking straight into a database server (postgresql://...): checked before any
training, its tables created once however many flows start at the same moment; and the
redaction of passwords in such URIs before they reach a log or a results file."""

from __future__ import annotations

import urllib.parse

from mlflow.tracking import MlflowClient

from tagifai.errors import TrackingError


def redact(uri: str) -> str:
    """The URI with any password replaced by ***, safe for logs and result files
    (postgresql://user:secret@host/db -> postgresql://user:***@host/db)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")
DATABASE_TIMEOUT_S = 5
SCHEMA_LOCK_KEY = 0x7A6F  # any constant: the advisory lock's name, shared by every flow


def is_database(tracking_uri: str) -> bool:
    """A database server that MLflow tracks into directly (not through an mlflow server)."""
    return tracking_uri.split(":", 1)[0].split("+", 1)[0] in DATABASE_SCHEMES


def database_engine(tracking_uri: str):
    """An SQLAlchemy engine that gives up connecting after a few seconds (no pool kept)."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    scheme = tracking_uri.split(":", 1)[0].split("+", 1)[0]
    connect_args = {"connect_timeout": DATABASE_TIMEOUT_S} if scheme in ("postgresql", "mysql") else {}
    return sqlalchemy.create_engine(tracking_uri, connect_args=connect_args, poolclass=NullPool)


def check_database(tracking_uri: str) -> None:
    """Fail before any training when the database does not answer or refuses us."""
    try:
        engine = database_engine(tracking_uri)
        with engine.connect():
            pass
    except Exception as error:  # the driver's own error types (psycopg2, pymysql...) or a missing driver
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise TrackingError(
            f"MLflow database {redact(tracking_uri)} is not reachable ({redact(reason)}); check the host, port, "
            "user and database, and that the server runs (the password is read from the URI or PGPASSWORD)"
        ) from None


def prepare_database_store(tracking_uri: str) -> None:
    """Check a database store answers, then create MLflow's tables under a PostgreSQL advisory
    lock: two flows opening a brand-new database at once would both run the schema migration."""
    if not is_database(tracking_uri):
        return
    check_database(tracking_uri)
    if not tracking_uri.startswith("postgresql"):
        MlflowClient(tracking_uri).search_experiments(max_results=1)
        return
    import sqlalchemy

    with database_engine(tracking_uri).connect() as connection:
        connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        try:
            MlflowClient(tracking_uri).search_experiments(max_results=1)
        finally:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": SCHEMA_LOCK_KEY})
