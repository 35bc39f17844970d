import DequeModule
import Foundation
import Herald
import HeraldLog
import HeraldWire
import Logging
import ServiceLifecycle
import Synchronization

extension Broker {
    static func recover(
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
            case .groupConfigured(let topic, let group, let options):
                state.topics[topic]?.groups[group]?.options = options
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

    static func openTopic(
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
    static func rebuildDedup(_ topic: TopicState, window: Duration) throws {
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
                        let letter = try? BinaryEvent.decode(WireEvent(headers: record.headers, data: record.payload)),
                        case .string(let name)? = letter[extension: "deadlettergroup"],
                        case .string(let position)? = letter[extension: "deadletterposition"]
                    {
                        group = Broker.deadLetterKey(group: name, position: position)
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
}
