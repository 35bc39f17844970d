import Foundation
import Herald
import HeraldBroker
import HeraldClient
import HeraldWire
import NIOPosix
import Synchronization

/// A broker with its TCP server on an ephemeral port and a fresh data directory, for one test.
final class TestBroker: Sendable {
    let directory: String
    let broker: Broker
    let server: BrokerServer
    let port: Int
    let ticker: Task<Void, Never>

    init(directory: String? = nil, port: Int = 0, configure: (inout BrokerConfiguration) -> Void = { _ in })
        async throws
    {
        let directory = directory ?? TestBroker.temporaryDirectory()
        var configuration = BrokerConfiguration(dataDirectory: directory)
        configuration.tick = .milliseconds(5)
        configure(&configuration)
        self.directory = directory
        broker = try Broker(configuration: configuration)
        server = BrokerServer(broker: broker, port: port)
        self.port = try await server.start()
        let broker = self.broker
        ticker = Task {
            while !Task.isCancelled {
                broker.tick()
                try? await Task.sleep(for: .milliseconds(5))
            }
        }
    }

    func transport() -> BrokerTransport {
        BrokerTransport(host: "127.0.0.1", port: port, clientName: "test")
    }

    /// Stops serving and closes the logs (the directory stays, for a restart).
    func stop() async {
        ticker.cancel()
        await server.stop()
        broker.close()
    }

    static func temporaryDirectory() -> String {
        let path = NSTemporaryDirectory() + "herald-test-\(UUID().uuidString)"
        try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }
}

func sampleEvent(_ index: Int, key: String? = nil, source: String = "test") -> CloudEvent {
    var event = CloudEvent(source: source, type: "com.example.sample", data: .bytes(Array("event \(index)".utf8)))
    event.datacontenttype = "text/plain"
    event.partitionkey = key
    return event
}

/// A group member that keeps what it is handed, for tests of the engine without sockets.
final class CollectingMember: BrokerMember {
    private let received = Mutex<[WireDelivery]>([])
    let accepting = Atomic<Bool>(true)

    func deliver(_ deliveries: [WireDelivery]) -> Bool {
        received.withLock { $0.append(contentsOf: deliveries) }
        return true
    }

    var canAcceptDeliveries: Bool { accepting.load(ordering: .relaxed) }

    /// Takes what arrived so far.
    func take() -> [WireDelivery] {
        received.withLock { received in
            defer { received = [] }
            return received
        }
    }

    /// Waits (ticking the broker) until at least `count` deliveries arrived, or 10 seconds passed.
    func take(atLeast count: Int, ticking broker: Broker) async throws -> [WireDelivery] {
        var all: [WireDelivery] = []
        let deadline = ContinuousClock.now + .seconds(10)
        while all.count < count, ContinuousClock.now < deadline {
            broker.tick()
            all += take()
            if all.count < count { try await Task.sleep(for: .milliseconds(2)) }
        }
        return all
    }
}

func wire(_ event: CloudEvent) -> WireEvent { try! BinaryEvent.encode(event) }

func subscription(
    _ topic: String, _ group: String = "g", ackWait: UInt32 = 30_000, maxDeliveries: UInt32 = 5,
    backoff: [UInt32] = [0], ordered: Bool = false, maxInFlight: UInt32 = 1024, start: WireStart = .earliest
) -> SubscribeRequest {
    SubscribeRequest(
        topic: topic, group: group, start: start, ackWaitMilliseconds: ackWait, maxDeliveries: maxDeliveries,
        backoffMilliseconds: backoff, ordered: ordered, maxInFlight: maxInFlight)
}
