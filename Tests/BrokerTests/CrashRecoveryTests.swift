import Foundation
import Herald
import HeraldClient
import HeraldTesting
import Synchronization
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// A `herald serve` child process on a fixed port and data directory, killed with SIGKILL and started again.
final class BrokerProcess: Sendable {
    let directory: String
    let port: Int
    private let child: ChildProcess

    init(directory: String, port: Int) {
        self.directory = directory
        self.port = port
        child = ChildProcess(
            executable: ChildProcess.heraldExecutable,
            arguments: [
                "serve", "--data-dir", directory, "--tcp", "127.0.0.1:\(port)", "--http", "off", "--log-level", "error",
            ])
    }

    static var executable: String { ChildProcess.heraldExecutable }

    func start() throws { try child.start() }
    func kill9() { child.kill9() }
    func stop() { child.stop() }

    static func freePort() -> Int { freeLoopbackPort() }
}

@Suite("Crash recovery", .serialized)
struct CrashRecoveryTests {
    /// Publishes and consumes with acks while the broker is killed with SIGKILL at random moments, many times.
    /// Afterwards: every acknowledged publish is in the log and was delivered at least once, nothing was delivered
    /// that was never sent, and each key's events are in the log in publish order without duplicates.
    @Test(.timeLimit(.minutes(3)))
    func killingTheBrokerLosesNoAcknowledgedEvent() async throws {
        #expect(
            FileManager.default.isExecutableFile(atPath: BrokerProcess.executable),
            "the herald executable is built next to the tests (swift build --build-tests)")
        let broker = BrokerProcess(directory: TestBroker.temporaryDirectory(), port: BrokerProcess.freePort())
        try broker.start()
        defer { broker.stop() }
        let transport = BrokerTransport(host: "127.0.0.1", port: broker.port, clientName: "crash-test")
        defer { Task { await transport.shutdown() } }

        let acked = Mutex<[String: Int]>([:])  // id → sequence
        let delivered = Mutex<Set<String>>([])
        let sent = Mutex<Set<String>>([])
        let keys = 6
        let publisher = Task {
            var sequence = 0
            while !Task.isCancelled {
                var batch: [CloudEvent] = []
                for _ in 0..<20 {
                    var event = CloudEvent(
                        source: "crash-test", type: "com.example.tick", data: .bytes(Array("\(sequence)".utf8)))
                    event.partitionkey = "key-\(sequence % keys)"
                    batch.append(event)
                    sequence += 1
                }
                sent.withLock { $0.formUnion(batch.map(\.id.description)) }
                // Retries until acknowledged: the transport resends across reconnects, the broker dedups.
                guard let acks = try? await transport.publish(batch, to: "ticks") else { return }
                acked.withLock { acked in
                    for (event, ack) in zip(batch, acks) {
                        acked[ack.id.description] = Int(String(decoding: event.dataBytes, as: UTF8.self))!
                    }
                }
            }
        }
        let options = SubscribeOptions(ackWait: .seconds(2), maxDeliveries: 1000, backoff: [.milliseconds(10)])
        let stream = try await transport.subscribe(topic: "ticks", group: "consumer", options: options)
        let consumer = Task {
            do {
                for try await delivery in stream {
                    delivered.withLock { _ = $0.insert(delivery.event.id.description) }
                    try? await delivery.ack()
                }
            } catch {}
        }
        var random = SplitMix(seed: UInt64(Date().timeIntervalSince1970))
        for _ in 0..<8 {
            try await Task.sleep(for: .milliseconds(150 + Int(random.next() % 400)))
            broker.kill9()
            try broker.start()
        }
        // Publishing goes on after the last crash until 200 events are acknowledged (a loaded machine may have
        // acknowledged fewer between the crashes), or 30 s pass.
        let enough = ContinuousClock.now + .seconds(30)
        try await Task.sleep(for: .milliseconds(300))
        while acked.withLock({ $0.count }) <= 200 && ContinuousClock.now < enough {
            try await Task.sleep(for: .milliseconds(50))
        }
        publisher.cancel()
        _ = await publisher.result
        let ackedIDs = acked.withLock { $0 }
        #expect(ackedIDs.count > 200, "the workload made progress after the crashes (\(ackedIDs.count) acked)")
        // Everything acked reaches the consumer (redelivery after the crashes included).
        let deadline = ContinuousClock.now + .seconds(60)
        while ContinuousClock.now < deadline {
            if delivered.withLock({ Set(ackedIDs.keys).isSubset(of: $0) }) { break }
            try await Task.sleep(for: .milliseconds(50))
        }
        consumer.cancel()
        let missing = Set(ackedIDs.keys).subtracting(delivered.withLock { $0 })
        #expect(missing.isEmpty, "\(missing.count) acknowledged events were never delivered")
        #expect(delivered.withLock { $0 }.isSubset(of: sent.withLock { $0 }), "nothing was delivered that was not sent")

        // The log itself: read every partition from the start with a new group.
        let reader = try await transport.subscribe(
            topic: "ticks", group: "audit", options: SubscribeOptions(ackWait: .seconds(30), maxInFlight: 100_000))
        var inLog: [(partition: Int, offset: Int64, id: String, key: String, sequence: Int)] = []
        var iterator = reader.makeAsyncIterator()
        let total = try await admin(transport, "topics.describe", ["name": "ticks"])
        let stored = try totalEvents(total)
        while inLog.count < stored, let delivery = try await iterator.next() {
            let event = delivery.event
            inLog.append(
                (
                    delivery.partition, delivery.offset, event.id.description, event.partitionkey ?? "",
                    Int(String(decoding: event.dataBytes, as: UTF8.self))!
                ))
            try await delivery.ack()
        }
        #expect(Set(inLog.map(\.id)).count == inLog.count, "no event is stored twice (retried publishes deduplicated)")
        #expect(Set(ackedIDs.keys).isSubset(of: Set(inLog.map(\.id))), "every acknowledged event is in the log")
        for key in 0..<keys {
            let sequences = inLog.filter { $0.key == "key-\(key)" }.sorted { $0.offset < $1.offset }.map(\.sequence)
            #expect(sequences == sequences.sorted(), "key-\(key) is stored in publish order")
        }
    }

    func admin(_ transport: BrokerTransport, _ command: String, _ arguments: [String: String]) async throws -> [UInt8] {
        try await transport.admin(command, arguments: Array(try JSONSerialization.data(withJSONObject: arguments)))
    }

    func totalEvents(_ json: [UInt8]) throws -> Int {
        let object = try JSONSerialization.jsonObject(with: Data(json)) as! [String: Any]
        let ends = object["endOffsets"] as! [Int]
        let starts = object["startOffsets"] as! [Int]
        return zip(ends, starts).reduce(0) { $0 + $1.0 - $1.1 }
    }
}

extension CloudEvent {
    var dataBytes: [UInt8] {
        if case .bytes(let bytes) = data { return bytes }
        return []
    }
}
