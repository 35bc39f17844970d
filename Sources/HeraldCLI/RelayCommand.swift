import ArgumentParser
import Foundation
import Herald
import HeraldNATS
import HeraldPostgres
import Logging
import PostgresNIO
import ServiceLifecycle
import UnixSignals

/// An outbox relay in a process of its own: publishes the committed events of a PostgreSQL outbox to the broker
/// (TCP) or to NATS JetStream until SIGTERM or SIGINT. Run several for availability: they share the outbox's slots.
struct RelayCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "relay",
        abstract: "Publish a PostgreSQL outbox's committed events to the broker or to NATS JetStream.")

    @Option(help: "The outbox's database: postgres://USER[:PASSWORD]@HOST:PORT/DB (or HERALD_POSTGRES_URL).")
    var postgres: String?
    @Option(help: "The schema of the outbox table (default: the server's search_path).") var schema: String?
    @OptionGroup var connection: BrokerOptions
    @Option(help: "Publish to NATS JetStream at this URL (nats://HOST:PORT[,HOST:PORT…]) instead of the broker.")
    var nats: String?
    @Option(help: "Rows published per round.") var batchSize = 500
    @Option(help: "Milliseconds between polls when no commit is notified.") var pollMs = 25
    @Option(help: "Log level: trace, debug, info, notice, warning, error.") var logLevel = "notice"

    /// --postgres, else HERALD_POSTGRES_URL.
    var url: PostgresURL? {
        (postgres ?? ProcessInfo.processInfo.environment["HERALD_POSTGRES_URL"]).flatMap(PostgresURL.init)
    }

    func validate() throws {
        guard url != nil else {
            throw ValidationError("--postgres must be a URL such as postgres://user@127.0.0.1:5432/db")
        }
        if let nats, NATSTransport.Configuration(url: nats) == nil {
            throw ValidationError("--nats must be a URL such as nats://127.0.0.1:4222")
        }
        guard batchSize > 0, pollMs > 0 else { throw ValidationError("--batch-size and --poll-ms must be positive") }
    }

    func run() async throws {
        var logger = Logger(label: "herald.relay")
        logger.logLevel = Logger.Level(rawValue: logLevel) ?? .notice
        guard let url = self.url else { throw ValidationError("--postgres is needed") }
        let transport: any EventTransport =
            if let nats, let configuration = NATSTransport.Configuration(url: nats) {
                NATSTransport(configuration: configuration, logger: logger)
            } else {
                try connection.connect(as: "outbox-relay")
            }
        var postgres = try url.connectionConfiguration()
        if let schema { postgres.options.additionalStartupParameters = [("search_path", schema)] }
        let relay = OutboxRelay(
            configuration: .init(postgres: postgres, batchSize: batchSize, pollInterval: .milliseconds(pollMs)),
            transport: transport, logger: logger)
        print("relay ready: \(url) → \(nats ?? "the broker")")
        let group = ServiceGroup(
            configuration: .init(
                services: [.init(service: relay)], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
        await transport.shutdown()
        print("relay stopped: \(relay.stats.published) events published")
    }
}
