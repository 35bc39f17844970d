import ArgumentParser
import Foundation
import HeraldBroker
import Logging
import ServiceLifecycle
import UnixSignals

/// A `HOST:PORT` pair.
struct Address: ExpressibleByArgument, CustomStringConvertible, Sendable {
    let host: String
    let port: Int

    init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    init?(argument: String) {
        guard let colon = argument.lastIndex(of: ":"), let port = Int(argument[argument.index(after: colon)...]),
            (0...65535).contains(port)
        else { return nil }
        host = String(argument[..<colon])
        self.port = port
    }

    var description: String { "\(host):\(port)" }
}

/// Where a setting comes from: the flag, then the environment variable, then the config file, then the default.
struct Settings {
    let file: [String: String]

    init(configFile: String?) throws {
        guard let configFile else {
            file = [:]
            return
        }
        guard let text = try? String(contentsOfFile: configFile, encoding: .utf8) else {
            throw ValidationError("cannot read the config file \(configFile)")
        }
        var values: [String: String] = [:]
        for (number, line) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let content = line.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false)[0]
                .trimmingCharacters(in: .whitespaces)
            guard !content.isEmpty else { continue }
            guard let equals = content.firstIndex(of: "=") else {
                throw ValidationError("\(configFile):\(number + 1): expected 'key = value'")
            }
            values[content[..<equals].trimmingCharacters(in: .whitespaces)] =
                content[content.index(after: equals)...].trimmingCharacters(in: .whitespaces)
        }
        file = values
    }

    /// The value for `key` (config file key, e.g. `data-dir`; environment `HERALD_DATA_DIR`).
    func value(_ flag: String?, _ key: String) -> String? {
        if let flag { return flag }
        let variable = "HERALD_" + key.uppercased().replacingOccurrences(of: "-", with: "_")
        if let environment = ProcessInfo.processInfo.environment[variable] { return environment }
        return file[key]
    }
}

struct ServeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Run the Herald broker: a durable event log served over TCP.",
        discussion: """
            Every setting can also come from the environment (HERALD_DATA_DIR, HERALD_TCP, HERALD_FSYNC, \
            HERALD_PARTITIONS, HERALD_SEGMENT_MB, HERALD_RETENTION_HOURS, HERALD_MAX_CONNECTIONS) or from a config \
            file of 'key = value' lines with the flag names as keys (data-dir = /var/lib/herald). Flags win over the \
            environment, which wins over the file. SIGINT or SIGTERM shuts down gracefully.
            """
    )

    @Option(help: "Data directory (default ./herald-data).") var dataDir: String?
    @Option(help: "TCP listen address (default 127.0.0.1:7420).") var tcp: String?
    @Option(help: "always (default: fsync before ack), interval:MS, or none.") var fsync: String?
    @Option(help: "Partitions of a topic created on first use (default 4).") var partitions: Int?
    @Option(help: "Segment size in MiB (default 64).") var segmentMb: Int?
    @Option(help: "Retention in hours (default 168).") var retentionHours: Int?
    @Option(help: "Maximum connections (default 1024).") var maxConnections: Int?
    @Option(help: "A config file of 'key = value' lines.") var config: String?
    @Option(help: "Log level: trace, debug, info, notice, warning, error.") var logLevel: String = "info"

    func run() async throws {
        let settings = try Settings(configFile: config)
        var configuration = BrokerConfiguration(dataDirectory: settings.value(dataDir, "data-dir") ?? "./herald-data")
        let tcpText = settings.value(tcp, "tcp") ?? "127.0.0.1:7420"
        guard let address = Address(argument: tcpText) else { throw ValidationError("--tcp must be HOST:PORT") }
        if let text = settings.value(fsync, "fsync") {
            guard let policy = FsyncPolicy(text) else {
                throw ValidationError("--fsync must be always, interval:MS or none, not '\(text)'")
            }
            configuration.fsync = policy
        }
        func number(_ flag: Int?, _ key: String) throws -> Int? {
            guard let text = settings.value(flag.map(String.init), key) else { return nil }
            guard let value = Int(text), value > 0 else { throw ValidationError("\(key) must be a positive number") }
            return value
        }
        if let value = try number(partitions, "partitions") { configuration.defaultPartitions = value }
        if let value = try number(segmentMb, "segment-mb") { configuration.segmentBytes = value << 20 }
        if let value = try number(retentionHours, "retention-hours") {
            configuration.retentionAge = .seconds(value * 3600)
        }
        if let value = try number(maxConnections, "max-connections") { configuration.maxConnections = value }
        var logger = Logger(label: "herald")
        logger.logLevel = Logger.Level(rawValue: logLevel) ?? .info
        let broker = try Broker(configuration: configuration, logger: logger)
        let server = BrokerServer(broker: broker, host: address.host, port: address.port, logger: logger)
        logger.info(
            "herald serve",
            metadata: [
                "data-dir": "\(configuration.dataDirectory)", "tcp": "\(address)", "fsync": "\(configuration.fsync)",
            ])
        let group = ServiceGroup(
            configuration: .init(
                services: [.init(service: broker), .init(service: server)],
                gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
    }
}
