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
public enum Outbox {
    /// Aggregates are spread over this many relay slots; each slot is published by one relay at a time.
    public static let slots = 16
    /// The first key of Herald's advisory locks on this outbox (the aggregate locks `append` takes and the slot
    /// locks relays hold): the outbox table's object id, so outboxes in different schemas of one database do not
    /// share locks. Aggregate locks are transaction-scoped and slot locks session-scoped: they never meet.
    static let lockNamespace = "'herald_outbox'::regclass::oid::int4"
    /// The channel `append` notifies (on commit) so relays wake at once.
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
    /// `PostgresClient.withTransaction`). Validates every event first; an invalid one throws `CloudEventError` and
    /// nothing is written. Append all of a transaction's events in one call where possible: the aggregate locks are
    /// taken in a fixed order within a call, so two transactions cannot deadlock on them.
    public static func append(
        _ events: [CloudEvent], to topic: String, on connection: PostgresConnection,
        logger: Logger = Logger(label: "herald.outbox")
    ) async throws {
        guard !events.isEmpty else { return }
        guard !topic.isEmpty else { throw TransportError(.invalidRequest, "the outbox needs a topic") }
        var aggregates: [String] = []
        var slots: [Int32] = []
        var bodies: [String] = []
        aggregates.reserveCapacity(events.count)
        for event in events {
            try event.validate()
            let aggregate = aggregate(of: event)
            aggregates.append(aggregate)
            slots.append(Int32(slot(of: aggregate)))
            bodies.append(String(decoding: try CloudEventJSON.encode(event), as: UTF8.self))
        }
        let locks = Set(aggregates.map { Int32(truncatingIfNeeded: PartitionHash.fnv1a($0)) }).sorted()
        try await connection.query(
            """
            SELECT pg_advisory_xact_lock(\(unescaped: lockNamespace), k)
            FROM (SELECT k FROM unnest(\(locks)::int4[]) AS k ORDER BY k) AS ordered
            """, logger: logger)
        try await connection.query(
            """
            INSERT INTO herald_outbox (topic, aggregate, slot, event)
            SELECT \(topic), a, s, e::jsonb
            FROM unnest(\(aggregates)::text[], \(slots)::int4[], \(bodies)::text[]) WITH ORDINALITY AS t(a, s, e, n)
            ORDER BY n
            """, logger: logger)
        try await connection.query("SELECT pg_notify(\(channel), '')", logger: logger)
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
