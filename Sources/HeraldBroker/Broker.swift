/// The broker engine: topics of partitioned durable logs, producer dedup, consumer groups with acks, redelivery,
/// dead letters and ordered delivery. The TCP server (and later the HTTP server) are thin shells around it, so
/// limits and validation live in one place.
///
/// Concurrency: one lock guards all topic and group state; log appends (a `pwrite` per batch) happen under it,
/// fdatasyncs never do (they run on `GroupCommit`'s queue). Deliveries are handed to members after the lock is
/// released. `run()` drives ack deadlines, delayed redeliveries, journal syncs and retention.
import DequeModule
import Foundation
import Herald
import HeraldLog
import HeraldWire
import Logging
import ServiceLifecycle
import Synchronization

/// The broker engine: topics of partitioned durable logs, producer dedup, consumer groups with acks, redelivery,
/// dead letters and ordered delivery. The TCP server (and later the HTTP server) are thin shells around it, so
/// limits and validation live in one place.
///
/// Concurrency: one lock guards all topic and group state; log appends (a `pwrite` per batch) happen under it,
/// fdatasyncs never do (they run on `GroupCommit`'s queue). Deliveries are handed to members after the lock is
/// released. `run()` drives ack deadlines, delayed redeliveries, journal syncs and retention.
public final class Broker: Service, Sendable {
    struct State {
        var topics: [String: TopicState] = [:]
        var journal: Journal
        var journalDirty = false
        var nextMemberID = 0
        /// member id → (topic, group), to find a member's group when it leaves.
        var memberGroups: [Int: (topic: String, group: String)] = [:]
        var closed = false
        var lastRetention: UInt64 = 0
        var lastIntervalSync: UInt64 = 0
        /// The journal's size right after the last compaction.
        var journalSnapshotBytes = 0
    }

    public let configuration: BrokerConfiguration
    /// Records an ordered group may hold back behind busy keys before a partition waits for its key.
    static let maxParkedPerGroup = 100_000
    let logger: Logger
    let commit = GroupCommit()
    typealias Outgoing = (member: any BrokerMember, deliveries: [WireDelivery])
    /// Journal appends from inside `pump` (which already runs under the lock) go through this buffer.
    let pendingJournal = Mutex<[JournalEntry]>([])
    let state: Mutex<State>
    /// Held while the broker is open: one broker per data directory.
    let lock: DirectoryLock

    /// Opens the data directory and recovers every topic, group and the dedup table.
    public init(configuration: BrokerConfiguration, logger: Logger = Logger(label: "herald.broker")) throws(BrokerError)
    {
        self.configuration = configuration
        self.logger = logger
        do {
            lock = try DirectoryLock(directory: configuration.dataDirectory)
            let journal = try Journal(dataDirectory: configuration.dataDirectory)
            var state = State(journal: journal)
            try Broker.recover(&state, entries: try journal.replay(), configuration: configuration, logger: logger)
            self.state = Mutex(state)
        } catch let error as LogError {
            throw BrokerError(.storage, "cannot open \(configuration.dataDirectory): \(error.message)")
        } catch let error as BrokerError {
            throw error
        } catch {
            throw BrokerError(.storage, "cannot open \(configuration.dataDirectory): \(error)")
        }
    }

    // MARK: Lifecycle

    /// Ticks until graceful shutdown (or cancellation), then closes the logs.
    public func run() async throws {
        let tick = configuration.tick
        await withGracefulShutdownHandler {
            while !Task.isCancelled && !Task.isShuttingDownGracefully {
                self.tick()
                try? await Task.sleep(for: tick)
            }
        } onGracefulShutdown: {
        }
        close()
    }

    /// Stops accepting work, syncs and closes every log, and releases the data directory.
    public func close() {
        let logs = state.withLock { state -> [PartitionLog] in
            state.closed = true
            let buffered = pendingJournal.withLock { entries -> [JournalEntry] in
                defer { entries = [] }
                return entries
            }
            try? state.journal.append(buffered)
            return state.topics.values.flatMap { $0.partitions.map(\.log) } + [state.journal.log]
        }
        for log in logs {
            if configuration.fsync != .none { try? log.sync() }
            log.close()
        }
        lock.release()
    }

    /// Counters for tests and benchmarks: members' unsettled deliveries per group.
    public func inFlight(topic: String, group: String) -> Int {
        state.withLock { $0.topics[topic]?.groups[group]?.pending.count ?? 0 }
    }
}
