import Foundation
import Herald
import HeraldBroker
import HeraldClient
import HeraldHTTP
import Logging
import OrderSystem
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// The order system across processes: an embedded broker on a temporary data directory, the four services as
/// child processes of this executable (`herald service NAME`), and this process as the storefront (it places
/// orders with `PlaceOrder` commands) and the auditor (its own consumer group sees every event).
enum ProcessDemo {
    struct Chaos: Sendable {
        /// The service killed with SIGKILL and started again while orders are in flight.
        let victim: String
    }

    final class Audit: Sendable {
        struct State {
            var placedAt: [String: UInt64] = [:]
            var terminal: [String: OrderStatus] = [:]
            var notified: [String: (status: OrderStatus, at: UInt64)] = [:]
            var duplicateNotifications = 0
            var events = 0
            var timelines: [String: [OrderDemo.TimelineEntry]] = [:]
        }

        let state = Mutex(State())
        let traced: Set<String>

        init(traced: Set<String>) {
            self.traced = traced
        }

        var notifiedCount: Int { state.withLock { $0.notified.count } }
    }

    /// - Parameter overHTTP: the services use only the HTTP API (push groups in, batch publish out); the
    ///   storefront and auditor stay on TCP.
    static func run(
        _ options: OrderDemo.Options, chaos: Chaos?, overHTTP: Bool = false, log: @escaping @Sendable (String) -> Void
    ) async throws -> OrderDemo.Report {
        let directory = NSTemporaryDirectory() + "herald-demo-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: directory) }
        var logger = Logger(label: "herald.demo")
        logger.logLevel = .warning
        let broker = try Broker(
            configuration: BrokerConfiguration(dataDirectory: directory + "/data", defaultPartitions: 4), logger: logger
        )
        try broker.createTopic("orders", partitions: 4)
        let server = BrokerServer(broker: broker, port: 0, logger: logger)
        let port = try await server.start()
        let ticker = Task { try? await broker.run() }
        log("embedded broker on 127.0.0.1:\(port), data in \(directory)/data")
        let http = HTTPServer(broker: broker, port: 0, logger: logger)
        let httpTask = Task { if overHTTP { try? await http.run() } }
        let serviceEndpoint =
            overHTTP ? ["--http", "http://127.0.0.1:\(await http.boundPort())"] : ["--broker", "127.0.0.1:\(port)"]
        if overHTTP { log("HTTP API on 127.0.0.1:\(await http.boundPort()); the services are plain HTTP services") }
        defer { httpTask.cancel() }

        let executable = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")
        func spawn(_ name: String) throws -> Process {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: executable)
            process.arguments =
                ["service", name] + serviceEndpoint + [
                    "--seed", "\(options.seed)", "--fail-percent", "\(options.failurePercent)",
                ]
            let output = directory + "/\(name).log"
            _ = FileManager.default.createFile(atPath: output, contents: nil)
            let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: output))
            try handle.seekToEnd()
            process.standardOutput = handle
            process.standardError = handle
            try process.run()
            return process
        }
        var processes: [String: Process] = [:]
        for name in OrderServices.names { processes[name] = try spawn(name) }
        func stopAll() {
            for process in processes.values where process.isRunning { process.terminate() }
            for process in processes.values { process.waitUntilExit() }
        }
        do {
            let report = try await drive(
                options, broker: broker, port: port, chaos: chaos, log: log,
                restart: { name in
                    if let process = processes[name] {
                        kill(process.processIdentifier, SIGKILL)
                        process.waitUntilExit()
                    }
                    processes[name] = try spawn(name)
                })
            stopAll()
            ticker.cancel()
            await server.stop()
            broker.close()
            if !report.passed {
                for name in OrderServices.names {
                    let text = (try? String(contentsOfFile: directory + "/\(name).log", encoding: .utf8)) ?? ""
                    log(
                        "--- \(name) output (last lines) ---\n"
                            + text.split(separator: "\n").suffix(15).joined(separator: "\n"))
                }
            }
            return report
        } catch {
            stopAll()
            ticker.cancel()
            await server.stop()
            broker.close()
            throw error
        }
    }

    private static func drive(
        _ options: OrderDemo.Options, broker: Broker, port: Int, chaos: Chaos?,
        log: @escaping @Sendable (String) -> Void, restart: (String) throws -> Void
    ) async throws -> OrderDemo.Report {
        let clock = ContinuousClock()
        // Wait until every service has joined its consumer group.
        let ready = clock.now + .seconds(60)
        while clock.now < ready {
            let members = Dictionary(
                broker.groups(topic: "orders").map { ($0.group, $0.members) }, uniquingKeysWith: +)
            if OrderServices.names.allSatisfy({ (members[$0] ?? 0) > 0 }) { break }
            try await Task.sleep(for: .milliseconds(20))
        }
        log("services running as processes: \(OrderServices.names.joined(separator: ", "))")

        let ids = (1...max(1, options.orders)).map(OrderDemo.orderID)
        let audit = Audit(traced: Set(ids.prefix(options.timelineOrders)))
        let transport = BrokerTransport(host: "127.0.0.1", port: port, clientName: "storefront")
        let bus = OrderDemo.makeServiceBus("audit", transport: transport)
        bus.subscribe(OrderCompleted.self, name: "audit.completed") { event, _ in
            audit.state.withLock { $0.terminal[event.orderID] = .completed }
        }
        bus.subscribe(OrderCancelled.self, name: "audit.cancelled") { event, _ in
            audit.state.withLock { $0.terminal[event.orderID] = .cancelled }
        }
        bus.subscribe(CustomerNotified.self, name: "audit.notified") { event, _ in
            let now = monotonicNanoseconds()
            audit.state.withLock { state in
                if state.notified[event.orderID] != nil {
                    state.duplicateNotifications += 1
                } else {
                    state.notified[event.orderID] = (event.status, now)
                }
            }
        }
        bus.subscribe(.all, name: "audit.timeline", priority: 100) { event, _ in
            let now = monotonicNanoseconds()
            audit.state.withLock { state in
                state.events += 1
                guard let orderID = event.subject, audit.traced.contains(orderID) else { return }
                let start = state.placedAt[orderID] ?? now
                state.timelines[orderID, default: []].append(
                    OrderDemo.TimelineEntry(offset: now &- start, source: event.source, type: event.type))
            }
        }
        try await bus.start()

        let started = clock.now
        let placing = Task {
            try await withThrowingTaskGroup(of: Void.self) { group in
                var next = 0
                func place(_ index: Int) {
                    let id = ids[index]
                    group.addTask {
                        audit.state.withLock { $0.placedAt[id] = monotonicNanoseconds() }
                        try await bus.publish(
                            PlaceOrder(
                                OrderCreated(
                                    orderID: id, customer: "customer-\(index % 97)", amountCents: 1000 + index % 500,
                                    items: 1 + index % 3)),
                            EventAttributes(recipient: OrdersService.name, correlationID: id))
                    }
                }
                while next < min(options.concurrency, ids.count) {
                    place(next)
                    next += 1
                }
                while try await group.next() != nil, next < ids.count {
                    place(next)
                    next += 1
                }
            }
        }
        if let chaos {
            while audit.notifiedCount < ids.count / 3, clock.now - started < options.timeout {
                try await Task.sleep(for: .milliseconds(5))
            }
            log("chaos: kill -9 \(chaos.victim) after \(audit.notifiedCount) of \(ids.count) orders finished")
            try restart(chaos.victim)
            log("chaos: \(chaos.victim) started again")
        }
        try await placing.value
        let deadline = started + options.timeout
        while clock.now < deadline {
            let done = audit.state.withLock { state in
                state.notified.count >= ids.count && ids.allSatisfy { state.terminal[$0] != nil }
            }
            if done { break }
            try await Task.sleep(for: .milliseconds(5))
        }
        let elapsed = clock.now - started
        // Let late duplicates (if any) arrive before counting.
        try await Task.sleep(for: .milliseconds(200))
        await bus.shutdown()
        await transport.shutdown()

        let gateway = PaymentGateway(seed: options.seed, failurePercent: options.failurePercent)
        let state = audit.state.withLock { $0 }
        var byStatus: [OrderStatus: Int] = [:]
        var wrong: [String] = []
        var latencies: [UInt64] = []
        for id in ids {
            let expected: OrderStatus = gateway.declines(id) ? .cancelled : .completed
            let status = state.terminal[id] ?? .pending
            byStatus[status, default: 0] += 1
            if status != expected || state.notified[id].map({ $0.status != expected }) ?? false { wrong.append(id) }
            if let notified = state.notified[id], let placed = state.placedAt[id] {
                latencies.append(notified.at &- placed)
            }
        }
        latencies.sort()
        func percentile(_ p: Double) -> Duration {
            guard !latencies.isEmpty else { return .zero }
            return .nanoseconds(Int64(latencies[min(latencies.count - 1, Int(Double(latencies.count) * p))]))
        }
        let redelivered = broker.groups(topic: "orders").reduce(0) { $0 + $1.redelivered }
        return OrderDemo.Report(
            options: options, byStatus: byStatus, wrongOrders: wrong,
            missingNotifications: ids.count - state.notified.count,
            duplicateNotifications: state.duplicateNotifications, reservedStockLeft: nil,
            expectedReservedStock: byStatus[.completed] ?? 0, events: state.events, redeliveries: redelivered,
            elapsed: elapsed, latencyP50: percentile(0.5), latencyP99: percentile(0.99),
            timelines: ids.prefix(options.timelineOrders).map { ($0, state.terminal[$0], state.timelines[$0] ?? []) })
    }
}
