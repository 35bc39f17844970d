import ArgumentParser
import Foundation
import Herald
import HeraldBroker
import HeraldClient
import HeraldWire
import NIOSSL

/// `--broker HOST:PORT` for every client command (environment HERALD_BROKER; default 127.0.0.1:7420).
struct BrokerOptions: ParsableArguments {
    @Option(help: "Broker address (default 127.0.0.1:7420, or HERALD_BROKER).") var broker: String?
    @Option(help: "Bearer token or JWT for a broker with auth (or HERALD_TOKEN).") var token: String?
    @Option(help: "Connect with TLS, trusting this CA file (PEM) (or HERALD_TLS_CA).") var tlsCa: String?

    func connect(as name: String) throws -> BrokerTransport {
        let environment = ProcessInfo.processInfo.environment
        let text = broker ?? environment["HERALD_BROKER"] ?? "127.0.0.1:7420"
        guard let address = Address(argument: text) else { throw ValidationError("--broker must be HOST:PORT") }
        var tls: TLSConfiguration?
        if let ca = tlsCa ?? environment["HERALD_TLS_CA"] {
            var configuration = TLSConfiguration.makeClientConfiguration()
            configuration.trustRoots = .file(ca)
            tls = configuration
        }
        return BrokerTransport(
            configuration: BrokerTransport.Configuration(
                host: address.host, port: address.port, clientName: name,
                credential: (token ?? environment["HERALD_TOKEN"]).map { .bearer($0) } ?? .none, tls: tls))
    }

    /// Runs an admin command and decodes its JSON result; a broker that cannot be reached fails within 10 s.
    func admin<T: Decodable>(_ command: String, _ arguments: [String: any Sendable] = [:], as: T.Type) async throws -> T
    {
        try JSONDecoder().decode(T.self, from: Data(try await admin(command, arguments)))
    }

    /// Runs an admin command; returns its JSON result as bytes.
    func admin(_ command: String, _ arguments: [String: any Sendable] = [:]) async throws -> [UInt8] {
        let transport = try connect(as: "herald-cli")
        defer { Task { await transport.shutdown() } }
        let json = try JSONSerialization.data(withJSONObject: arguments)
        return try await withTimeout(.seconds(10), "the broker did not answer") {
            try await transport.admin(command, arguments: Array(json))
        }
    }
}

struct CommandFailure: Error, CustomStringConvertible {
    let description: String
}

func withTimeout<T: Sendable>(_ limit: Duration, _ message: String, _ body: @escaping @Sendable () async throws -> T)
    async throws -> T
{
    try await withThrowingTaskGroup(of: T.self) { group in
        group.addTask { try await body() }
        group.addTask {
            try await Task.sleep(for: limit)
            throw CommandFailure(description: message)
        }
        defer { group.cancelAll() }
        return try await group.next()!
    }
}

struct PublishCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "publish", abstract: "Publish CloudEvents to a topic and print where each landed.")

    @OptionGroup var connection: BrokerOptions
    @Option(help: "Topic.") var topic: String
    @Option(help: "CloudEvents type.") var type: String
    @Option(help: "CloudEvents source.") var source = "herald-cli"
    @Option(help: "Event data (JSON unless --content-type says otherwise).") var data: String?
    @Option(help: "datacontenttype (default application/json when there is data).") var contentType: String?
    @Option(help: "Partition key.") var key: String?
    @Option(help: "Subject.") var subject: String?
    @Option(help: "Event id (default: a new UUIDv7; with --count, a suffix -N is added).") var id: String?
    @Option(help: "How many events to publish (in one batch).") var count = 1

    func run() async throws {
        let transport = try connection.connect(as: "herald-publish")
        defer { Task { await transport.shutdown() } }
        let events = (0..<max(1, count)).map { index -> CloudEvent in
            var event = CloudEvent(
                id: id.map { EventID(count > 1 ? "\($0)-\(index)" : $0) } ?? EventID(), source: source, type: type,
                data: data.map { .bytes(Array($0.utf8)) } ?? .none)
            event.datacontenttype = contentType ?? (data == nil ? nil : "application/json")
            event.partitionkey = key
            event.subject = subject
            return event
        }
        let acks = try await withTimeout(.seconds(30), "the broker did not acknowledge in 30 s") {
            try await transport.publish(events, to: topic)
        }
        for ack in acks {
            print(
                "{\"id\":\"\(ack.id)\",\"partition\":\(ack.partition),\"offset\":\(ack.offset),\"duplicate\":\(ack.duplicate)}"
            )
        }
    }
}

struct TailCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tail",
        abstract: "Follow a topic: print each event as structured CloudEvents JSON, one per line.",
        discussion: """
            With --group, consumes as a member of that consumer group (acking what it printed). Without, reads \
            through a throwaway group from --from (earliest, latest, offset:N or time:UNIX_MS), deleted on exit.
            """)

    @OptionGroup var connection: BrokerOptions
    @Option(help: "Topic.") var topic: String
    @Option(help: "Consumer group to join.") var group: String?
    @Option(help: "earliest, latest (default), offset:N or time:UNIX_MS.") var from = "latest"
    @Option(help: "Stop after this many events.") var count: Int?
    @Flag(help: "Do not ack (the events stay pending and are redelivered).") var noAck = false

    func run() async throws {
        guard let start = WireStart(parsing: from) else {
            throw ValidationError("--from must be earliest, latest, offset:N or time:UNIX_MS")
        }
        let transport = try connection.connect(as: "herald-tail")
        let groupName = group ?? "tail-\(UInt32.random(in: 0...UInt32.max))"
        var options = SubscribeOptions(ackWait: .seconds(30))
        options.maxInFlight = 256
        let stream = try await transport.subscribe(topic: topic, group: groupName, options: options, start: start)
        var printed = 0
        for try await delivery in stream {
            print(String(decoding: try CloudEventJSON.encode(delivery.event), as: UTF8.self))
            if !noAck { try await delivery.ack() }
            printed += 1
            if let count, printed >= count { break }
        }
        if group == nil {
            let json = try JSONSerialization.data(withJSONObject: ["topic": topic, "group": groupName])
            _ = try? await transport.admin("groups.delete", arguments: Array(json))
        }
        await transport.shutdown()
    }
}

struct TopicsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "topics", abstract: "List, create, describe and delete topics.",
        subcommands: [List.self, Create.self, Configure.self, Describe.self, Delete.self], defaultSubcommand: List.self)

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List topics.")
        @OptionGroup var connection: BrokerOptions

        func run() async throws {
            let topics = try await connection.admin("topics.list", as: [TopicInfo].self)
            print(row("TOPIC", "PARTITIONS", "EVENTS", "BYTES", "GROUPS"))
            for topic in topics {
                let events = zip(topic.endOffsets, topic.startOffsets).reduce(Int64(0)) { $0 + $1.0 - $1.1 }
                print(
                    row(
                        topic.name, "\(topic.partitions)", "\(events)", "\(topic.bytes)",
                        topic.groups.joined(separator: ",")))
            }
        }
    }

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create a topic.")
        @OptionGroup var connection: BrokerOptions
        @Argument var name: String
        @Option var partitions: Int?
        @Option(help: "Retention in hours.") var retentionHours: Int?
        @Option(help: "Retention in bytes per partition.") var retentionBytes: Int?

        func run() async throws {
            var arguments: [String: any Sendable] = ["name": name]
            if let partitions { arguments["partitions"] = partitions }
            if let retentionHours { arguments["retentionSeconds"] = retentionHours * 3600 }
            if let retentionBytes { arguments["retentionBytes"] = retentionBytes }
            let topic = try await connection.admin("topics.create", arguments, as: TopicInfo.self)
            print("topic \(topic.name): \(topic.partitions) partitions")
        }
    }

    struct Configure: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Change a topic's retention (a limit left out is removed).")
        @OptionGroup var connection: BrokerOptions
        @Argument var name: String
        @Option(help: "Retention in hours.") var retentionHours: Int?
        @Option(help: "Retention in bytes per partition.") var retentionBytes: Int?

        func run() async throws {
            var arguments: [String: any Sendable] = ["name": name]
            if let retentionHours { arguments["retentionSeconds"] = retentionHours * 3600 }
            if let retentionBytes { arguments["retentionBytes"] = retentionBytes }
            let topic = try await connection.admin("topics.configure", arguments, as: TopicInfo.self)
            print(
                "topic \(topic.name): retention \(topic.retentionSeconds.map { "\($0 / 3600) h" } ?? "unlimited"), "
                    + "\(topic.retentionBytes.map { "\($0) bytes" } ?? "unlimited")")
        }
    }

    struct Describe: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Describe a topic's partitions.")
        @OptionGroup var connection: BrokerOptions
        @Argument var name: String

        func run() async throws {
            let topic = try await connection.admin("topics.describe", ["name": name], as: TopicInfo.self)
            print("topic \(topic.name), \(topic.bytes) bytes, groups: \(topic.groups.joined(separator: ", "))")
            print(row("PARTITION", "START", "END"))
            for index in 0..<topic.partitions {
                print(row("\(index)", "\(topic.startOffsets[index])", "\(topic.endOffsets[index])"))
            }
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Delete a topic and its groups.")
        @OptionGroup var connection: BrokerOptions
        @Argument var name: String

        func run() async throws {
            struct Empty: Decodable {}
            _ = try await connection.admin("topics.delete", ["name": name], as: Empty.self)
            print("deleted \(name)")
        }
    }
}

struct GroupsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "groups", abstract: "Consumer groups: lag, pending, redelivered, dead-lettered.")
    @OptionGroup var connection: BrokerOptions
    @Option(help: "Only this topic's groups.") var topic: String?

    func run() async throws {
        var arguments: [String: any Sendable] = [:]
        if let topic { arguments["topic"] = topic }
        let groups = try await connection.admin("groups.list", arguments, as: [GroupInfo].self)
        print(row("TOPIC", "GROUP", "MEMBERS", "LAG", "PENDING", "DELIVERED", "REDELIVERED", "DEAD", "ACKED"))
        for group in groups {
            print(
                row(
                    group.topic, group.group, "\(group.members)", "\(group.lag)", "\(group.pending)",
                    "\(group.delivered)", "\(group.redelivered)", "\(group.deadLettered)", "\(group.acked)"))
        }
    }
}

struct DeadLettersCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dlq", abstract: "Dead letters of a topic: list them, replay them.",
        subcommands: [List.self, Replay.self], defaultSubcommand: List.self)

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print dead letters as CloudEvents JSON.")
        @OptionGroup var connection: BrokerOptions
        @Option var topic: String
        @Option var limit = 100

        func run() async throws {
            let result = try await connection.admin("dlq.list", ["topic": topic, "limit": limit])
            for event in try CloudEventJSON.decodeBatch(result) {
                print(String(decoding: try CloudEventJSON.encode(event), as: UTF8.self))
            }
        }
    }

    struct Replay: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Publish dead letters back to their topic, once.")
        @OptionGroup var connection: BrokerOptions
        @Option var topic: String
        @Option var limit = 1000

        func run() async throws {
            struct Replayed: Decodable { var replayed: Int }
            let result = try await connection.admin(
                "dlq.replay", ["topic": topic, "limit": limit], as: Replayed.self)
            print("replayed \(result.replayed) dead letters to \(topic)")
        }
    }
}

func row(_ columns: String...) -> String {
    zip(columns, [28, 24, 10, 10, 10, 10, 12, 8, 8]).map { pad($0, $1) }.joined(separator: " ")
}
