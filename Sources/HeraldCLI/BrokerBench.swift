import ArgumentParser
import Foundation
import Herald
import HeraldBroker
import HeraldClient
import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Measures the broker over loopback TCP with the client transport: acked durable publishes, consume + ack, and
/// end-to-end latency at a fixed rate, beside a baseline measured in the same run (fdatasync alone).
struct BrokerBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "broker",
        abstract: "Benchmark the broker: acked durable publish, consume + ack, end-to-end latency at a fixed rate.")

    @Option(help: "Events for the throughput runs.") var events = 300_000
    @Option(help: "Bytes of data per event.") var size = 100
    @Option(help: "Concurrent publishers.") var publishers = 16
    @Option(help: "Events per publish call.") var batch = 64
    @Option(help: "Events per second for the latency run.") var rate = 5000
    @Option(help: "Seconds of the latency run.") var seconds = 5
    @Option(help: "Partitions of the benchmark topic.") var partitions = 1
    @Option(help: "always, interval:MS or none.") var fsync = "always"
    @Option(help: "Use this broker (HOST:PORT) instead of an embedded one.") var broker: String?
    @Option(help: "The embedded broker's tick (ack deadlines, journal syncs), in ms.") var tickMs = 10

    func run() async throws {
        guard let policy = FsyncPolicy(fsync) else { throw ValidationError("--fsync: always, interval:MS or none") }
        let directory = NSTemporaryDirectory() + "herald-bench-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: directory) }
        var embedded: (Broker, BrokerServer, Task<Void, Never>)?
        let address: Address
        if let broker {
            guard let parsed = Address(argument: broker) else { throw ValidationError("--broker must be HOST:PORT") }
            address = parsed
        } else {
            var logger = Logger(label: "herald.bench")
            logger.logLevel = .warning
            let engine = try Broker(
                configuration: BrokerConfiguration(
                    dataDirectory: directory, fsync: policy, tick: .milliseconds(tickMs)), logger: logger)
            let server = BrokerServer(broker: engine, port: 0, logger: logger)
            let port = try await server.start()
            embedded = (engine, server, Task { try? await engine.run() })
            address = Address(host: "127.0.0.1", port: port)
        }
        print(
            "herald bench broker — \(events) events of \(size) bytes, fsync \(policy), \(partitions) partition(s), "
                + "\(publishers) publishers × \(batch) per call, broker \(broker ?? "embedded (same process)")")
        print("")
        let fsyncRate = measureFsync(directory: directory + "-fsync")
        print(pad("fdatasync alone, one 100-byte append each (baseline)", 58) + "\(Int(fsyncRate)) /s")

        let transport = BrokerTransport(host: address.host, port: address.port, clientName: "bench")
        let topic = "bench-\(UInt32.random(in: 0...UInt32.max))"
        if partitions > 0 {
            let json = try JSONSerialization.data(withJSONObject: ["name": topic, "partitions": partitions])
            _ = try await transport.admin("topics.create", arguments: Array(json))
        }
        let workload = TransportWorkload(
            events: events, size: size, publishers: publishers, batch: batch, rate: rate, seconds: seconds)
        let published = try await workload.measurePublish(transport, topic: topic)
        print(
            pad("acked durable publish", 58) + "\(Int(published)) events/s  (\(format(published / fsyncRate, 1))× "
                + "the baseline; goal 150,000)")
        let consumed = try await workload.measureConsume(
            transport, topic: topic, group: "bench-each", count: events, batched: false)
        print(pad("consume + ack, one ack() per event (as the bus does)", 58) + "\(Int(consumed)) events/s")
        let batched = try await workload.measureConsume(
            transport, topic: topic, group: "bench-batched", count: events, batched: true)
        print(
            pad("consume + ack, acks batched with settle(_:_:)", 58)
                + "\(Int(batched)) events/s  (goal 150,000)")
        let (p50, p99, p999, count) = try await workload.measureLatency(transport, topic: topic + "-latency")
        print(
            pad("end-to-end latency at \(rate)/s (\(count) events)", 58)
                + "p50 \(format(p50 / 1000, 3)) ms, p99 \(format(p99 / 1000, 3)) ms, p99.9 \(format(p999 / 1000, 3)) ms"
                + "  (goal p99 < 2 ms)")
        await transport.shutdown()
        if let (engine, server, ticker) = embedded {
            ticker.cancel()
            await server.stop()
            engine.close()
        }
    }

    /// Sequential 100-byte appends, each followed by fdatasync: what one durable write costs alone.
    func measureFsync(directory: String) -> Double {
        try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let fd = open(directory + "/probe", O_WRONLY | O_CREAT | O_APPEND, 0o644)
        defer { close(fd) }
        let bytes = [UInt8](repeating: 1, count: 100)
        let count = 500
        let start = monotonicNanoseconds()
        for _ in 0..<count {
            _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            fdatasync(fd)
        }
        return Double(count) / (Double(monotonicNanoseconds() - start) / 1e9)
    }
}

/// The benchmark workload, for any transport: acked publishes from concurrent publishers, consume + ack, and
/// end-to-end latency at a fixed rate (the send time rides in the event's first 8 bytes).
struct TransportWorkload: Sendable {
    let events: Int
    let size: Int
    let publishers: Int
    let batch: Int
    let rate: Int
    let seconds: Int

    func event(_ number: Int, sentAt: UInt64 = 0) -> CloudEvent {
        var data = [UInt8](repeating: UInt8(ascii: "x"), count: max(16, size))
        withUnsafeBytes(of: sentAt.littleEndian) { for (index, byte) in $0.enumerated() { data[index] = byte } }
        var event = CloudEvent(source: "bench", type: "com.herald.bench", data: .bytes(data))
        event.datacontenttype = "application/octet-stream"
        return event
    }

    func measurePublish(_ transport: any EventTransport, topic: String) async throws -> Double {
        let prepared = (0..<events).map { event($0) }
        let perPublisher = (events + publishers - 1) / publishers
        let start = monotonicNanoseconds()
        try await withThrowingTaskGroup(of: Void.self) { group in
            for publisher in 0..<publishers {
                let mine = Array(
                    prepared[min(events, publisher * perPublisher)..<min(events, (publisher + 1) * perPublisher)])
                group.addTask {
                    var index = 0
                    while index < mine.count {
                        let slice = Array(mine[index..<min(mine.count, index + batch)])
                        _ = try await transport.publish(slice, to: topic)
                        index += slice.count
                    }
                }
            }
            try await group.waitForAll()
        }
        return Double(events) / (Double(monotonicNanoseconds() - start) / 1e9)
    }

    /// Consumes `count` events as group `group`, acking each with its own `ack()` (what the bus does) or, with
    /// `batched`, everything received so far with one `settle` call.
    func measureConsume(_ transport: any EventTransport, topic: String, group name: String, count: Int, batched: Bool)
        async throws -> Double
    {
        var options = SubscribeOptions(ackWait: .seconds(60))
        options.maxInFlight = 8192
        let stream = try await transport.subscribe(topic: topic, group: name, options: options)
        let start = monotonicNanoseconds()
        let acked = Counter()
        var iterator = stream.makeAsyncIterator()
        try await withThrowingTaskGroup(of: Void.self) { group in
            var received = 0
            var pending: [Delivery] = []
            while received < count, let delivery = try await iterator.next() {
                received += 1
                if batched {
                    pending.append(delivery)
                    // Settle what has arrived whenever the stream has nothing more buffered right now.
                    if pending.count >= 1024 || received == count || !iterator.hasBuffered {
                        let batch = pending
                        pending = []
                        group.addTask {
                            _ = try await transport.settle(batch, .ack)
                            acked.add(batch.count)
                        }
                    }
                } else {
                    group.addTask {
                        try await delivery.ack()
                        acked.add(1)
                    }
                }
            }
            try await group.waitForAll()
        }
        return Double(acked.value) / (Double(monotonicNanoseconds() - start) / 1e9)
    }

    func measureLatency(_ transport: any EventTransport, topic: String) async throws -> (Double, Double, Double, Int) {
        var options = SubscribeOptions(ackWait: .seconds(60))
        options.maxInFlight = 4096
        let stream = try await transport.subscribe(topic: topic, group: "bench-latency", options: options)
        let total = rate * seconds
        let samples = Samples()
        let consumer = Task {
            try await withThrowingTaskGroup(of: Void.self) { group in
                var received = 0
                var pending: [Delivery] = []
                var iterator = stream.makeAsyncIterator()
                while received < total, let delivery = try await iterator.next() {
                    let now = monotonicNanoseconds()
                    if case .bytes(let bytes) = delivery.event.data, bytes.count >= 8 {
                        let sentAt = bytes.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
                        samples.values.withLock { $0.append(now &- sentAt) }
                    }
                    pending.append(delivery)
                    received += 1
                    if !iterator.hasBuffered || received == total {
                        let batch = pending
                        pending = []
                        group.addTask { _ = try await transport.settle(batch, .ack) }
                    }
                }
                try await group.waitForAll()
            }
        }
        let interval = 1_000_000_000 / UInt64(rate)
        let start = monotonicNanoseconds()
        try await withThrowingTaskGroup(of: Void.self) { group in
            var sent = 0
            while sent < total {
                let due = Int((monotonicNanoseconds() - start) / interval) + 1
                while sent < min(due, total) {
                    let next = event(sent, sentAt: monotonicNanoseconds())
                    group.addTask { _ = try await transport.publish([next], to: topic) }
                    sent += 1
                }
                try await Task.sleep(for: .microseconds(100))
            }
            try await group.waitForAll()
        }
        try await consumer.value
        let sorted = samples.values.withLock { $0 }.sorted()
        func at(_ p: Double) -> Double {
            sorted.isEmpty ? 0 : Double(sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))]) / 1000
        }
        return (at(0.5), at(0.99), at(0.999), sorted.count)
    }

}

final class Samples: Sendable {
    let values = Mutex<[UInt64]>([])
}
