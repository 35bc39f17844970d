import DequeModule
import Foundation
import Herald
import HeraldLog
import HeraldWire
import Logging
import ServiceLifecycle
import Synchronization

extension Broker {
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
            completion(.success(positions))
            return
        }
        whenDurable(waits, topic: name) { failure in
            completion(failure.map { .failure($0) } ?? .success(positions))
        }
    }

    func validate(_ events: [WireEvent], topic name: String) throws(BrokerError) -> [EventSummary] {
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

    /// Calls `completion` once every touched partition is durable (or failed); consumers see the records, and the
    /// partitions' publish admission is released, as soon as the fsync returns, before the publisher hears back.
    /// Never call it under the broker's lock: an already durable partition completes at once.
    func whenDurable(
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
                makeVisible(topic: name, releasing: waits)
                completion(
                    failure.map {
                        BrokerError(.unavailable, "the partition could not make the events durable: \($0)")
                    })
            }
        }
    }

    /// Waits until every touched partition is durable.
    func waitDurable(_ waits: [(PartitionState, Int64)], topic name: String) async throws(BrokerError) {
        let failure = await withCheckedContinuation { (continuation: CheckedContinuation<BrokerError?, Never>) in
            whenDurable(waits, topic: name) { continuation.resume(returning: $0) }
        }
        if let failure { throw failure }
    }

    /// After a group commit: consumers may now see what is durable, and the publishes that waited for it no longer
    /// count against their partitions' admission limit.
    func makeVisible(topic name: String, releasing waits: [(PartitionState, Int64)] = []) {
        let deliveries = state.withLock { state -> [Outgoing] in
            for (partition, _) in waits { partition.unacknowledged -= 1 }
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
    func appendLocked(
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
            let partition = PartitionHash.partition(
                forKey: summary.partitionKey, count: topic.partitions.count, roundRobin: &topic.roundRobin)
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
            // Only publishes that wait for an fsync are held back by the admission limit.
            if configuration.fsync == .always { topic.partitions[index].unacknowledged += 1 }
            waits.append((topic.partitions[index], offset))
        }
        return (positions.map { $0! }, waits)
    }
}
