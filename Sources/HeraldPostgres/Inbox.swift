import Herald
import Logging
import PostgresNIO

/// The inbox: which events a consumer has handled, kept in the consumer's own database. Recording an event and
/// making its effects in one transaction makes the effects exactly-once under at-least-once delivery: a repeated
/// delivery finds the record and does nothing; a transaction that rolls back takes the record with it, so the
/// redelivery does the work. Two deliveries of one event at once: the second waits on the first's row and then
/// finds it (or takes over if the first rolled back).
public struct Inbox: Sendable {
    /// Who handles the events (a service, or one handler of it); each consumer has its own record.
    public let consumer: String
    private let logger: Logger

    public init(consumer: String, logger: Logger = Logger(label: "herald.inbox")) {
        self.consumer = consumer
        self.logger = logger
    }

    /// Records `event` as handled by this consumer inside the caller's transaction. Returns false if it was handled
    /// before: skip the effects.
    public func receive(_ event: CloudEvent, on connection: PostgresConnection) async throws -> Bool {
        let rows = try await connection.query(
            """
            INSERT INTO herald_inbox (consumer, source, id) VALUES (\(consumer), \(event.source), \(event.id.description))
            ON CONFLICT DO NOTHING RETURNING 1
            """, logger: logger)
        for try await _ in rows { return true }
        return false
    }

    /// Runs `effects` for `event` once: in one transaction with the inbox record. Returns nil (running nothing) for
    /// an event this consumer has handled. An error from `effects` rolls everything back and is rethrown, so the
    /// delivery is retried.
    public func process<Result: Sendable>(
        _ event: CloudEvent, in client: PostgresClient,
        _ effects: (PostgresConnection) async throws -> Result
    ) async throws -> Result? {
        try await client.withConnection { connection in
            try await connection.query("BEGIN", logger: logger)
            do {
                guard try await receive(event, on: connection) else {
                    try await connection.query("ROLLBACK", logger: logger)
                    return nil
                }
                let result = try await effects(connection)
                try await connection.query("COMMIT", logger: logger)
                return result
            } catch {
                _ = try? await connection.query("ROLLBACK", logger: logger)
                throw error
            }
        }
    }

    /// Whether this consumer has handled `event` (committed).
    public func contains(_ event: CloudEvent, in client: PostgresClient) async throws -> Bool {
        let rows = try await client.query(
            """
            SELECT 1 FROM herald_inbox WHERE consumer = \(consumer) AND source = \(event.source)
            AND id = \(event.id.description)
            """, logger: logger)
        for try await _ in rows { return true }
        return false
    }

    /// Forgets records older than `age` (deliveries older than that are no longer expected twice).
    public func purge(olderThan age: Duration, in client: PostgresClient) async throws {
        let seconds = Double(age.components.seconds)
        try await client.query(
            """
            DELETE FROM herald_inbox WHERE consumer = \(consumer)
            AND received_at < now() - make_interval(secs => \(seconds))
            """, logger: logger)
    }
}
