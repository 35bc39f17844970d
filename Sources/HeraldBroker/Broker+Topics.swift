import DequeModule
import Foundation
import Herald
import HeraldLog
import HeraldWire
import Logging
import ServiceLifecycle
import Synchronization

extension Broker {
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

    func topicLocked(
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

    func info(_ topic: TopicState) -> TopicInfo {
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
}
