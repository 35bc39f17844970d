import ArgumentParser
import Herald
import HeraldClient
import HeraldHTTP
import Logging
import OrderSystem
import ServiceLifecycle
import UnixSignals

/// One order-system service in its own process, connected to a broker: what `herald demo` starts four of.
struct ServiceCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "service",
        abstract: "Run one order-system service (orders, payments, shipping, notifications) against a broker.")

    @Argument(help: "orders, payments, shipping or notifications.") var name: String
    @OptionGroup var connection: BrokerOptions
    @Option(help: "Use only the broker's HTTP API at this URL (push group in, HTTP publish out) instead of TCP.")
    var http: String?
    @Option(help: "Topic the order system uses.") var topic = "orders"
    @Option(help: "Seed that decides which payments fail (payments).") var seed: UInt64 = 42
    @Option(help: "Percentage of payments that fail (payments).") var failPercent = 10

    func validate() throws {
        guard OrderServices.names.contains(name) else {
            throw ValidationError("unknown service '\(name)'; one of \(OrderServices.names.joined(separator: ", "))")
        }
    }

    func run() async throws {
        let transport: any EventTransport =
            try http.map { HTTPTransport(configuration: .init(broker: $0, token: connection.token)) }
            ?? connection.connect(as: name)
        let bus = OrderDemo.makeServiceBus(name, transport: transport, topic: topic)
        let service = OrderServices.start(
            name, on: bus, gateway: PaymentGateway(seed: seed, failurePercent: failPercent))
        var logger = Logger(label: "herald.\(name)")
        logger.logLevel = .notice
        try await bus.start()
        print("service \(name) ready")
        let group = ServiceGroup(
            configuration: .init(
                services: [.init(service: bus)], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
        await transport.shutdown()
        withExtendedLifetime(service) {}
    }
}
