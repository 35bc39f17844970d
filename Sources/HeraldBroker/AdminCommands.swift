import Foundation
import Herald
import HeraldAuth

/// The administrative commands, shared by every interface (TCP now, HTTP later): JSON in, JSON out.
///
/// | command | arguments | result |
/// |---|---|---|
/// | `topics.list` | — | `[TopicInfo]` |
/// | `topics.create` | `{"name", "partitions"?, "retentionSeconds"?, "retentionBytes"?}` | `TopicInfo` |
/// | `topics.configure` | `{"name", "retentionSeconds"?, "retentionBytes"?}` | `TopicInfo` |
/// | `topics.describe` | `{"name"}` | `TopicInfo` |
/// | `topics.delete` | `{"name"}` | `{}` |
/// | `groups.list` | `{"topic"?}` | `[GroupInfo]` |
/// | `groups.delete` | `{"topic", "group"}` | `{}` |
/// | `dlq.list` | `{"topic", "limit"?}` | structured CloudEvents batch |
/// | `dlq.replay` | `{"topic", "limit"?}` | `{"replayed": N}` |
///
/// Every command needs the `admin` permission on its topic; the list commands need `admin` on some topic and
/// show only the topics it covers.
public enum AdminCommand {
    struct Arguments: Codable {
        var name: String?
        var topic: String?
        var group: String?
        var partitions: Int?
        var retentionSeconds: Int?
        var retentionBytes: Int?
        var limit: Int?
    }

    struct Replayed: Codable {
        var replayed: Int
    }

    struct Empty: Codable {}

    /// Runs `command` for `principal`; throws `AuthError` when it may not, `BrokerError` when it fails.
    public static func run(
        _ command: String, arguments: [UInt8], on broker: Broker, as principal: Principal = .anonymous
    ) async throws -> [UInt8] {
        let args: Arguments
        do {
            args = arguments.isEmpty ? Arguments() : try JSONDecoder().decode(Arguments.self, from: Data(arguments))
        } catch {
            throw BrokerError(.invalidRequest, "the arguments of '\(command)' are not valid JSON: \(error)")
        }
        func required(_ value: String?, _ name: String) throws(BrokerError) -> String {
            guard let value else { throw BrokerError(.invalidRequest, "'\(command)' needs \"\(name)\"") }
            return value
        }
        if let topic = args.name ?? args.topic {
            try principal.require(.admin, on: topic)
        } else {
            try principal.requireAny(.admin)
        }
        let visible = { (topic: String) in principal.permissions.allows(.admin, on: topic) }
        switch command {
        case "topics.list":
            return try encode(broker.topics().filter { visible($0.name) })
        case "topics.create":
            let retention =
                args.retentionSeconds != nil || args.retentionBytes != nil
                ? TopicRetention(maxAge: args.retentionSeconds.map { .seconds($0) }, maxBytes: args.retentionBytes)
                : nil
            return try encode(
                try broker.createTopic(
                    try required(args.name, "name"), partitions: args.partitions, retention: retention))
        case "topics.configure":
            return try encode(
                try broker.configureTopic(
                    try required(args.name, "name"),
                    retention: TopicRetention(
                        maxAge: args.retentionSeconds.map { .seconds($0) }, maxBytes: args.retentionBytes)))
        case "topics.describe":
            let name = try required(args.name, "name")
            guard let info = broker.topic(name) else { throw BrokerError(.notFound, "no topic '\(name)'") }
            return try encode(info)
        case "topics.delete":
            try broker.deleteTopic(try required(args.name, "name"))
            return try encode(Empty())
        case "groups.list":
            return try encode(
                args.topic.map { broker.groups(topic: $0) } ?? broker.allGroups().filter { visible($0.topic) })
        case "groups.delete":
            try broker.deleteGroup(topic: try required(args.topic, "topic"), group: try required(args.group, "group"))
            return try encode(Empty())
        case "dlq.list":
            let letters = try broker.deadLetters(topic: try required(args.topic, "topic"), limit: args.limit ?? 100)
            do {
                return try CloudEventJSON.encodeBatch(letters)
            } catch {
                throw BrokerError(.storage, "a dead letter cannot be shown as JSON: \(error)")
            }
        case "dlq.replay":
            let count = try await broker.replayDeadLetters(
                topic: try required(args.topic, "topic"), limit: args.limit ?? 1000)
            return try encode(Replayed(replayed: count))
        default:
            throw BrokerError(.invalidRequest, "unknown command '\(command)'")
        }
    }

    static func encode(_ value: some Encodable) throws(BrokerError) -> [UInt8] {
        do {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys]
            return Array(try encoder.encode(value))
        } catch {
            throw BrokerError(.storage, "cannot encode the result: \(error)")
        }
    }
}
