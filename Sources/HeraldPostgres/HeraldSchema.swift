import Logging
import PostgresNIO

/// Herald's tables. `migrate` creates what is missing (idempotent; concurrent callers wait for each other).
///
/// - `herald_outbox`: events written in a business transaction, waiting for the relay. `slot` spreads aggregates
///   over `Outbox.slots` relay slots; `published_at` is set once the transport acknowledged the event; `rejected`
///   holds the reason when the transport refused the event for good (kept, not published).
/// - `herald_inbox`: which consumer has handled which event (source, id) — its effects happen once.
/// - `herald_sagas`: saga instances with their version (optimistic concurrency) and deadline.
public enum HeraldSchema {
    static let statements: [String] = [
        """
        CREATE TABLE IF NOT EXISTS herald_outbox (
            id bigserial PRIMARY KEY,
            topic text NOT NULL,
            aggregate text NOT NULL,
            slot int4 NOT NULL,
            event jsonb NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            published_at timestamptz,
            rejected text
        )
        """,
        """
        CREATE INDEX IF NOT EXISTS herald_outbox_pending ON herald_outbox (id)
            WHERE published_at IS NULL AND rejected IS NULL
        """,
        """
        CREATE INDEX IF NOT EXISTS herald_outbox_published ON herald_outbox (published_at)
            WHERE published_at IS NOT NULL
        """,
        """
        CREATE TABLE IF NOT EXISTS herald_inbox (
            consumer text NOT NULL,
            source text NOT NULL,
            id text NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (consumer, source, id)
        )
        """,
        """
        CREATE TABLE IF NOT EXISTS herald_sagas (
            saga text NOT NULL,
            id text NOT NULL,
            state bytea NOT NULL,
            version int8 NOT NULL,
            deadline int8,
            finished bool NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (saga, id)
        )
        """,
        """
        CREATE INDEX IF NOT EXISTS herald_sagas_due ON herald_sagas (saga, deadline)
            WHERE NOT finished AND deadline IS NOT NULL
        """,
    ]

    /// The advisory lock (`pg_advisory_xact_lock(migrationLock, 0)`) that makes concurrent migrations wait.
    static let migrationLock: Int32 = 0x4845_0000

    /// Creates Herald's tables and indexes where missing.
    public static func migrate(_ client: PostgresClient, logger: Logger = Logger(label: "herald.postgres")) async throws
    {
        try await client.withTransaction(logger: logger) { connection in
            try await connection.query("SELECT pg_advisory_xact_lock(\(migrationLock), 0)", logger: logger)
            for statement in statements {
                try await connection.query(PostgresQuery(unsafeSQL: statement), logger: logger)
            }
        }
    }
}
