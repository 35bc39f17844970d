import ArgumentParser
import Herald
import HeraldNATS
import HeraldPostgres
import OrderSystem

#if canImport(Glibc)
    import Glibc
#endif

struct DemoCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "Run the order system end to end and check every order's final state.",
        discussion: "Exits 0 only if every order reached the right final state and every customer was notified once."
    )

    @Option(help: "Number of orders.") var orders = 1000
    @Option(help: "Seed that decides which payments fail.") var seed: UInt64 = 42
    @Option(help: "Percentage of orders whose payment fails.") var failPercent = 10
    @Option(
        help: """
            broker (default: an embedded broker and each service in its own process), http (the same, but the four \
            services are plain HTTP services: push groups in, the HTTP API out), memory (one bus per service \
            over the in-memory transport, in this process), local (one bus), or a NATS URL such as \
            nats://127.0.0.1:4222 (one bus per service in this process, linked through NATS JetStream).
            """)
    var transport: String = "broker"
    @Flag(help: "Run every service in this process (the same as --transport memory).") var inProcess = false
    @Option(help: "payments or shipping: kill -9 that service's process a third of the way through, then restart it.")
    var chaos: String?
    @Option(help: "How many orders' timelines to print.") var timeline = 3
    @Option(help: "Seconds to wait for every order to finish.") var timeout = 120
    @Option(
        help: """
            Keep the orders service's orders and sagas in PostgreSQL (postgres://USER[:PASSWORD]@HOST:PORT/DB), \
            announcing each order through the transactional outbox; with --transport memory or a NATS URL.
            """)
    var postgres: String?

    func validate() throws {
        guard
            ["broker", "http"].contains(transport) || OrderDemo.Topology(rawValue: transport) != nil
                || (transport.hasPrefix("nats://") && NATSTransport.Configuration(url: transport) != nil)
        else {
            throw ValidationError("--transport must be one of: broker, http, memory, local, nats://HOST:PORT")
        }
        // Orders keeps its sagas and notifications its sent-set in memory until the PostgreSQL store (issue 5):
        // killing those would lose state by design, so chaos takes the stateless services.
        if let chaos, ![PaymentsService.name, ShippingService.name].contains(chaos) {
            throw ValidationError("--chaos takes payments or shipping (the services that keep no state in memory)")
        }
        if chaos != nil, inProcess || !["broker", "http"].contains(transport) {
            throw ValidationError("--chaos needs the services as processes (--transport broker or http)")
        }
        if let postgres {
            guard PostgresURL(postgres) != nil else {
                throw ValidationError("--postgres must be a URL such as postgres://user@127.0.0.1:5432/db")
            }
            guard inProcess || transport == "memory" || transport.hasPrefix("nats://") else {
                throw ValidationError("--postgres runs the services in this process: --transport memory or nats://…")
            }
        }
        guard orders > 0 else { throw ValidationError("--orders must be positive") }
        guard (0...100).contains(failPercent) else { throw ValidationError("--fail-percent must be 0...100") }
    }

    func run() async throws {
        let mode = inProcess ? "memory" : transport
        let options = OrderDemo.Options(
            orders: orders, seed: seed, failurePercent: failPercent,
            topology: OrderDemo.Topology(rawValue: mode) ?? .memory, timelineOrders: timeline,
            timeout: .seconds(timeout))
        print("Herald order demo: \(orders) orders, seed \(seed), \(failPercent)% payment failures, transport \(mode)")
        let report =
            mode == "broker" || mode == "http"
            ? try await ProcessDemo.run(options, chaos: chaos.map(ProcessDemo.Chaos.init), overHTTP: mode == "http") {
                print($0)
            }
            : try await runInProcess(options, mode: mode, postgres: postgres.flatMap(PostgresURL.init))
        print("")
        for (orderID, status, entries) in report.timelines {
            print("\(orderID)  → \(status?.rawValue ?? "unknown")")
            for entry in entries {
                let ms = Double(entry.offset) / 1e6
                print("  +\(format(ms, 3)) ms  \(pad(entry.source, 14)) \(entry.type)")
            }
        }
        print("")
        print("Summary")
        for status in OrderStatus.allCases {
            print("  \(pad(status.rawValue, 10)) \(report.byStatus[status] ?? 0)")
        }
        print(
            "  events      \(report.events) in \(format(seconds(report.elapsed), 3)) s = \(Int(report.eventsPerSecond)) events/s"
        )
        print(
            "  latency     p50 \(format(seconds(report.latencyP50) * 1000, 3)) ms, p99 \(format(seconds(report.latencyP99) * 1000, 3)) ms (order placed → customer notified)"
        )
        print("  redelivered \(report.redeliveries) (handler failures retried by the transport)")
        if let stock = report.reservedStockLeft {
            print("  stock       \(stock) reserved (expected \(report.expectedReservedStock))")
        }
        print(
            "  notified    \(orders - report.missingNotifications) of \(orders), \(report.duplicateNotifications) duplicates"
        )
        if report.passed {
            print("RESULT: PASS — every order reached the right final state")
        } else {
            print(
                "RESULT: FAIL — \(report.wrongOrders.count) orders in a wrong state: \(report.wrongOrders.prefix(10))")
            throw ExitCode(1)
        }
    }
}

/// The services in this process: linked through the in-memory transport (or one bus), or through NATS; with the
/// orders service on PostgreSQL when `postgres` is set.
func runInProcess(_ options: OrderDemo.Options, mode: String, postgres: PostgresURL?) async throws
    -> OrderDemo.Report
{
    let transport: any EventTransport
    if mode.hasPrefix("nats://"), let configuration = NATSTransport.Configuration(url: mode) {
        transport = NATSTransport(configuration: configuration)
    } else if postgres != nil {
        transport = InMemoryTransport()
    } else {
        return try await OrderDemo.run(options)
    }
    do {
        let report =
            if let postgres {
                try await runOnPostgres(options, url: postgres, transport: transport)
            } else {
                try await OrderDemo.run(options, over: transport)
            }
        await transport.shutdown()
        return report
    } catch {
        await transport.shutdown()
        throw error
    }
}

func seconds(_ duration: Duration) -> Double {
    Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
}

func format(_ value: Double, _ decimals: Int) -> String {
    var scale = 1.0
    for _ in 0..<decimals { scale *= 10 }
    let rounded = (value * scale).rounded() / scale
    var text = String(rounded)
    if let dot = text.firstIndex(of: ".") {
        let fraction = text.distance(from: dot, to: text.endIndex) - 1
        if fraction < decimals { text += String(repeating: "0", count: decimals - fraction) }
    } else {
        text += "." + String(repeating: "0", count: decimals)
    }
    return text
}

func pad(_ text: String, _ width: Int) -> String {
    text.count >= width ? text : text + String(repeating: " ", count: width - text.count)
}
