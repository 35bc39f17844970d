import Herald
import HeraldPostgres
import Logging
import OrderSystem
import PostgresNIO

/// The orders service's book in PostgreSQL: an order and the `OrderCreated` announcing it are written in one
/// transaction (the outbox; `OutboxRelay` publishes it after the commit), and an order's end is recorded once per
/// event (the inbox), so a redelivered `OrderCancelled` releases the stock once.
final class PostgresOrderBook: OrderBook {
    let client: PostgresClient
    private let inbox: Inbox
    private let logger: Logger

    init(client: PostgresClient, logger: Logger) {
        self.client = client
        self.inbox = Inbox(consumer: OrdersService.name, logger: logger)
        self.logger = logger
    }

    /// Creates the book's table (and Herald's) where missing.
    func migrate() async throws {
        try await HeraldSchema.migrate(client, logger: logger)
        try await client.query(
            """
            CREATE TABLE IF NOT EXISTS orders (
                id text PRIMARY KEY,
                customer text NOT NULL,
                amount_cents int8 NOT NULL,
                items int4 NOT NULL,
                status text NOT NULL,
                reason text,
                placed_at timestamptz NOT NULL DEFAULT now(),
                updated_at timestamptz NOT NULL DEFAULT now()
            )
            """, logger: logger)
    }

    func place(_ order: OrderCreated, announcing created: CloudEvent, on bus: EventBus) async throws {
        guard let link = bus.configuration.transport else {
            throw TransportError(.invalidRequest, "the PostgreSQL order book publishes through the bus's transport")
        }
        try await client.withTransaction(logger: logger) { connection in
            let inserted = try await connection.query(
                """
                INSERT INTO orders (id, customer, amount_cents, items, status)
                VALUES (\(order.orderID), \(order.customer), \(Int64(order.amountCents)), \(Int32(order.items)), 'pending')
                ON CONFLICT (id) DO NOTHING RETURNING 1
                """, logger: logger)
            var new = false
            for try await _ in inserted { new = true }
            if new { try await Outbox.append([created], to: link.topic, on: connection, logger: logger) }
        }
    }

    func finish(_ orderID: String, as status: OrderStatus, reason: String?, event: CloudEvent) async throws {
        _ = try await inbox.process(event, in: client) { connection in
            try await connection.query(
                """
                UPDATE orders SET status = \(status.rawValue), reason = coalesce(\(reason), reason), updated_at = now()
                WHERE id = \(orderID)
                """, logger: logger)
        }
    }

    func status(of orderID: String) async throws -> OrderStatus? {
        let rows = try await client.query("SELECT status FROM orders WHERE id = \(orderID)", logger: logger)
        for try await status in rows.decode(String.self) { return OrderStatus(rawValue: status) }
        return nil
    }

    func statuses() async throws -> [String: OrderStatus] {
        let rows = try await client.query("SELECT id, status FROM orders", logger: logger)
        var statuses: [String: OrderStatus] = [:]
        for try await (id, status) in rows.decode((String, String).self) {
            statuses[id] = OrderStatus(rawValue: status)
        }
        return statuses
    }

    func pendingCount() async throws -> Int {
        try await count("SELECT count(*) FROM orders WHERE status = 'pending'")
    }

    /// Every order reserves one unit of stock until it is cancelled.
    func reservedStock() async throws -> Int {
        try await count("SELECT count(*) FROM orders WHERE status <> 'cancelled'")
    }

    func cancellationReason(of orderID: String) async throws -> String? {
        let rows = try await client.query("SELECT reason FROM orders WHERE id = \(orderID)", logger: logger)
        for try await reason in rows.decode(String?.self) { return reason }
        return nil
    }

    private func count(_ query: PostgresQuery) async throws -> Int {
        let rows = try await client.query(query, logger: logger)
        for try await count in rows.decode(Int64.self) { return Int(count) }
        return 0
    }
}

/// The order demo with the orders service on PostgreSQL: orders, the outbox and the sagas in a schema of their own
/// (`herald_demo_<run>`, kept afterwards for inspection), an `OutboxRelay` publishing `OrderCreated` to the
/// transport the services are linked through (in memory, or NATS).
func runOnPostgres(_ options: OrderDemo.Options, url: PostgresURL, transport: any EventTransport) async throws
    -> OrderDemo.Report
{
    var logger = Logger(label: "herald.demo.postgres")
    logger.logLevel = .warning
    let schema = "herald_demo_" + String(UInt64.random(in: 0...UInt64.max), radix: 36)
    var clientConfiguration = url.clientConfiguration
    clientConfiguration.options.additionalStartupParameters = [("search_path", schema)]
    clientConfiguration.options.maximumConnections = 40
    var relayConfiguration = OutboxRelay.Configuration(postgres: try url.connectionConfiguration())
    relayConfiguration.postgres.options.additionalStartupParameters = [("search_path", schema)]
    var poolLogger = logger
    // The pool warns when it is used a moment before `run()` has started in the task beside it.
    poolLogger.logLevel = .error
    let client = PostgresClient(configuration: clientConfiguration, backgroundLogger: poolLogger)
    let relay = OutboxRelay(configuration: relayConfiguration, transport: transport, logger: logger)
    do {
        return try await run(options, schema: schema, url: url, client: client, relay: relay, transport: transport)
    } catch let error as PSQLError {
        // PostgresNIO's description hides the server's message; the demo shows it.
        throw PostgresDemoError(message: String(reflecting: error))
    }
}

struct PostgresDemoError: Error, CustomStringConvertible {
    let message: String
    var description: String { "PostgreSQL: \(message)" }
}

private func run(
    _ options: OrderDemo.Options, schema: String, url: PostgresURL, client: PostgresClient, relay: OutboxRelay,
    transport: any EventTransport
) async throws -> OrderDemo.Report {
    var logger = Logger(label: "herald.demo.postgres")
    logger.logLevel = .warning
    return try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { await client.run() }
        defer { group.cancelAll() }
        try await client.query(PostgresQuery(unsafeSQL: "CREATE SCHEMA \(schema)"), logger: logger)
        let book = PostgresOrderBook(client: client, logger: logger)
        try await book.migrate()
        print("orders, outbox, inbox and sagas in PostgreSQL \(url), schema \(schema)")
        group.addTask { try await relay.run() }
        let report = try await OrderDemo.run(
            options, over: transport, book: book, sagaStore: PostgresSagaStore(client: client, logger: logger))
        let relayed = relay.stats
        let outboxed = try await Outbox.pendingCount(client, logger: logger)
        print("outbox: \(relayed.published) events relayed, \(outboxed) waiting, \(relayed.failures) relay failures")
        return report
    }
}
