import Herald
import Logging
import Metrics
import PostgresNIO
import ServiceLifecycle
import Synchronization

/// Publishes committed outbox events to a transport and marks them published only after the transport
/// acknowledged them: at-least-once (a relay that dies between the two publishes those events again; transports
/// with deduplication drop the repeats by (source, id)).
///
/// Several relays may run at once. Each holds the slots it publishes with session advisory locks on a connection of
/// its own, so one slot — and therefore one aggregate — is published by one relay at a time. Relays count each other
/// (each holds a presence lock) and each keeps its share of the slots, ⌈slots ÷ relays⌉, giving extra ones back and
/// taking free ones every half second; a relay that dies loses its connection and so its locks, and the others take
/// its slots over on their next balance.
///
/// Each round reads the oldest unpublished rows of its slots (by state, not past an id high-water mark, so a
/// transaction that commits late is not skipped), publishes them in id order — consecutive rows of one topic as one
/// batch — and marks them. It runs again at once while rows keep coming, else after `pollInterval` or when a commit
/// is notified (`Outbox.append(…, notify: true)`), whichever comes first.
public final class OutboxRelay: Service, Sendable {
    public struct Configuration: Sendable {
        public var postgres: PostgresConnection.Configuration
        /// Rows read and published per round.
        public var batchSize: Int
        /// The wait between rounds that found nothing more to publish, unless a commit is notified before.
        public var pollInterval: Duration
        /// Published rows older than this are deleted.
        public var retention: Duration
        /// Wait before reconnecting after the connection (or the transport) failed.
        public var retryDelay: Duration

        public init(
            postgres: PostgresConnection.Configuration, batchSize: Int = 500,
            pollInterval: Duration = .milliseconds(25),
            retention: Duration = .seconds(3600), retryDelay: Duration = .milliseconds(200)
        ) {
            self.postgres = postgres
            self.batchSize = batchSize
            self.pollInterval = pollInterval
            self.retention = retention
            self.retryDelay = retryDelay
        }
    }

    /// What a relay has done so far.
    public struct Statistics: Sendable, Hashable {
        /// Events published and marked.
        public var published = 0
        /// Rounds that published something.
        public var rounds = 0
        /// Events the transport refused for good (kept in the outbox with the reason).
        public var rejected = 0
        /// Slots held now.
        public var slots = 0
        /// Connections (or publishes) that failed and were retried.
        public var failures = 0
    }

    public let configuration: Configuration
    public let transport: any EventTransport
    private let logger: Logger
    private let doorbell = Doorbell()
    private let statistics = Mutex(Statistics())
    private let publishedCounter = Counter(label: "herald_outbox_published_total")
    private let rejectedCounter = Counter(label: "herald_outbox_rejected_total")
    private let failureCounter = Counter(label: "herald_outbox_relay_failures_total")
    /// From a row's transaction start to its publication.
    private let delayTimer = Metrics.Timer(label: "herald_outbox_delay_seconds")

    public init(
        configuration: Configuration, transport: any EventTransport,
        logger: Logger = Logger(label: "herald.outbox.relay")
    ) {
        self.configuration = configuration
        self.transport = transport
        self.logger = logger
    }

    public var stats: Statistics { statistics.withLock { $0 } }

    /// Publishes until cancelled or graceful shutdown; survives lost connections and transport failures.
    public func run() async throws {
        await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                do {
                    try await self.session()
                } catch is CancellationError {
                    break
                } catch {
                    if Task.isCancelled { break }
                    self.statistics.withLock {
                        $0.failures += 1
                        $0.slots = 0
                    }
                    self.failureCounter.increment()
                    self.logger.warning(
                        "outbox relay failed; reconnecting", metadata: ["error": "\(String(reflecting: error))"])
                    try? await Task.sleep(for: self.configuration.retryDelay)
                }
            }
            self.statistics.withLock { $0.slots = 0 }
        }
    }

    /// One connection's life: listen for commits, take slots, publish rounds. Throws when the connection fails.
    private func session() async throws {
        let connection = try await PostgresConnection.connect(
            configuration: configuration.postgres, id: Int.random(in: 1...Int.max), logger: logger)
        do {
            try await connection.listen(on: Outbox.channel) { notifications in
                try await withThrowingTaskGroup(of: Void.self) { group in
                    group.addTask {
                        for try await _ in notifications { self.doorbell.ring() }
                    }
                    group.addTask { try await self.rounds(on: connection) }
                    try await group.next()
                    group.cancelAll()
                }
            }
        } catch {
            // Dropping the connection releases the slots at once, whatever happened (also on cancellation).
            try? await connection.close()
            throw error
        }
        try? await connection.close()
    }

    private func rounds(on connection: PostgresConnection) async throws {
        // Presence: a session lock per relay, so relays can count each other (gone with the connection). It is the
        // one-bigint form — (outbox oid << 32) | backend pid — which pg_locks tells apart (objsubid 1) from the
        // two-int4 slot and aggregate locks (objsubid 2).
        try await connection.query(
            "SELECT pg_advisory_lock(((\(unescaped: Outbox.lockNamespace))::int8 << 32) | pg_backend_pid())",
            logger: logger)
        var held: [Int32] = []
        var lastCleanup = ContinuousClock.now
        var lastBalance = ContinuousClock.now - .seconds(3600)
        while !Task.isCancelled {
            if ContinuousClock.now - lastBalance >= Self.balanceInterval {
                lastBalance = .now
                try await balance(&held, on: connection)
            }
            var full = false
            if !held.isEmpty {
                full = try await round(slots: held, on: connection)
            }
            if ContinuousClock.now - lastCleanup > .seconds(60) {
                lastCleanup = .now
                try await cleanUp(on: connection)
            }
            if !full { await doorbell.wait(upTo: configuration.pollInterval) }
        }
        throw CancellationError()
    }

    /// How often a relay counts the relays and takes or gives back slots.
    static let balanceInterval: Duration = .milliseconds(500)

    /// Holds this relay's share of the slots: ⌈slots ÷ relays alive⌉. Above it, gives the extra slots back (between
    /// rounds, so nothing is in flight on them); below it, takes free ones, starting at a random slot. A relay
    /// that dies releases its slots with its connection; the others' shares grow on their next balance.
    private func balance(_ held: inout [Int32], on connection: PostgresConnection) async throws {
        let counted = try await connection.query(
            """
            SELECT count(*) FROM pg_locks
            WHERE locktype = 'advisory' AND granted AND objsubid = 1
            AND classid = (\(unescaped: Outbox.lockNamespace))::oid
            AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
            """, logger: logger)
        var relays = 1
        for try await count in counted.decode(Int64.self) { relays = max(1, Int(count)) }
        let share = (Outbox.slots + relays - 1) / relays
        if held.count > share {
            let released = Array(held.suffix(held.count - share))
            held.removeLast(held.count - share)
            try await connection.query(
                "SELECT pg_advisory_unlock(\(unescaped: Outbox.lockNamespace), s) FROM unnest(\(released)::int4[]) AS s",
                logger: logger)
        } else if held.count < share {
            let start = Int32.random(in: 0..<Int32(Outbox.slots))
            let candidates = (0..<Int32(Outbox.slots)).map { (start + $0) % Int32(Outbox.slots) }.filter {
                !held.contains($0)
            }
            let taken = try await connection.query(
                """
                SELECT s FROM unnest(\(candidates)::int4[]) WITH ORDINALITY AS c(s, n)
                WHERE pg_try_advisory_lock(\(unescaped: Outbox.lockNamespace), s)
                LIMIT \(share - held.count)
                """, logger: logger)
            for try await slot in taken.decode(Int32.self) { held.append(slot) }
        }
        let count = held.count
        statistics.withLock { $0.slots = count }
    }

    /// Publishes the oldest unpublished rows of `slots`; returns whether the batch was full (more may wait).
    private func round(slots: [Int32], on connection: PostgresConnection) async throws -> Bool {
        let rows = try await connection.query(
            """
            SELECT id, topic, event::text, (extract(epoch FROM now() - created_at) * 1e9)::int8 FROM herald_outbox
            WHERE published_at IS NULL AND rejected IS NULL AND slot = ANY(\(slots)::int4[])
            ORDER BY id LIMIT \(configuration.batchSize)
            """, logger: logger)
        var pending: [(id: Int64, topic: String, body: String, age: Int64)] = []
        for try await row in rows.decode((Int64, String, String, Int64).self) { pending.append(row) }
        guard !pending.isEmpty else { return false }

        var published: [Int64] = []
        var rejected: [(id: Int64, reason: String)] = []
        // Consecutive rows of one topic go as one batch; batches in id order, each acknowledged before the next.
        var start = 0
        while start < pending.count {
            var end = start + 1
            while end < pending.count && pending[end].topic == pending[start].topic { end += 1 }
            let run = pending[start..<end]
            var events: [CloudEvent] = []
            var ids: [Int64] = []
            for row in run {
                do {
                    events.append(try CloudEventJSON.decode(Array(row.body.utf8)))
                    ids.append(row.id)
                } catch {
                    rejected.append((row.id, "not a valid CloudEvent: \(error)"))
                }
            }
            if !events.isEmpty {
                do {
                    _ = try await transport.publish(events, to: run.first!.topic)
                    published += ids
                } catch let error as TransportError where error.code == .invalidRequest {
                    // One of them is refused for good: publish them one by one, keep the refused ones aside.
                    for (event, id) in zip(events, ids) {
                        do {
                            _ = try await transport.publish([event], to: run.first!.topic)
                            published.append(id)
                        } catch let error as TransportError where error.code == .invalidRequest {
                            rejected.append((id, error.message))
                        }
                    }
                }
            }
            start = end
        }
        if !published.isEmpty {
            try await connection.query(
                "UPDATE herald_outbox SET published_at = now() WHERE id = ANY(\(published)::int8[])", logger: logger)
        }
        for (id, reason) in rejected {
            logger.error(
                "outbox event refused by the transport; kept", metadata: ["id": "\(id)", "reason": "\(reason)"])
            try await connection.query("UPDATE herald_outbox SET rejected = \(reason) WHERE id = \(id)", logger: logger)
        }
        publishedCounter.increment(by: published.count)
        rejectedCounter.increment(by: rejected.count)
        for row in pending { delayTimer.recordNanoseconds(row.age) }
        let counts = (published.count, rejected.count)
        statistics.withLock {
            $0.published += counts.0
            $0.rejected += counts.1
            $0.rounds += 1
        }
        return pending.count == configuration.batchSize
    }

    private func cleanUp(on connection: PostgresConnection) async throws {
        let seconds = Double(configuration.retention.components.seconds)
        try await connection.query(
            "DELETE FROM herald_outbox WHERE published_at < now() - make_interval(secs => \(seconds))", logger: logger)
    }
}

/// Wakes one waiter, or the next one to wait if none waits now.
final class Doorbell: Sendable {
    private struct State {
        var rung = false
        var waiter: CheckedContinuation<Void, Never>?
    }
    private let state = Mutex(State())

    func ring() {
        let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
            guard let waiter = state.waiter else {
                state.rung = true
                return nil
            }
            state.waiter = nil
            return waiter
        }
        waiter?.resume()
    }

    /// Returns when rung (now or since the last wait), after `timeout`, or when the task is cancelled.
    func wait(upTo timeout: Duration) async {
        if state.withLock({ state in
            defer { state.rung = false }
            return state.rung
        }) {
            return
        }
        await withTaskGroup(of: Void.self) { group in
            group.addTask {
                if (try? await Task.sleep(for: timeout)) != nil { self.ring() }
            }
            await withTaskCancellationHandler {
                await withCheckedContinuation { continuation in
                    let ready = state.withLock { state -> Bool in
                        if state.rung {
                            state.rung = false
                            return true
                        }
                        state.waiter = continuation
                        return false
                    }
                    if ready { continuation.resume() }
                }
            } onCancel: {
                self.ring()
            }
            group.cancelAll()
        }
    }
}
