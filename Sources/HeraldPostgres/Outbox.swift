import Herald
import Logging
import PostgresNIO

/// The transactional outbox: events written in the same transaction as the business rows they describe, so both
/// commit or neither does. `OutboxRelay` publishes them to a transport after the commit.
///
/// Order: events of one aggregate (the event's `partitionkey`, else its `subject`, else its id) are published in the
/// order their transactions committed. `append` takes a transaction-scoped lock per aggregate, so a second
/// transaction writing the same aggregate appends only after the first has committed (or rolled back): per
/// aggregate, row id order is commit order. The relay reads unpublished rows by state, not by an id high-water mark,
/// so a row whose transaction commits late is published late, never skipped (the sequence-gap problem).
///
/// Relays find new rows by polling (every `OutboxRelay.Configuration.pollInterval`, 25 ms by default) or at once when
/// `append` is asked to notify them.
public enum Outbox {
    /// Aggregates are spread over this many relay slots; each slot is published by one relay at a time.
    public static let slots = 16
    /// The first key of Herald's advisory locks on this outbox (the aggregate locks `append` takes and the slot
    /// locks relays hold): the outbox table's object id, so outboxes in different schemas of one database do not
    /// share locks. Aggregate locks are transaction-scoped and slot locks session-scoped: they never meet.
    static let lockNamespace = "'herald_outbox'::regclass::oid::int4"
    /// The channel `append(…, notify: true)` notifies (on commit) so relays wake at once.
    static let channel = "herald_outbox"

    /// The key that orders an event among its aggregate's events.
    public static func aggregate(of event: CloudEvent) -> String {
        event.partitionkey ?? event.subject ?? event.id.description
    }

    /// The relay slot of an aggregate.
    public static func slot(of aggregate: String) -> Int {
        Int(PartitionHash.fnv1a(aggregate) % UInt64(slots))
    }

    /// Appends events for `topic` inside the caller's transaction (`connection` must be in one: use
    /// `PostgresClient.withTransaction`), in one statement. Validates every event first; an invalid one throws
    /// `CloudEventError` and nothing is written. Append all of a transaction's events in one call where possible:
    /// the aggregate locks are taken in a fixed order within a call, so two transactions cannot deadlock on them.
    /// - Parameter notify: also `NOTIFY` the relays, which then publish at once instead of on their next poll
    ///   (commit → published p50 about 2.5 ms instead of 16 ms in `herald bench outbox`). A notification serializes
    ///   the commits of every notifying transaction in the database (PostgreSQL holds its queue lock through the
    ///   commit), which costs concurrent writers throughput (0.54× plain transactions instead of 0.61× there).
    public static func append(
        _ events: [CloudEvent], to topic: String, on connection: PostgresConnection, notify: Bool = false,
        logger: Logger = Logger(label: "herald.outbox")
    ) async throws {
        guard !events.isEmpty else { return }
        guard !topic.isEmpty else { throw TransportError(.invalidRequest, "the outbox needs a topic") }
        var rows: [(aggregate: String, slot: Int32, body: String)] = []
        rows.reserveCapacity(events.count)
        for event in events {
            try event.validate()
            let aggregate = aggregate(of: event)
            rows.append(
                (
                    aggregate, Int32(slot(of: aggregate)),
                    String(decoding: try CloudEventJSON.encode(event), as: UTF8.self)
                ))
        }
        let locks = Set(rows.map { Int32(truncatingIfNeeded: PartitionHash.fnv1a($0.aggregate)) }).sorted()
        // One statement: the rows join the one-row lock subquery, so every aggregate lock (taken in key order) is
        // held before the first row is inserted and draws its id; the rows are inserted in the order given.
        var binds = PostgresBindings(capacity: 1 + locks.count + 3 * rows.count)
        binds.append(topic)
        var sql =
            "INSERT INTO herald_outbox (topic, aggregate, slot, event) SELECT v.t, v.a, v.s, v.e::jsonb FROM (SELECT "
        for (index, lock) in locks.enumerated() {
            binds.append(lock)
            sql += (index == 0 ? "" : ", ") + "pg_advisory_xact_lock(\(lockNamespace), $\(binds.count)::int4)"
        }
        if notify { sql += ", pg_notify('\(channel)', '')" }
        sql += ") AS locked, (VALUES "
        for (index, row) in rows.enumerated() {
            binds.append(row.aggregate)
            binds.append(row.slot)
            binds.append(row.body)
            let n = binds.count
            sql += (index == 0 ? "" : ", ") + "($1::text, $\(n - 2)::text, $\(n - 1)::int4, $\(n)::text)"
        }
        sql += ") AS v(t, a, s, e)"
        try await connection.query(PostgresQuery(unsafeSQL: sql, binds: binds), logger: logger)
    }

    /// Events not yet published (nor rejected).
    public static func pendingCount(_ client: PostgresClient, logger: Logger = Logger(label: "herald.outbox"))
        async throws -> Int
    {
        let rows = try await client.query(
            "SELECT count(*) FROM herald_outbox WHERE published_at IS NULL AND rejected IS NULL", logger: logger)
        for try await count in rows.decode(Int64.self) { return Int(count) }
        return 0
    }
}
