import ArgumentParser
import Foundation
import HeraldAuth
import HeraldBroker
import HeraldHTTP
import Logging
import NIOSSL
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
    @Option(help: "HTTP listen address (default 127.0.0.1:7480; 'off' disables the HTTP API).") var http: String?
    @Option(help: "Auth file (JSON: static tokens and JWT keys); with it every request needs a credential.")
    var auth: String?
    @Option(help: "TLS certificate chain (PEM) for TCP and HTTP.") var tlsCert: String?
    @Option(help: "TLS private key (PEM).") var tlsKey: String?
    @Option(help: "CA (PEM) that client certificates must chain to: mutual TLS.") var tlsClientCa: String?
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
        let httpText = settings.value(http, "http") ?? "127.0.0.1:7480"
        let httpAddress = httpText == "off" ? nil : Address(argument: httpText)
        guard httpText == "off" || httpAddress != nil else { throw ValidationError("--http must be HOST:PORT or off") }
        var authenticator: Authenticator?
        if let file = settings.value(auth, "auth") {
            authenticator = try await Authenticator(try AuthConfiguration.load(file: file))
        }
        let tls = try TLSSettings(
            certificate: settings.value(tlsCert, "tls-cert"), key: settings.value(tlsKey, "tls-key"),
            clientCA: settings.value(tlsClientCa, "tls-client-ca")
        ).serverConfiguration()
        let broker = try Broker(configuration: configuration, logger: logger)
        let server = BrokerServer(
            broker: broker, host: address.host, port: address.port, authenticator: authenticator,
            tls: try tls.map { try NIOSSLContext(configuration: $0) }, logger: logger)
        var services: [ServiceGroupConfiguration.ServiceConfiguration] = [
            .init(service: broker), .init(service: server),
        ]
        if let httpAddress {
            services.append(
                .init(
                    service: HTTPServer(
                        broker: broker, host: httpAddress.host, port: httpAddress.port, authenticator: authenticator,
                        tls: tls, logger: logger)))
        }
        logger.info(
            "herald serve",
            metadata: [
                "data-dir": "\(configuration.dataDirectory)", "tcp": "\(address)", "http": "\(httpText)",
                "fsync": "\(configuration.fsync)", "auth": "\(authenticator != nil ? "on" : "off")",
                "tls": "\(tls != nil ? "on" : "off")",
            ])
        let group = ServiceGroup(
            configuration: .init(
                services: services,
                gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
    }
}

/// TLS files for the servers: a certificate chain and key, and optionally a CA for client certificates.
struct TLSSettings {
    var certificate: String?
    var key: String?
    var clientCA: String?

    func serverConfiguration() throws -> TLSConfiguration? {
        guard certificate != nil || key != nil else {
            guard clientCA == nil else { throw ValidationError("--tls-client-ca needs --tls-cert and --tls-key") }
            return nil
        }
        guard let certificate, let key else { throw ValidationError("TLS needs both --tls-cert and --tls-key") }
        var configuration = TLSConfiguration.makeServerConfiguration(
            certificateChain: try NIOSSLCertificate.fromPEMFile(certificate).map { .certificate($0) },
            privateKey: .privateKey(try NIOSSLPrivateKey(file: key, format: .pem)))
        if let clientCA {
            configuration.trustRoots = .file(clientCA)
            configuration.certificateVerification = .noHostnameVerification
        }
        return configuration
    }
}
