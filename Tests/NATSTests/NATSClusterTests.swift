import Foundation
import Herald
import HeraldNATS
import HeraldTesting
import Synchronization
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// A three-node JetStream cluster on loopback with an R3 stream: kill -9 one node during an acknowledged workload,
/// start it again on its store → no acknowledged event is lost, and a consumer group that was reading all along
/// keeps going and sees every one of them.
@Suite("NATS: a three-node JetStream cluster", .timeLimit(.minutes(3)))
struct NATSClusterTests {
    @Test func noAcknowledgedEventIsLostWhenANodeIsKilled() async throws {
        let clientPorts = (0..<3).map { _ in freeLoopbackPort() }
        let routePorts = (0..<3).map { _ in freeLoopbackPort() }
        let directories = (0..<3).map { _ in NSTemporaryDirectory() + "herald-nats-cluster-\(UUID().uuidString)" }
        defer { for directory in directories { try? FileManager.default.removeItem(atPath: directory) } }
        func node(_ index: Int) throws -> NATSServerProcess {
            let routes = routePorts.indices.filter { $0 != index }.map { "nats-route://127.0.0.1:\(routePorts[$0])" }
            return try NATSServerProcess(
                port: clientPorts[index], directory: directories[index], keepsDirectory: true,
                extraConfig: """
                    cluster {
                      name: herald-test
                      listen: 127.0.0.1:\(routePorts[index])
                      routes: [\(routes.joined(separator: ", "))]
                    }
                    """)
        }
        var nodes = try (0..<3).map(node)
        for server in nodes { try await server.start() }
        defer { for server in nodes { server.stop() } }

        let servers = clientPorts.map { NATSConnection.Server(host: "127.0.0.1", port: $0) }
        let transport = NATSTransport(configuration: .init(servers: servers, replicas: 3))
        // The stream and the reading group exist before the workload (creating them waits out the cluster's
        // first leader election).
        let reader = try await transport.subscribe(
            topic: "replicated", group: "reader", options: SubscribeOptions(ackWait: .seconds(5), maxInFlight: 256))
        let seen = Mutex<Set<EventID>>([])
        let consumer = Task {
            var iterator = reader.makeAsyncIterator()
            while let delivery = try? await TransportConformance.nextWithin(&iterator, .seconds(20)) {
                _ = seen.withLock { $0.insert(delivery.event.id) }
                try? await delivery.ack()
            }
        }

        let acknowledged = Mutex<Set<EventID>>([])
        let publisher = Task {
            for index in 0..<400 {
                var event = CloudEvent(
                    source: "cluster", type: "com.herald.test.cluster", data: .bytes(Array("\(index)".utf8)))
                event.partitionkey = "key-\(index % 7)"
                if (try? await transport.publish([event], to: "replicated")) != nil {
                    _ = acknowledged.withLock { $0.insert(event.id) }
                }
            }
        }
        while acknowledged.withLock({ $0.count }) < 100 { try await Task.sleep(for: .milliseconds(5)) }
        // The client starts on the first node: kill that one.
        nodes[0].stop(kill: SIGKILL)
        let atKill = acknowledged.withLock { $0.count }
        try await Task.sleep(for: .seconds(1))
        nodes[0] = try node(0)
        try await nodes[0].start()
        await publisher.value
        let acked = acknowledged.withLock { $0 }
        #expect(atKill < 400, "the node was killed mid-workload (\(atKill) acknowledged by then)")
        #expect(acked.count > atKill, "publishing went on through the other nodes (\(acked.count) acknowledged)")

        let deadline = ContinuousClock.now + .seconds(60)
        while !acked.isSubset(of: seen.withLock({ $0 })), ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(50))
        }
        let missing = acked.subtracting(seen.withLock { $0 })
        #expect(missing.isEmpty, "\(missing.count) acknowledged events never reached the reading group")
        consumer.cancel()
        await transport.shutdown()
    }
}
