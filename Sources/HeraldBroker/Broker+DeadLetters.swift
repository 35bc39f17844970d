import DequeModule
import Foundation
import Herald
import HeraldLog
import HeraldWire
import Logging
import ServiceLifecycle
import Synchronization

extension Broker {
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

    func groupInfo(_ topic: TopicState, _ group: GroupState) -> GroupInfo {
        let lag = zip(topic.partitions, group.cursors).reduce(Int64(0)) { $0 + max(0, $1.0.log.nextOffset - $1.1) }
        return GroupInfo(
            topic: topic.name, group: group.name, lag: lag, pending: group.pending.count + group.redeliveries.count,
            delivered: group.delivered, redelivered: group.redelivered, deadLettered: group.deadLettered,
            acked: group.acked, members: group.members.count, ackWaitMs: group.options.ackWaitMilliseconds,
            maxDeliver: group.options.maxDeliveries, backoffMs: group.options.backoffMilliseconds,
            ordered: group.options.ordered, pushURL: group.options.pushURL)
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
                for name in ["deadletterreason", "deliveryattempts", "deadlettergroup", "deadletterposition"] {
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
        if configuration.fsync == .always {
            try await waitDurable(waits, topic: name)
        } else {
            makeVisible(topic: name)
        }
        return events.count
    }
}
