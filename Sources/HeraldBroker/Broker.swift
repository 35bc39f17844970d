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
    private let state: Mutex<State>

    /// Opens the data directory and recovers every topic, group and the dedup table.
    public init(configuration: BrokerConfiguration, logger: Logger = Logger(label: "herald.broker")) throws(BrokerError)
    {
        self.configuration = configuration
        self.logger = logger
        do {
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

    // MARK: Recovery

    private static func recover(
        _ state: inout State, entries: [JournalEntry], configuration: BrokerConfiguration, logger: Logger
    ) throws {
        // A topic's files are opened only for its last creation that no deletion follows.
        var liveCreation: [String: Int] = [:]
        for (index, entry) in entries.enumerated() {
            switch entry {
            case .topicCreated(let name, _, _): liveCreation[name] = index
            case .topicDeleted(let name): liveCreation.removeValue(forKey: name)
            default: break
            }
        }
        for (index, entry) in entries.enumerated() {
            switch entry {
            case .topicCreated(let name, let partitions, let retention):
                if liveCreation[name] == index {
                    state.topics[name] = try openTopic(name, partitions, retention, configuration, logger)
                }
            case .topicDeleted(let name):
                state.topics.removeValue(forKey: name)
            case .topicConfigured(let name, let retention):
                guard let topic = state.topics[name] else { continue }
                topic.retention = retention
                for partition in topic.partitions {
                    partition.log.setRetention(maxAge: retention.maxAge, maxBytes: retention.maxBytes)
                }
            case .groupCreated(let topic, let group, let options, let cursors):
                guard let topic = state.topics[topic] else { continue }
                let starts = topic.partitions.indices.map { index in
                    max(index < cursors.count ? cursors[index] : 0, topic.partitions[index].log.startOffset)
                }
                topic.groups[group] = GroupState(name: group, options: options, cursors: starts)
            case .groupDeleted(let topic, let group):
                state.topics[topic]?.groups.removeValue(forKey: group)
            case .settled(let topic, let group, let positions):
                guard let group = state.topics[topic]?.groups[group] else { continue }
                for position in positions where position.partition < group.cursors.count {
                    group.priorAttempts.removeValue(forKey: position)
                    if position.offset >= group.cursors[position.partition] {
                        group.settledAhead[position.partition].insert(position.offset)
                    }
                }
            case .attempt(let topic, let group, let position, let attempt):
                guard let group = state.topics[topic]?.groups[group] else { continue }
                group.priorAttempts[position] = max(group.priorAttempts[position] ?? 0, attempt)
            }
        }
        // Files of topics deleted just before a crash.
        let topicsDirectory = configuration.dataDirectory + "/topics"
        if let names = try? FileManager.default.contentsOfDirectory(atPath: topicsDirectory) {
            for name in names where state.topics[name] == nil { Journal.removeTree(topicsDirectory + "/" + name) }
        }
        // Advance each cursor over the settled run at its start, so the next snapshot stays small.
        for topic in state.topics.values {
            for group in topic.groups.values {
                for partition in group.cursors.indices {
                    while group.settledAhead[partition].remove(group.cursors[partition]) != nil {
                        group.cursors[partition] += 1
                    }
                }
            }
            try rebuildDedup(topic, window: configuration.dedupWindow)
        }
    }

    private static func openTopic(
        _ name: String, _ partitions: Int, _ retention: TopicRetention, _ configuration: BrokerConfiguration,
        _ logger: Logger
    ) throws -> TopicState {
        let logs = try (0..<partitions).map { index in
            let log = try PartitionLog(
                directory: "\(configuration.dataDirectory)/topics/\(name)/\(index)",
                configuration: logConfiguration(configuration, retention: retention))
            if let reason = log.recovery.reason {
                logger.warning("recovered a partition", metadata: ["cut": "\(reason)"])
            }
            return PartitionState(log: log)
        }
        return TopicState(name: name, retention: retention, partitions: logs)
    }

    /// Reloads the dedup table from the records inside the window (the logs are the source of truth).
    private static func rebuildDedup(_ topic: TopicState, window: Duration) throws {
        let nowWall = Int64(wallClockMilliseconds())
        let nowMono = monotonicNanoseconds()
        let isDeadLetterTopic = topic.name.hasSuffix(".dlq")
        for (index, partition) in topic.partitions.enumerated() {
            var offset = try partition.log.offset(atOrAfter: nowWall - window.milliseconds)
            while true {
                let records = try partition.log.read(from: offset, maxRecords: 4096)
                guard let last = records.last else { break }
                for record in records {
                    guard let summary = try? BinaryEvent.summary(record.headers) else { continue }
                    var group: String?
                    if isDeadLetterTopic,
                        case .string(let name)? =
                            (try? BinaryEvent.decode(
                                WireEvent(headers: record.headers, data: record.payload)))?[
                                extension: "deadlettergroup"]
                    {
                        group = name
                    }
                    let age = UInt64(max(0, nowWall - record.timestamp)) * 1_000_000
                    topic.dedup.insert(
                        DedupTable.key(source: summary.source, id: summary.id, group: group),
                        Position(partition: index, offset: record.offset), at: nowMono &- min(age, nowMono))
                }
                offset = last.offset + 1
            }
        }
    }

    // MARK: Topics

    /// Creates a topic (idempotent when the partition count matches).
    @discardableResult
    public func createTopic(_ name: String, partitions: Int? = nil, retention: TopicRetention? = nil)
        throws(BrokerError) -> TopicInfo
    {
        try Broker.validateName(name, what: "topic")
        return try state.withLock { state throws(BrokerError) -> TopicInfo in
            let topic = try topicLocked(name, partitions: partitions, retention: retention, state: &state)
            if let partitions, partitions != topic.partitions.count {
                throw BrokerError(
                    .invalidRequest,
                    "topic '\(name)' exists with \(topic.partitions.count) partitions, not \(partitions)")
            }
            return info(topic)
        }
    }

    private func topicLocked(
        _ name: String, partitions: Int? = nil, retention: TopicRetention? = nil, state: inout State
    ) throws(BrokerError) -> TopicState {
        if let topic = state.topics[name] { return topic }
        guard !state.closed else { throw BrokerError(.shutDown, "the broker is shutting down") }
        let count = partitions ?? configuration.defaultPartitions
        guard (1...1024).contains(count) else {
            throw BrokerError(.invalidRequest, "a topic has 1 to 1024 partitions, not \(count)")
        }
        let retention =
            retention ?? TopicRetention(maxAge: configuration.retentionAge, maxBytes: configuration.retentionBytes)
        do {
            let topic = try Broker.openTopic(name, count, retention, configuration, logger)
            try state.journal.append([.topicCreated(name: name, partitions: count, retention: retention)])
            state.journalDirty = true
            state.topics[name] = topic
            return topic
        } catch let error as LogError {
            throw BrokerError(.storage, "cannot create topic '\(name)': \(error.message)")
        } catch {
            throw BrokerError(.storage, "cannot create topic '\(name)': \(error)")
        }
    }

    /// Changes a topic's retention (applied within the next retention pass).
    @discardableResult
    public func configureTopic(_ name: String, retention: TopicRetention) throws(BrokerError) -> TopicInfo {
        try state.withLock { state throws(BrokerError) -> TopicInfo in
            guard let topic = state.topics[name] else { throw BrokerError(.notFound, "no topic '\(name)'") }
            do {
                try state.journal.append([.topicConfigured(name: name, retention: retention)])
            } catch {
                throw BrokerError(.storage, "cannot record the new retention: \(error)")
            }
            state.journalDirty = true
            topic.retention = retention
            for partition in topic.partitions {
                partition.log.setRetention(maxAge: retention.maxAge, maxBytes: retention.maxBytes)
            }
            state.lastRetention = 0
            return info(topic)
        }
    }

    /// Deletes a topic, its groups and its files. Members of its groups see their subscriptions end.
    public func deleteTopic(_ name: String) throws(BrokerError) {
        try state.withLock { state throws(BrokerError) in
            guard let topic = state.topics.removeValue(forKey: name) else {
                throw BrokerError(.notFound, "no topic '\(name)'")
            }
            try? state.journal.append([.topicDeleted(name: name)])
            state.journalDirty = true
            for partition in topic.partitions { partition.log.delete() }
            Journal.removeTree("\(configuration.dataDirectory)/topics/\(name)")
        }
    }

    public func topics() -> [TopicInfo] {
        state.withLock { state in state.topics.values.sorted { $0.name < $1.name }.map(info) }
    }

    public func topic(_ name: String) -> TopicInfo? {
        state.withLock { state in state.topics[name].map(info) }
    }

    private func info(_ topic: TopicState) -> TopicInfo {
        TopicInfo(
            name: topic.name, partitions: topic.partitions.count,
            startOffsets: topic.partitions.map(\.log.startOffset), endOffsets: topic.partitions.map(\.log.nextOffset),
            durableOffsets: topic.partitions.map(\.log.durableOffset),
            retentionSeconds: topic.retention.maxAge.map { $0.components.seconds },
            retentionBytes: topic.retention.maxBytes,
            bytes: topic.partitions.reduce(0) { $0 + $1.log.sizeInBytes }, groups: topic.groups.keys.sorted())
    }

    static func validateName(_ name: String, what: String) throws(BrokerError) {
        let valid =
            !name.isEmpty && name.utf8.count <= 200 && name.first != "." && name.first != "_"
            && name.utf8.allSatisfy {
                ($0 >= 97 && $0 <= 122) || ($0 >= 65 && $0 <= 90) || ($0 >= 48 && $0 <= 57) || $0 == 46 || $0 == 45
                    || $0 == 95
            }
        guard valid else {
            throw BrokerError(
                .invalidRequest,
                "\(what) name '\(name)' is invalid: use 1-200 of A-Z a-z 0-9 . - _, not starting with . or _")
        }
    }

    // MARK: Publishing

    /// Appends a batch; returns each event's position once the batch is as durable as the fsync policy promises.
    /// A (`source`, `id`) seen within the dedup window returns the original's position, flagged duplicate.
    public func publish(topic name: String, events: [WireEvent]) async throws(BrokerError) -> [WirePosition] {
        let result = await withCheckedContinuation {
            (continuation: CheckedContinuation<Result<[WirePosition], BrokerError>, Never>) in
            publish(topic: name, events: events) { continuation.resume(returning: $0) }
        }
        return try result.get()
    }

    /// The same, calling `completion` (on the caller's thread when it fails at once or does not wait for an fsync,
    /// else on the sync thread right after the fsync). Network servers use this form: no task hop on the way.
    public func publish(
        topic name: String, events: [WireEvent],
        completion: @escaping @Sendable (Result<[WirePosition], BrokerError>) -> Void
    ) {
        let summaries: [EventSummary]
        let positions: [WirePosition]
        let waits: [(PartitionState, Int64)]
        let deliveries: [Outgoing]
        do throws(BrokerError) {
            summaries = try validate(events, topic: name)
            (positions, waits, deliveries) = try state.withLock {
                state throws(BrokerError) -> ([WirePosition], [(PartitionState, Int64)], [Outgoing]) in
                let topic = try topicLocked(name, state: &state)
                let (positions, touched) = try appendLocked(
                    topic, events, summaries, dedupGroup: { _ in nil }, bypassDedup: false)
                var deliveries: [Outgoing] = []
                if configuration.fsync != .always {
                    for (partition, _) in touched { partition.visible = partition.log.nextOffset }
                    pump(topic, now: monotonicNanoseconds(), into: &deliveries)
                }
                return (positions, touched, deliveries)
            }
        } catch {
            completion(.failure(error))
            return
        }
        hand(deliveries)
        guard configuration.fsync == .always else {
            release(waits)
            completion(.success(positions))
            return
        }
        whenDurable(waits, topic: name) { [self] failure in
            release(waits)
            completion(failure.map { .failure($0) } ?? .success(positions))
        }
    }

    private func validate(_ events: [WireEvent], topic name: String) throws(BrokerError) -> [EventSummary] {
        try Broker.validateName(name, what: "topic")
        var summaries: [EventSummary] = []
        summaries.reserveCapacity(events.count)
        for (index, event) in events.enumerated() {
            guard event.size <= configuration.maxEventBytes else {
                throw BrokerError(
                    .invalidEvent,
                    "event \(index) is \(event.size) bytes, over the limit of \(configuration.maxEventBytes)")
            }
            do {
                summaries.append(try BinaryEvent.summary(event.headers))
            } catch {
                throw BrokerError(.invalidEvent, "event \(index) is not a valid CloudEvent: \(error.message)")
            }
        }
        return summaries
    }

    /// Calls `completion` once every touched partition is durable (or failed); consumers see the records as soon
    /// as the fsync returns, before the publisher hears back.
    private func whenDurable(
        _ waits: [(PartitionState, Int64)], topic name: String,
        _ completion: @escaping @Sendable (BrokerError?) -> Void
    ) {
        guard !waits.isEmpty else {
            completion(nil)
            return
        }
        let remaining = Mutex((count: waits.count, failure: (any Error)?.none))
        for (partition, through) in waits {
            commit.whenDurable(partition.log, through: through) { [self] error in
                let (last, failure) = remaining.withLock { state -> (Bool, (any Error)?) in
                    if let error, state.failure == nil { state.failure = error }
                    state.count -= 1
                    return (state.count == 0, state.failure)
                }
                guard last else { return }
                makeVisible(topic: name)
                completion(
                    failure.map {
                        BrokerError(.unavailable, "the partition could not make the events durable: \($0)")
                    })
            }
        }
    }

    /// Waits until every touched partition is durable.
    private func waitDurable(_ waits: [(PartitionState, Int64)], topic name: String) async throws(BrokerError) {
        let failure = await withCheckedContinuation { (continuation: CheckedContinuation<BrokerError?, Never>) in
            whenDurable(waits, topic: name) { continuation.resume(returning: $0) }
        }
        if let failure { throw failure }
    }

    private func release(_ waits: [(PartitionState, Int64)]) {
        state.withLock { _ in for (partition, _) in waits { partition.unacknowledged -= 1 } }
    }

    /// After a group commit: consumers may now see what is durable.
    private func makeVisible(topic name: String) {
        let deliveries = state.withLock { state -> [Outgoing] in
            guard let topic = state.topics[name] else { return [] }
            for partition in topic.partitions {
                partition.visible = max(partition.visible, partition.log.durableOffset)
            }
            var deliveries: [Outgoing] = []
            pump(topic, now: monotonicNanoseconds(), into: &deliveries)
            return deliveries
        }
        hand(deliveries)
    }

    /// Appends under the lock. Returns positions and, per touched partition, the offset durability must reach.
    private func appendLocked(
        _ topic: TopicState, _ events: [WireEvent], _ summaries: [EventSummary], dedupGroup: (Int) -> String?,
        bypassDedup: Bool
    ) throws(BrokerError) -> ([WirePosition], [(PartitionState, Int64)]) {
        let now = monotonicNanoseconds()
        topic.dedup.expire(now: now, window: UInt64(configuration.dedupWindow.nanoseconds))
        var positions = [WirePosition?](repeating: nil, count: events.count)
        var batches = [[Int]](repeating: [], count: topic.partitions.count)
        var through = [Int64](repeating: -1, count: topic.partitions.count)
        var batchKeys: [DedupTable.Key: Int] = [:]
        var duplicatesOfBatch: [(Int, Int)] = []
        for (index, summary) in summaries.enumerated() {
            let key = DedupTable.key(source: summary.source, id: summary.id, group: dedupGroup(index))
            if !bypassDedup {
                if let original = topic.dedup.entries[key] {
                    positions[index] = WirePosition(
                        partition: UInt32(original.position.partition), offset: original.position.offset,
                        duplicate: true)
                    through[original.position.partition] = max(
                        through[original.position.partition], original.position.offset + 1)
                    continue
                }
                if let first = batchKeys[key] {
                    duplicatesOfBatch.append((index, first))
                    continue
                }
                batchKeys[key] = index
            }
            let partition: Int
            if let partitionKey = summary.partitionKey {
                partition = Int(PartitionHash.fnv1a(partitionKey) % UInt64(topic.partitions.count))
            } else {
                partition = topic.roundRobin
                topic.roundRobin = (topic.roundRobin + 1) % topic.partitions.count
            }
            batches[partition].append(index)
        }
        for (index, indices) in batches.enumerated() where !indices.isEmpty {
            let partition = topic.partitions[index]
            guard partition.unacknowledged < configuration.maxPendingPublishes else {
                throw BrokerError(
                    .unavailable, "partition \(index) of '\(topic.name)' has too many publishes in flight; retry")
            }
        }
        let timestamp = Int64(wallClockMilliseconds())
        for (index, indices) in batches.enumerated() where !indices.isEmpty {
            let partition = topic.partitions[index]
            let inputs = indices.map {
                RecordInput(
                    key: summaries[$0].partitionKey.map { Array($0.utf8) }, headers: events[$0].headers,
                    payload: events[$0].data)
            }
            let range: Range<Int64>
            do {
                range = try partition.log.append(inputs, timestamp: timestamp)
            } catch {
                throw BrokerError(.unavailable, "partition \(index) of '\(topic.name)' cannot write: \(error.message)")
            }
            for (eventIndex, offset) in zip(indices, range) {
                let position = Position(partition: index, offset: offset)
                positions[eventIndex] = WirePosition(partition: UInt32(index), offset: offset, duplicate: false)
                if !bypassDedup {
                    topic.dedup.insert(
                        DedupTable.key(
                            source: summaries[eventIndex].source, id: summaries[eventIndex].id,
                            group: dedupGroup(eventIndex)), position, at: now)
                }
            }
            through[index] = max(through[index], range.upperBound)
        }
        for (index, first) in duplicatesOfBatch {
            var position = positions[first]!
            position.duplicate = true
            positions[index] = position
        }
        var waits: [(PartitionState, Int64)] = []
        for (index, offset) in through.enumerated() where offset >= 0 {
            topic.partitions[index].unacknowledged += 1
            waits.append((topic.partitions[index], offset))
        }
        return (positions.map { $0! }, waits)
    }

    // MARK: Consuming

    typealias Outgoing = (member: any BrokerMember, deliveries: [WireDelivery])

    /// Joins (creating if needed) consumer group `request.group` on `request.topic`. Returns the member id.
    public func subscribe(_ request: SubscribeRequest, member: any BrokerMember) throws(BrokerError) -> Int {
        try Broker.validateName(request.topic, what: "topic")
        try Broker.validateName(request.group, what: "group")
        guard request.maxDeliveries >= 1, request.maxInFlight >= 1 else {
            throw BrokerError(.invalidRequest, "maxDeliveries and maxInFlight must be at least 1")
        }
        let (id, deliveries) = try state.withLock { state throws(BrokerError) -> (Int, [Outgoing]) in
            let topic = try topicLocked(request.topic, state: &state)
            let group = try groupLocked(topic, request, state: &state)
            state.nextMemberID += 1
            let id = state.nextMemberID
            group.members[id] = MemberSlot(member: member, maxInFlight: Int(request.maxInFlight))
            group.memberOrder.append(id)
            state.memberGroups[id] = (request.topic, request.group)
            var deliveries: [Outgoing] = []
            pump(topic, now: monotonicNanoseconds(), into: &deliveries)
            return (id, deliveries)
        }
        hand(deliveries)
        return id
    }

    private func groupLocked(_ topic: TopicState, _ request: SubscribeRequest, state: inout State)
        throws(BrokerError) -> GroupState
    {
        if let group = topic.groups[request.group] { return group }
        var cursors: [Int64] = []
        for partition in topic.partitions {
            switch request.start {
            case .earliest: cursors.append(partition.log.startOffset)
            case .latest: cursors.append(partition.log.nextOffset)
            case .offset(let offset):
                cursors.append(min(max(offset, partition.log.startOffset), partition.log.nextOffset))
            case .time(let milliseconds):
                do {
                    cursors.append(try partition.log.offset(atOrAfter: milliseconds))
                } catch {
                    throw BrokerError(.storage, "cannot find the start time: \(error.message)")
                }
            }
        }
        let options = GroupOptions(
            ackWaitMilliseconds: max(1, request.ackWaitMilliseconds), maxDeliveries: request.maxDeliveries,
            backoffMilliseconds: request.backoffMilliseconds, ordered: request.ordered)
        let group = GroupState(name: request.group, options: options, cursors: cursors)
        do {
            try state.journal.append([
                .groupCreated(topic: topic.name, group: request.group, options: options, cursors: cursors)
            ])
        } catch {
            throw BrokerError(.storage, "cannot record the new group: \(error.message)")
        }
        state.journalDirty = true
        topic.groups[request.group] = group
        return group
    }

    /// A member leaves its group. With `keepPending` (an unsubscribe) it gets nothing new but may still settle
    /// what it holds, and the ack wait hands on what it does not settle; without (a lost connection) its unsettled
    /// deliveries are redelivered to the others right away.
    public func unsubscribe(member id: Int, keepPending: Bool = false) {
        let deliveries = state.withLock { state -> [Outgoing] in
            guard let (topicName, groupName) = state.memberGroups[id],
                let topic = state.topics[topicName], let group = topic.groups[groupName]
            else { return [] }
            group.members.removeValue(forKey: id)
            group.memberOrder.removeAll { $0 == id }
            if keepPending { return [] }
            state.memberGroups.removeValue(forKey: id)
            let now = monotonicNanoseconds()
            for (position, pending) in group.pending where pending.member == id {
                group.pending.removeValue(forKey: position)
                group.redeliveries.append(Redelivery(due: now, position: position, attempt: pending.attempt))
            }
            var deliveries: [Outgoing] = []
            pump(topic, now: now, into: &deliveries)
            return deliveries
        }
        hand(deliveries)
    }

    /// Settles deliveries of a member; returns, per item, whether it was stale (not pending with that attempt).
    public func settle(member id: Int, _ items: [SettleItem]) -> [Bool] {
        let (stale, deliveries) = state.withLock { state -> ([Bool], [Outgoing]) in
            guard let (topicName, groupName) = state.memberGroups[id], let topic = state.topics[topicName],
                let group = topic.groups[groupName]
            else { return (Array(repeating: true, count: items.count), []) }
            let now = monotonicNanoseconds()
            var stale: [Bool] = []
            stale.reserveCapacity(items.count)
            var settled: [Position] = []
            var letters: [(Position, Int, String)] = []
            for item in items {
                let position = Position(partition: Int(item.partition), offset: item.offset)
                guard let pending = group.pending[position], pending.attempt == Int(item.attempt) else {
                    stale.append(true)
                    continue
                }
                stale.append(false)
                group.pending.removeValue(forKey: position)
                group.members[pending.member]?.inFlight -= 1
                switch item.settlement {
                case .ack:
                    group.release(pending.key)
                    group.acked += 1
                    settled.append(position)
                case .nack(let delay):
                    if pending.attempt >= Int(group.options.maxDeliveries) {
                        letters.append((position, pending.attempt, "nacked \(pending.attempt) times"))
                        group.release(pending.key)
                    } else {
                        group.redeliveries.append(
                            Redelivery(
                                due: now + UInt64(delay) * 1_000_000, position: position, attempt: pending.attempt))
                    }
                case .terminate(let reason):
                    letters.append((position, pending.attempt, "terminated: \(reason)"))
                    group.release(pending.key)
                }
            }
            deadLetter(letters, topic: topic, group: group, state: &state, settled: &settled)
            if !settled.isEmpty {
                try? state.journal.append([.settled(topic: topicName, group: groupName, positions: settled)])
                state.journalDirty = true
            }
            var deliveries: [Outgoing] = []
            pump(topic, now: now, into: &deliveries)
            return (stale, deliveries)
        }
        hand(deliveries)
        return stale
    }

    /// Appends dead letters (the event with `deadletterreason`, `deliveryattempts`, `deadlettergroup`) to
    /// `<topic>.dlq`, once per (event, group): the dlq's dedup key includes the group, so a retry after a crash
    /// returns the first dead letter instead of writing a second.
    private func deadLetter(
        _ letters: [(Position, Int, String)], topic: TopicState, group: GroupState, state: inout State,
        settled: inout [Position]
    ) {
        guard !letters.isEmpty else { return }
        var events: [WireEvent] = []
        var summaries: [EventSummary] = []
        for (position, attempts, reason) in letters {
            guard
                let record = try? topic.partitions[position.partition].log.read(from: position.offset, maxRecords: 1)
                    .first,
                var event = try? BinaryEvent.decode(WireEvent(headers: record.headers, data: record.payload))
            else {
                settled.append(position)
                continue
            }
            event.extensions["deadletterreason"] = .string(reason)
            event.extensions["deliveryattempts"] = .integer(Int32(clamping: attempts))
            event.extensions["deadlettergroup"] = .string(group.name)
            guard let wire = try? BinaryEvent.encode(event), let summary = try? BinaryEvent.summary(wire.headers)
            else { continue }
            events.append(wire)
            summaries.append(summary)
            group.deadLettered += 1
            settled.append(position)
        }
        guard !events.isEmpty,
            let dlq = try? topicLocked(topic.name + ".dlq", partitions: 1, state: &state),
            let (_, waits) = try? appendLocked(
                dlq, events, summaries, dedupGroup: { _ in group.name }, bypassDedup: false)
        else {
            logger.error("could not write dead letters", metadata: ["topic": "\(topic.name)"])
            return
        }
        let name = dlq.name
        for (partition, through) in waits {
            partition.unacknowledged -= 1
            if configuration.fsync == .always {
                commit.whenDurable(partition.log, through: through) { [weak self] _ in self?.makeVisible(topic: name) }
            } else {
                partition.visible = partition.log.nextOffset
            }
        }
    }

    /// Hands what each member of each group has room for: due redeliveries first, then new records.
    private func pump(_ topic: TopicState, now: UInt64, into outgoing: inout [Outgoing]) {
        var attemptsToRecord: [JournalEntry] = []
        for group in topic.groups.values where !group.memberOrder.isEmpty {
            var batches: [Int: [WireDelivery]] = [:]
            if !group.redeliveries.isEmpty {
                group.redeliveries.sort { ($0.due, $0.position) < ($1.due, $1.position) }
                var remaining: [Redelivery] = []
                for redelivery in group.redeliveries {
                    guard redelivery.due <= now, let member = group.pickMember(),
                        let record = try? topic.partitions[redelivery.position.partition].log.read(
                            from: redelivery.position.offset, maxRecords: 1
                        ).first
                    else {
                        remaining.append(redelivery)
                        continue
                    }
                    let attempt = redelivery.attempt + 1
                    batches[member, default: []].append(
                        deliver(record, at: redelivery.position, attempt: attempt, to: member, group: group, now: now))
                    if attempt > 1 {
                        attemptsToRecord.append(
                            .attempt(
                                topic: topic.name, group: group.name, position: redelivery.position, attempt: attempt))
                        group.redelivered += 1
                    }
                }
                group.redeliveries = remaining
            }
            partitions: for (index, partition) in topic.partitions.enumerated() {
                while group.cursors[index] < partition.visible {
                    guard group.pickMember() != nil else { break partitions }
                    let records: [LogRecord]
                    do {
                        records = try partition.log.read(
                            from: group.cursors[index], upTo: partition.visible, maxRecords: 256, maxBytes: 256 << 10)
                    } catch let error where error.code == .offsetOutOfRange {
                        group.cursors[index] = partition.log.startOffset
                        continue
                    } catch {
                        logger.error("cannot read a partition", metadata: ["error": "\(error)"])
                        break
                    }
                    guard !records.isEmpty else { break }
                    for record in records {
                        let position = Position(partition: index, offset: record.offset)
                        if group.settledAhead[index].remove(record.offset) != nil {
                            group.cursors[index] = record.offset + 1
                            continue
                        }
                        if group.options.ordered, let key = record.key.map({ String(decoding: $0, as: UTF8.self) }),
                            group.busyKeys[key] != nil
                        {
                            // Park it behind its key and let other keys pass (bounded; past the bound the
                            // partition waits for the key instead).
                            guard group.parkedCount < Broker.maxParkedPerGroup else { continue partitions }
                            group.parked[key, default: []].append(position)
                            group.parkedCount += 1
                            group.cursors[index] = record.offset + 1
                            continue
                        }
                        guard let member = group.pickMember() else { break partitions }
                        let attempt = (group.priorAttempts.removeValue(forKey: position) ?? 0) + 1
                        if group.options.ordered, let key = record.key {
                            group.busyKeys[String(decoding: key, as: UTF8.self), default: 0] += 1
                        }
                        batches[member, default: []].append(
                            deliver(record, at: position, attempt: attempt, to: member, group: group, now: now))
                        if attempt > 1 {
                            attemptsToRecord.append(
                                .attempt(topic: topic.name, group: group.name, position: position, attempt: attempt))
                        }
                        group.cursors[index] = record.offset + 1
                    }
                }
            }
            for (member, deliveries) in batches {
                if let slot = group.members[member] { outgoing.append((slot.member, deliveries)) }
            }
        }
        if !attemptsToRecord.isEmpty {
            bufferJournal(attemptsToRecord)
        }
    }

    /// Pending entries hold the key in ordered mode; the caller has counted the key busy already.
    private func deliver(
        _ record: LogRecord, at position: Position, attempt: Int, to member: Int, group: GroupState, now: UInt64
    ) -> WireDelivery {
        let key = group.options.ordered ? record.key.map { String(decoding: $0, as: UTF8.self) } : nil
        group.pending[position] = Pending(
            attempt: attempt, deadline: now + UInt64(group.options.ackWaitMilliseconds) * 1_000_000, member: member,
            key: key)
        group.members[member]!.inFlight += 1
        group.delivered += 1
        return WireDelivery(
            partition: UInt32(position.partition), offset: position.offset, attempt: UInt32(attempt),
            event: WireEvent(headers: record.headers, data: record.payload))
    }

    /// Journal appends from inside `pump` (which already runs under the lock) go through this buffer.
    private let pendingJournal = Mutex<[JournalEntry]>([])
    private func bufferJournal(_ entries: [JournalEntry]) {
        pendingJournal.withLock { $0.append(contentsOf: entries) }
    }

    /// Gives deliveries to their members (outside the lock); a member that is gone gets them redelivered.
    private func hand(_ outgoing: [Outgoing]) {
        for (member, deliveries) in outgoing where !member.deliver(deliveries) {
            // The member's connection closed meanwhile: its unsubscribe redelivers everything it held.
            continue
        }
    }

    // MARK: Ticking

    /// Expires ack deadlines, releases due redeliveries, syncs the journal and applies retention.
    public func tick() {
        let now = monotonicNanoseconds()
        let (deliveries, logsToSync) = state.withLock { state -> ([Outgoing], [PartitionLog]) in
            var deliveries: [Outgoing] = []
            for topic in state.topics.values {
                var letters: [(GroupState, [(Position, Int, String)])] = []
                for group in topic.groups.values {
                    var groupLetters: [(Position, Int, String)] = []
                    for (position, pending) in group.pending where pending.deadline <= now {
                        group.pending.removeValue(forKey: position)
                        group.members[pending.member]?.inFlight -= 1
                        if pending.attempt >= Int(group.options.maxDeliveries) {
                            group.release(pending.key)
                            groupLetters.append(
                                (
                                    position, pending.attempt,
                                    "ack wait of \(group.options.ackWaitMilliseconds) ms expired"
                                ))
                        } else {
                            let backoff = group.options.backoffMilliseconds
                            let delay = backoff.isEmpty ? 0 : backoff[min(pending.attempt - 1, backoff.count - 1)]
                            group.redeliveries.append(
                                Redelivery(
                                    due: now + UInt64(delay) * 1_000_000, position: position, attempt: pending.attempt))
                        }
                    }
                    if !groupLetters.isEmpty { letters.append((group, groupLetters)) }
                }
                for (group, groupLetters) in letters {
                    var settled: [Position] = []
                    deadLetter(groupLetters, topic: topic, group: group, state: &state, settled: &settled)
                    try? state.journal.append([.settled(topic: topic.name, group: group.name, positions: settled)])
                    state.journalDirty = true
                }
                let due = topic.groups.values.contains { group in
                    !group.memberOrder.isEmpty
                        && (group.redeliveries.contains { $0.due <= now }
                            || zip(group.cursors, topic.partitions).contains { $0.0 < $0.1.visible })
                }
                if due || !letters.isEmpty { pump(topic, now: now, into: &deliveries) }
            }
            let buffered = pendingJournal.withLock { entries -> [JournalEntry] in
                defer { entries = [] }
                return entries
            }
            if !buffered.isEmpty {
                try? state.journal.append(buffered)
                state.journalDirty = true
            }
            if now &- state.lastRetention > 10_000_000_000 {
                state.lastRetention = now
                enforceRetention(&state)
            }
            compactJournalIfNeeded(&state)
            var toSync: [PartitionLog] = []
            if state.journalDirty && configuration.fsync != .none { toSync.append(state.journal.log) }
            state.journalDirty = false
            // `fsync: interval`: every partition written since the last interval is synced now.
            if case .interval(let interval) = configuration.fsync,
                now &- state.lastIntervalSync >= UInt64(interval.nanoseconds)
            {
                state.lastIntervalSync = now
                for topic in state.topics.values {
                    for partition in topic.partitions where partition.log.durableOffset < partition.log.nextOffset {
                        toSync.append(partition.log)
                    }
                }
            }
            return (deliveries, toSync)
        }
        hand(deliveries)
        for log in logsToSync { commit.whenDurable(log, through: log.nextOffset) { _ in } }
    }

    private func enforceRetention(_ state: inout State) {
        let now = Int64(wallClockMilliseconds())
        for topic in state.topics.values {
            for (index, partition) in topic.partitions.enumerated() {
                let start = partition.log.enforceRetention(nowMilliseconds: now)
                for group in topic.groups.values where group.cursors[index] < start {
                    group.cursors[index] = start
                }
            }
        }
    }

    /// Rewrites the journal as a snapshot of the current metadata once it has grown past the limit.
    private func compactJournalIfNeeded(_ state: inout State) {
        // Past the limit, and at least twice what the last snapshot took (a snapshot larger than the limit must not
        // be rewritten on every tick).
        let size = state.journal.log.sizeInBytes
        guard size > configuration.journalCompactionBytes, size > 2 * state.journalSnapshotBytes else { return }
        do {
            state.journal = try state.journal.compacted(
                into: snapshot(state), dataDirectory: configuration.dataDirectory)
            state.journalSnapshotBytes = state.journal.log.sizeInBytes
        } catch {
            logger.error("journal compaction failed; the old journal stays", metadata: ["error": "\(error)"])
        }
    }

    /// The journal entries that recreate the current metadata.
    private func snapshot(_ state: State) -> [JournalEntry] {
        var entries: [JournalEntry] = []
        for topic in state.topics.values {
            entries.append(
                .topicCreated(name: topic.name, partitions: topic.partitions.count, retention: topic.retention))
            for group in topic.groups.values {
                let floors = group.floors()
                entries.append(
                    .groupCreated(topic: topic.name, group: group.name, options: group.options, cursors: floors))
                var settled: [Position] = []
                let unsettled = group.unsettled()
                for partition in floors.indices {
                    for offset in floors[partition]..<group.cursors[partition] {
                        let position = Position(partition: partition, offset: offset)
                        if !unsettled.contains(position) { settled.append(position) }
                    }
                    for offset in group.settledAhead[partition] {
                        settled.append(Position(partition: partition, offset: offset))
                    }
                }
                if !settled.isEmpty {
                    entries.append(.settled(topic: topic.name, group: group.name, positions: settled))
                }
                // Attempt 1 is what an unrecorded delivery counts as; only later attempts need a record.
                for (position, pending) in group.pending where pending.attempt > 1 {
                    entries.append(
                        .attempt(topic: topic.name, group: group.name, position: position, attempt: pending.attempt))
                }
                for redelivery in group.redeliveries where redelivery.attempt > 0 {
                    entries.append(
                        .attempt(
                            topic: topic.name, group: group.name, position: redelivery.position,
                            attempt: redelivery.attempt))
                }
                for (position, attempt) in group.priorAttempts {
                    entries.append(.attempt(topic: topic.name, group: group.name, position: position, attempt: attempt))
                }
            }
        }
        return entries
    }

    // MARK: Groups and dead letters

    public func groups(topic name: String) -> [GroupInfo] {
        state.withLock { state in
            guard let topic = state.topics[name] else { return [] }
            return topic.groups.values.sorted { $0.name < $1.name }.map { groupInfo(topic, $0) }
        }
    }

    public func allGroups() -> [GroupInfo] {
        state.withLock { state in
            state.topics.values.sorted { $0.name < $1.name }.flatMap { topic in
                topic.groups.values.sorted { $0.name < $1.name }.map { groupInfo(topic, $0) }
            }
        }
    }

    private func groupInfo(_ topic: TopicState, _ group: GroupState) -> GroupInfo {
        let lag = zip(topic.partitions, group.cursors).reduce(Int64(0)) { $0 + max(0, $1.0.log.nextOffset - $1.1) }
        return GroupInfo(
            topic: topic.name, group: group.name, lag: lag, pending: group.pending.count + group.redeliveries.count,
            delivered: group.delivered, redelivered: group.redelivered, deadLettered: group.deadLettered,
            acked: group.acked, members: group.members.count)
    }

    public func deleteGroup(topic: String, group: String) throws(BrokerError) {
        try state.withLock { state throws(BrokerError) in
            guard state.topics[topic]?.groups.removeValue(forKey: group) != nil else {
                throw BrokerError(.notFound, "no group '\(group)' on topic '\(topic)'")
            }
            try? state.journal.append([.groupDeleted(topic: topic, group: group)])
            state.journalDirty = true
        }
    }

    /// Dead letters of a topic, oldest first (from `<topic>.dlq`).
    public func deadLetters(topic: String, limit: Int = 100) throws(BrokerError) -> [CloudEvent] {
        let log = state.withLock { $0.topics[topic + ".dlq"]?.partitions.first?.log }
        guard let log else { return [] }
        do {
            return try log.read(from: log.startOffset, maxRecords: limit, maxBytes: 16 << 20).compactMap {
                try? BinaryEvent.decode(WireEvent(headers: $0.headers, data: $0.payload))
            }
        } catch {
            throw BrokerError(.storage, "cannot read dead letters: \(error.message)")
        }
    }

    /// Publishes dead letters not yet replayed back to their topic (without the dead-letter extensions and past the
    /// dedup table); returns how many. The replay position is kept as the `_replay` cursor, so each is replayed once.
    public func replayDeadLetters(topic name: String, limit: Int = 1000) async throws(BrokerError) -> Int {
        let (events, waits) = try state.withLock {
            state throws(BrokerError) -> ([WireEvent], [(PartitionState, Int64)]) in
            guard let dlq = state.topics[name + ".dlq"], let log = dlq.partitions.first?.log else { return ([], []) }
            let topic = try topicLocked(name, state: &state)
            let marker =
                dlq.groups["_replay"]
                ?? GroupState(
                    name: "_replay",
                    options: GroupOptions(
                        ackWaitMilliseconds: 1, maxDeliveries: 1, backoffMilliseconds: [], ordered: false),
                    cursors: [log.startOffset])
            let records: [LogRecord]
            do {
                records = try log.read(from: max(marker.cursors[0], log.startOffset), maxRecords: limit)
            } catch {
                throw BrokerError(.storage, "cannot read dead letters: \(error)")
            }
            guard let last = records.last else { return ([], []) }
            var events: [WireEvent] = []
            var summaries: [EventSummary] = []
            for record in records {
                guard var event = try? BinaryEvent.decode(WireEvent(headers: record.headers, data: record.payload))
                else { continue }
                for name in ["deadletterreason", "deliveryattempts", "deadlettergroup"] {
                    event.extensions.removeValue(forKey: name)
                }
                guard let wire = try? BinaryEvent.encode(event), let summary = try? BinaryEvent.summary(wire.headers)
                else { continue }
                events.append(wire)
                summaries.append(summary)
            }
            let (_, waits) = try appendLocked(topic, events, summaries, dedupGroup: { _ in nil }, bypassDedup: true)
            if dlq.groups["_replay"] == nil {
                try? state.journal.append([
                    .groupCreated(
                        topic: dlq.name, group: "_replay", options: marker.options, cursors: [last.offset + 1])
                ])
                dlq.groups["_replay"] = marker
            } else {
                try? state.journal.append([
                    .settled(
                        topic: dlq.name, group: "_replay",
                        positions: records.map { Position(partition: 0, offset: $0.offset) })
                ])
            }
            marker.cursors[0] = last.offset + 1
            state.journalDirty = true
            if configuration.fsync != .always {
                for (partition, _) in waits { partition.visible = partition.log.nextOffset }
            }
            return (events, waits)
        }
        defer { release(waits) }
        if configuration.fsync == .always {
            try await waitDurable(waits, topic: name)
        } else {
            makeVisible(topic: name)
        }
        return events.count
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

    /// Stops accepting work, syncs and closes every log.
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
    }

    /// Counters for tests and benchmarks: members' unsettled deliveries per group.
    public func inFlight(topic: String, group: String) -> Int {
        state.withLock { $0.topics[topic]?.groups[group]?.pending.count ?? 0 }
    }
}
